"""The Python face of the money scripts: one :class:`Ledger` per Redis client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from redis.exceptions import TimeoutError as RedisTimeoutError

from ..redis_url import RedisClient
from .admit import admit_call, decode_admission
from .events import EntryKind, UsageEvent, entry_id, stream_order
from .grant import MARKER_TTL_MS, credit_call, cycle_call, decode_grant, open_call
from .heartbeat import heartbeat_call
from .ids import new_id, now_ms
from .layout import KeyLayout, shard_of
from .pipeline import TRANSIENT_ERRORS, ClusterPipeline, PipelinedScript, RequestPipeline
from .resend import FAILOVER_SIGNS, RecentSettlements
from .resolve import decode_resolution, expire_call, post_call, void_call
from .scripts import Arg, Script, ScriptCall, source, text
from .values import Account, AccountStatus, Admission, Cycle, CycleLimits, Hold, NoAccountError, RenewalRule, Resolution

log = logging.getLogger("costproxy.ledger")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An account at one instant (:meth:`Ledger.snapshot`)."""

    account: Account | None
    #: the pending holds of the account's shard, with their expiry (ms)
    shard_holds: list[tuple[Hold, int]]
    #: the stream order of the last entry the shard's stream was given (None: no stream)
    upto: int | None


#: pauses between attempts to resolve a hold while Redis is unreachable (None: give up,
#: which with a spool means: keep it there and post it when Redis is back)
RESOLVE_RETRY_PAUSES = (0.05, 0.1, 0.2, 0.4, None)
#: the most a settlement spends on Redis before it goes to the spool
SETTLE_SECONDS = 2.0
#: how long after a rebuild a replayed settlement of a hold settled before it is recognised
#: (resolve.lua's lost-hold markers live this long too)
LOST_HOLD_TTL_MS = 86_400_000


class SettlementSpool(Protocol):
    """Where settlements go that Redis did not take (:class:`proxy.spool.Spool`)."""

    async def keep(self, hold_id: str, call: ScriptCall) -> None: ...


