"""The money path: credit holds, charges and grants as atomic Redis scripts.

Every account lives in one of :data:`SHARDS` shards. An account's keys and its shard's
ledger stream share a hash tag (``{s7}``), so each script touches one cluster slot and
"move money + append the ledger event" is a single atomic step. The worker drains the
shard streams into Postgres (:mod:`proxy.usage`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio import Redis

from .pipeline import TRANSIENT_ERRORS, PipelinedScript, RedisPipeline

SHARDS = 16
#: pauses between attempts to resolve a hold while Redis is unreachable (None: give up)
RESOLVE_RETRY_PAUSES = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, None)
MARKER_TTL_MS = 400 * 86_400_000  # applied grant ids are remembered this long
#: a voided hold is remembered this long, so the request of an expired hold that still
#: finishes is charged once; a request outliving its hold by more is not charged
VOID_MARKER_TTL_MS = 86_400_000
_HERE = Path(__file__).parent


def now_ms() -> int:
    return int(time.time() * 1000)


_PROCESS_TAG = os.urandom(8).hex()
_SEQUENCE = itertools.count(1)


def _retag() -> None:  # a forked child must not repeat its parent's ids
    global _PROCESS_TAG
    _PROCESS_TAG = os.urandom(8).hex()


os.register_at_fork(after_in_child=_retag)


def new_id(prefix: str) -> str:
    """A unique ledger/hold id such as ``hold_3f2a…_1c``: a random tag per process and a
    counter, as unique as a UUID and much cheaper on the request path."""
    return f"{prefix}_{_PROCESS_TAG}{next(_SEQUENCE):x}"


def shard_of(user_id: str) -> int:
    return zlib.crc32(user_id.encode()) % SHARDS


@dataclass(frozen=True, slots=True)
class Admission:
    """Outcome of :meth:`Ledger.admit`: ``reason`` is ``"ok"`` or why it was refused."""

    reason: str
    balance: int = 0
    held: int = 0
    tokens: int = 0
    requests: int = 0
    actual_tier: str | None = None
    retry_after_ms: int = 0
    cycle_end_ms: int = 0  # with a credits, tokens or requests refusal: when the cycle renews


@dataclass(frozen=True, slots=True)
class PendingHold:
    """A hold not yet resolved, as the expiry sweep reads it from a shard's holds zset."""

    hold_id: str
    user_id: str
    amount_micro: int
    member: str
    #: the hash a hold placed by an earlier version keeps its details in (None for current ones)
    legacy_key: str | None = None


def hold_member(hold_id: str, user_id: str, amount_micro: int) -> str:
    """A pending hold's member of its shard's holds zset (scored by expiry): it carries
    everything the expiry sweep needs, so a hold costs no key of its own."""
    return f"{hold_id}|{user_id}|{amount_micro}"


@dataclass(frozen=True, slots=True)
class Resolution:
    """Outcome of posting or voiding a hold; ``duplicate`` if it was already resolved."""

    duplicate: bool
    balance: int = 0
    held: int = 0
    tokens: int = 0
    requests: int = 0


@dataclass(frozen=True, slots=True)
class WarnAt:
    """The cycle's limits a charge is compared with, to warn once per cycle when usage
    crosses ``threshold_permille`` of any of them (None = unlimited, no warning)."""

    allowance_micro: int
    monthly_tokens: int | None
    monthly_requests: int | None
    threshold_permille: int


NO_WARNINGS = WarnAt(0, None, None, 1000)