class Ledger:
    """Holds, charges and grants on one Redis (keys under ``prefix``)."""

    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        pipeline: RequestPipeline | None = None,
        spool: SettlementSpool | None = None,
        recent: RecentSettlements | None = None,
    ):
        """``pipeline``, when given, carries the scripts of the request path (admit,
        resolve, heartbeat); everything else goes through ``redis``. With a ``spool``, a
        settlement Redis does not take is kept there instead of raising. With ``recent``,
        the settlements Redis answered are remembered and a failed call of the request
        path asks for them to be sent again (:mod:`proxy.ledger.resend`)."""
        self.redis = redis
        self.keys = KeyLayout(prefix)
        self.spool = spool
        self.recent = recent
        if recent is not None and isinstance(pipeline, ClusterPipeline):
            pipeline.on_failover = recent.disrupted

        def hot(name: str) -> Script:
            return PipelinedScript(pipeline, source(name)) if pipeline else redis.register_script(source(name))

        self._admit = hot("admit.lua")
        self._resolve = hot("resolve.lua")
        self._heartbeat = hot("heartbeat.lua")
        self._grant = redis.register_script(source("grant.lua"))
        self._restore = redis.register_script(source("restore.lua"))
        self._status = redis.register_script(source("status.lua"))
        self._snapshot = redis.register_script(source("snapshot.lua"))

    @staticmethod
    async def _run(script: Script, call: ScriptCall) -> Any:
        return await script(keys=call.keys, args=call.args)

    async def _hot(self, script: Script, call: ScriptCall) -> Any:
        """A call of the request path; a failure may mean a failover took recent writes."""
        try:
            return await script(keys=call.keys, args=call.args)
        except FAILOVER_SIGNS:
            if self.recent is not None:
                self.recent.disrupted()
            raise

    # requests -------------------------------------------------------------------------
    async def admit(
        self, hold: Hold, *, tier: str, limits: CycleLimits, hold_ttl_ms: int, renewal: RenewalRule, progress: bytes
    ) -> Admission:
        """Check ``limits`` for an account priced at ``tier`` and place ``hold`` in one round
        trip, with its first ``progress`` record (:func:`progress_record`); a lapsed
        self-renewing cycle is renewed first, as ``renewal`` describes."""
        now = now_ms()
        call = admit_call(
            self.keys,
            hold=hold,
            tier=tier,
            limits=limits,
            hold_ttl_ms=hold_ttl_ms,
            renewal=renewal(now),
            progress=progress,
            now=now,
        )
        return decode_admission(await self._hot(self._admit, call))

    async def post(self, hold: Hold, *, cost: int, usage: UsageEvent, limits: CycleLimits) -> Resolution | None:
        """Charge ``cost`` µ$ against the hold and log the usage event, atomically; log a
        warning event the first time this cycle's usage crosses ``limits``' threshold.
        None: Redis did not take it and it waits in the spool — also when the account is
        missing (Redis lost it: the spool posts it once ``ledger rebuild`` brings the account
        back). Without a spool, raises :class:`NoAccountError` then."""
        call = post_call(self.keys, hold, cost=cost, usage=usage, limits=limits, now=now_ms())
        try:
            return await self._settle(hold, call)
        except NoAccountError:
            if self.spool is None:
                raise
            log.error("charge of hold %s spooled: account %s is not in Redis (ledger rebuild?)", hold.id, hold.account)
            await self.spool.keep(hold.id, call)
            return None

    async def void(self, hold: Hold, *, reason: str) -> Resolution | None:
        """Release a hold without charging (the provider did not serve the request);
        ``duplicate`` if it was already resolved or never placed; None if it waits in the
        spool. Raises :class:`NoAccountError` if the account no longer exists."""
        return await self._settle(hold, void_call(self.keys, hold, reason=reason, now=now_ms()))

    async def expire(self, hold: Hold) -> Resolution | None:
        """Post a hold whose expiry passed at its last recorded progress (marked estimated);
        None if it is alive after all (renewed meanwhile) or already resolved."""
        return decode_resolution(await self._run(self._resolve, expire_call(self.keys, hold, now=now_ms())))

    async def heartbeat(self, beats: Sequence[tuple[Hold, bytes]], *, hold_ttl_ms: int) -> int:
        """Renew live holds for another ``hold_ttl_ms`` and record each one's progress:
        one script call per shard, sent together; returns the holds renewed."""
        by_shard: dict[int, list[tuple[Hold, bytes]]] = {}
        for beat in beats:
            by_shard.setdefault(shard_of(beat[0].account), []).append(beat)
        expiry = now_ms() + hold_ttl_ms
        calls = [heartbeat_call(self.keys, shard, expiry_ms=expiry) for shard in by_shard.values()]
        renewed = await asyncio.gather(*(self._hot(self._heartbeat, call) for call in calls))
        return sum(int(n) for n in renewed)

    async def run_settlement(self, call: ScriptCall) -> Resolution | None:
        """Send one settlement (e.g. a spooled one) as it is; None if it was a duplicate."""
        return decode_resolution(await self._hot(self._resolve, call))

    async def resend(self, call: ScriptCall) -> Resolution | None:
        """Send a settlement Redis answered before again (after a failover); None if the
        first went through. Not remembered, and a failure asks for no other resend."""
        return decode_resolution(await self._run(self._resolve, call))

    async def _settle(self, hold: Hold, call: ScriptCall) -> Resolution | None:
        # The provider has billed the request: a Redis blip must not lose the charge. The
        # script resolves a hold once, so retrying is safe; a "dup" after a retry means an
        # earlier attempt went through and only its reply was lost. A Redis that does not
        # answer within SETTLE_SECONDS in all sends it to the spool, so the answer is not held up.
        retried = False
        try:
            async with asyncio.timeout(SETTLE_SECONDS):
                for pause in RESOLVE_RETRY_PAUSES:
                    try:
                        reply = await self._hot(self._resolve, call)
                        break
                    except TRANSIENT_ERRORS:
                        if pause is None:
                            raise
                        retried = True
                        await asyncio.sleep(pause)
        except (*TRANSIENT_ERRORS, TimeoutError) as exc:
            if self.spool is None:
                if isinstance(exc, TimeoutError):
                    raise RedisTimeoutError(f"no reply within {SETTLE_SECONDS} s") from None
                raise
            await self.spool.keep(hold.id, call)
            return None
        if self.recent is not None:
            self.recent.sent(hold.id, call)
        resolved = decode_resolution(reply)
        if resolved is not None:
            return resolved
        account = await self.account(hold.account)
        if account is None:
            raise NoAccountError(hold.account)
        return Resolution(not retried, account.balance, account.held, account.tokens, account.requests)

    # money outside requests -----------------------------------------------------------
    async def open_account(self, user_id: str, *, tier: str, allowance: int, cycle: Cycle) -> bool:
        """Create the account with its first cycle's allowance; False if it already exists."""
        call = open_call(self.keys, user_id, tier=tier, allowance=allowance, cycle=cycle, now=now_ms())
        return decode_grant(await self._run(self._grant, call)) is not None

    async def credit(
        self, user_id: str, *, amount: int, kind: EntryKind, reason: str, event_id: str | None = None, tier: str = ""
    ) -> int | None:
        """Add (negative: remove) ``amount`` µ$ once per ``event_id``, optionally moving the
        account to ``tier``; the new balance, or None if the event was already applied."""
        call = credit_call(
            self.keys,
            user_id,
            amount=amount,
            kind=kind,
            reason=reason,
            event_id=event_id or new_id(kind.value),
            tier=tier,
            now=now_ms(),
        )
        return decode_grant(await self._run(self._grant, call))

    async def start_cycle(
        self, user_id: str, *, tier: str, allowance: int, cycle: Cycle, event_id: str, reason: str, rollover: bool = False
    ) -> int | None:
        """Begin ``cycle`` once per ``event_id``: balance to the allowance (plus a positive
        balance if ``rollover``), usage counters to zero; None if already applied."""
        call = cycle_call(
            self.keys,
            user_id,
            tier=tier,
            allowance=allowance,
            cycle=cycle,
            event_id=event_id,
            reason=reason,
            rollover=rollover,
            now=now_ms(),
        )
        return decode_grant(await self._run(self._grant, call))

    async def set_status(self, user_id: str, status: AccountStatus) -> None:
        """Mark the account active, past due or suspended (the last is refused at admission);
        :class:`NoAccountError` if there is no account."""
        if not await self._status(keys=[self.keys.account(user_id)], args=[status.value]):
            raise NoAccountError(user_id)

    async def restore(
        self,
        account: Account,
        *,
        force: bool = False,
        settled_holds: Sequence[str] = (),
        applied_events: Sequence[str] = (),
        last_order: int = 0,
    ) -> bool:
        """Write an account rebuilt from Postgres, stamped as rebuilt now (the rate window
        empty; ``held`` and ``open_holds`` those of its holds still pending in Redis), with
        ``settled_holds`` (holds Postgres shows charged or voided lately) and
        ``applied_events`` (grants, refunds and resets Postgres has) marked so their replays
        are duplicates; False if it exists and ``force`` is not set. Its shard's stream is
        raised past ``last_order`` (the stream order of the last entry Postgres has), so new
        entries sort after every old one."""
        user_id = account.user_id
        fields = {k: v for k, v in account.as_json().items() if k not in ("held", "open_holds")}
        fields |= {"auto_renew": "1" if account.auto_renew else "0", "rebuilt": now_ms()}
        fields |= {"rpm_win": 0, "rpm_cur": 0, "rpm_prev": 0}
        pairs = [str(v) for item in fields.items() for v in item]
        keys = self.keys
        markers = [keys.lost_hold(user_id, hold_id) for hold_id in settled_holds]
        markers += [keys.applied_marker(user_id, event_id) for event_id in applied_events]
        args: list[Arg] = ["force" if force else "", len(settled_holds), LOST_HOLD_TTL_MS, MARKER_TTL_MS]
        args += [entry_id(last_order) if last_order else "", user_id, *pairs]
        reply = await self._restore(keys=[keys.account(user_id), keys.stream(user_id), keys.holds(user_id), *markers], args=args)
        return text(reply) == "restored"

    # reads ----------------------------------------------------------------------------
    async def account(self, user_id: str) -> Account | None:
        """The account as Redis holds it, or None."""
        raw = await self.redis.hgetall(self.keys.account(user_id))
        return Account.from_hash(user_id, {text(k): text(v) for k, v in raw.items()}) if raw else None

    async def snapshot(self, user_id: str) -> Snapshot:
        """The account (None if missing), its shard's pending holds with their expiry (ms), and
        the stream order its shard's ledger had reached, all read at one instant."""
        keys = self.keys
        raw, holds, last = await self._snapshot(keys=[keys.account(user_id), keys.holds(user_id), keys.stream(user_id)], args=[])
        fields = {text(raw[i]): text(raw[i + 1]) for i in range(0, len(raw), 2)}
        pending = [(Hold.from_member(text(holds[i])), int(float(holds[i + 1]))) for i in range(0, len(holds), 2)]
        order = stream_order(text(last)) if last else None
        return Snapshot(Account.from_hash(user_id, fields) if fields else None, pending, order)

    async def expired_holds(self, holds_key: str, now: int, limit: int = 200) -> list[Hold]:
        """Holds in one shard's zset whose expiry has passed."""
        members = cast(list[bytes], await self.redis.zrangebyscore(holds_key, "-inf", now, start=0, num=limit))
        holds = []
        for member in map(text, members):
            try:
                holds.append(Hold.from_member(member))
            except ValueError:  # not written by this code: leave it for an operator, keep sweeping
                log.error("holds set %s has a member that is not a hold: %r", holds_key, member)
        return holds