class Ledger:
    """Python face of the ledger scripts; one instance per Redis connection pool."""

    def __init__(self, redis: Redis, prefix: str, pipeline: RedisPipeline | None = None):
        """``pipeline``, when given, carries the two scripts of the request path (admit,
        resolve); everything else goes through ``redis``."""
        self.redis = redis
        self.prefix = prefix
        hot = (lambda source: PipelinedScript(pipeline, source)) if pipeline else redis.register_script
        self._admit = hot((_HERE / "admit.lua").read_text())
        self._resolve = hot((_HERE / "resolve.lua").read_text())
        self._grant = redis.register_script((_HERE / "grant.lua").read_text())

    # key layout -----------------------------------------------------------------------
    def _tag(self, user_id: str) -> str:
        return f"{self.prefix}{{s{shard_of(user_id)}}}"

    def account_key(self, user_id: str) -> str:
        return f"{self._tag(user_id)}:acct:{user_id}"

    def stream_keys(self) -> list[str]:
        """The ledger stream of every shard."""
        return [f"{self.prefix}{{s{n}}}:ledger" for n in range(SHARDS)]

    def holds_keys(self) -> list[str]:
        return [f"{self.prefix}{{s{n}}}:holds" for n in range(SHARDS)]


    # requests -------------------------------------------------------------------------
    async def admit(
        self,
        *,
        user_id: str,
        tier: str,
        hold_id: str,
        hold_micro: int,
        strict: bool,
        monthly_tokens: int | None,
        monthly_requests: int | None,
        rpm: int | None,
        hold_ttl_ms: int,
        allowance_micro: int,
        renewal: Callable[[int], tuple[int, int, int]],
    ) -> Admission:
        """Check limits and place a hold of ``hold_micro`` in one round trip; a lapsed
        self-renewing cycle is renewed first, as ``renewal(now_ms)`` describes
        (see :meth:`proxy.tiers.TiersFile.renewal`)."""
        unlimited = lambda v: -1 if v is None else v  # noqa: E731
        now = now_ms()
        cycle_ms, month_start, month_end = renewal(now)
        tag = self._tag(user_id)
        res = await self._admit(
            keys=[f"{tag}:acct:{user_id}", f"{tag}:holds", f"{tag}:ledger"],
            args=[
                now, tier, hold_member(hold_id, user_id, hold_micro), hold_micro, "strict" if strict else "lenient",
                unlimited(monthly_tokens), unlimited(monthly_requests), unlimited(rpm),
                hold_ttl_ms, allowance_micro, cycle_ms, user_id, month_start, month_end,
            ],
        )
        reason = res[0].decode()
        if reason == "ok":
            return Admission("ok", *(int(v) for v in res[1:5]))
        if reason == "tier":
            return Admission("tier", actual_tier=res[1].decode())
        if reason == "rpm":
            return Admission("rpm", retry_after_ms=int(res[1]))
        if reason == "credits":
            return Admission("credits", balance=int(res[1]), held=int(res[2]), cycle_end_ms=int(res[3]))
        if reason in ("tokens", "requests"):
            return Admission(reason, cycle_end_ms=int(res[1]))
        return Admission(reason)

    async def post(
        self, *, user_id: str, hold_id: str, hold_micro: int, cost_micro: int, tokens: int, event: dict[str, Any],
        warn_at: WarnAt = NO_WARNINGS,
    ) -> Resolution:
        """Charge the actual cost against the hold (of ``hold_micro``, as admitted) and log
        the usage event, atomically; log a warning event the first time this cycle's usage
        crosses ``warn_at``. Raises ``KeyError`` if the account no longer exists."""
        return await self._resolve_hold("post", user_id, hold_id, hold_micro, cost_micro, tokens, f"chg_{hold_id}", event, warn_at)

    async def void(self, *, user_id: str, hold_id: str, hold_micro: int, reason: str) -> Resolution:
        """Release a hold without charging (upstream error, timeout, expiry); ``duplicate``
        if it was already resolved or never placed. Raises ``KeyError`` if the account no
        longer exists (the hold is dropped)."""
        return await self._resolve_hold(
            "void", user_id, hold_id, hold_micro, 0, 0, f"void_{hold_id}", {"reason": reason}, NO_WARNINGS
        )

    async def void_pending(self, hold: PendingHold, reason: str) -> Resolution:
        """Void a hold found by :meth:`expired_holds` (also one an earlier version placed)."""
        result = await self._resolve_hold(
            "void", hold.user_id, hold.hold_id, hold.amount_micro, 0, 0, f"void_{hold.hold_id}", {"reason": reason},
            NO_WARNINGS, hold.member,
        )
        if hold.legacy_key:
            await self.redis.delete(hold.legacy_key)
        return result

    async def _resolve_hold(
        self, mode: str, user_id: str, hold_id: str, hold_micro: int, cost: int, tokens: int, event_id: str,
        event: dict[str, Any], warn_at: WarnAt, member: str | None = None,
    ) -> Resolution:
        unlimited = lambda v: -1 if v is None else v  # noqa: E731
        tag = self._tag(user_id)
        keys = [f"{tag}:acct:{user_id}", f"{tag}:holds", f"{tag}:voided:{hold_id}", f"{tag}:ledger"]
        args = [
            mode, cost, tokens, event_id, now_ms(), user_id, hold_id, VOID_MARKER_TTL_MS, warn_at.allowance_micro,
            unlimited(warn_at.monthly_tokens), unlimited(warn_at.monthly_requests), warn_at.threshold_permille, orjson.dumps(event),
            member or hold_member(hold_id, user_id, hold_micro), hold_micro,
        ]
        # The provider has billed the request: a Redis blip must not lose the charge. The
        # script resolves a hold once, so retrying is safe; a "dup" after a retry means an
        # earlier attempt went through and only its reply was lost.
        for attempt, pause in enumerate(RESOLVE_RETRY_PAUSES):
            try:
                res = await self._resolve(keys=keys, args=args)
                break
            except TRANSIENT_ERRORS:
                if pause is None:
                    raise
                await asyncio.sleep(pause)
        if res[0] == b"no_account":
            raise KeyError(user_id)
        if res[0] != b"dup":
            return Resolution(False, *(int(v) for v in res[1:5]))
        account = await self.account(user_id) or {}
        return Resolution(attempt == 0, *(int(account.get(f, 0)) for f in ("balance", "held", "tokens", "requests")))

    # grants ---------------------------------------------------------------------------
    async def _move(self, mode: str, user_id: str, amount: int, event_id: str, kind: str, reason: str, tier: str, *cycle: Any) -> list[Any]:
        tag = self._tag(user_id)
        res = await self._grant(
            keys=[f"{tag}:acct:{user_id}", f"{tag}:ledger", f"{tag}:applied:{event_id}"],
            args=[mode, amount, event_id, now_ms(), user_id, kind, reason, MARKER_TTL_MS, tier, *cycle],
        )
        if res[0] == b"no_account":
            raise KeyError(user_id)
        return res

    async def open_account(
        self, *, user_id: str, tier: str, allowance_micro: int, cycle_start_ms: int, cycle_end_ms: int, auto_renew: bool = True
    ) -> bool:
        """Create the account with its first cycle's allowance; False if it already exists."""
        res = await self._move(
            "open", user_id, allowance_micro, f"open_{user_id}", "grant", "first cycle allowance", tier,
            cycle_start_ms, cycle_end_ms, "1" if auto_renew else "0", "0",
        )
        return res[0] == b"ok"

    async def add(
        self, *, user_id: str, amount_micro: int, kind: str, reason: str, event_id: str | None = None, tier: str = ""
    ) -> int | None:
        """Add (negative: remove) credits once per ``event_id``, optionally moving the account
        to ``tier``; the new balance, or None if the event was already applied."""
        res = await self._move("add", user_id, amount_micro, event_id or new_id(kind), kind, reason, tier)
        return int(res[1]) if res[0] == b"ok" else None

    async def start_cycle(
        self, *, user_id: str, tier: str, allowance_micro: int, start_ms: int, end_ms: int,
        event_id: str, reason: str, auto_renew: bool, rollover: bool = False,
    ) -> int | None:
        """Begin a cycle once per ``event_id``: balance to the allowance (plus a positive
        balance if ``rollover``), usage counters to zero; None if already applied."""
        res = await self._move(
            "cycle", user_id, allowance_micro, event_id, "reset", reason, tier,
            start_ms, end_ms, "1" if auto_renew else "0", "1" if rollover else "0",
        )
        return int(res[1]) if res[0] == b"ok" else None

    async def set_status(self, user_id: str, status: str) -> None:
        """Mark the account ``active``, ``past_due`` or ``suspended`` (the last is refused at admission)."""
        await self.redis.hset(self.account_key(user_id), "status", status)

    # reads ----------------------------------------------------------------------------
    async def account(self, user_id: str) -> dict[str, str] | None:
        """The raw account hash, or None."""
        raw = await self.redis.hgetall(self.account_key(user_id))
        return {k.decode(): v.decode() for k, v in raw.items()} or None

    async def expired_holds(self, holds_key: str, now: int, limit: int = 200) -> list[PendingHold]:
        """Holds in one shard whose expiry has passed."""
        holds = []
        for raw in await self.redis.zrangebyscore(holds_key, "-inf", now, start=0, num=limit):
            member = raw.decode()
            if "|" in member:
                hold_id, user_id, amount = member.split("|")
                holds.append(PendingHold(hold_id, user_id, int(amount), member))
                continue
            # Placed by a version that kept a hash per hold (member = hold id): read it there.
            legacy_key = holds_key.removesuffix(":holds") + f":hold:{member}"
            account, amount = await self.redis.hmget(legacy_key, "account", "amount")
            if account is None:  # resolved meanwhile by the process that placed it
                await self.redis.zrem(holds_key, member)
                continue
            user_id = account.decode().rsplit(":acct:", 1)[1]
            holds.append(PendingHold(member, user_id, int(amount), member, legacy_key))
        return holds
