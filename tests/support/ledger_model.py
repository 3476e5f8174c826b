"""A plain-Python model of the ledger scripts, and a reader of what they keep in Redis, for
the property tests of :mod:`tests.test_ledger_properties`.

The model says, with Python's unbounded integers, what each :class:`proxy.ledger.Ledger`
call should answer and leave behind: every account's numbers, its pending holds (expiry and
progress record), the event ids already applied and the ledger entries each account's
stream should hold, in order. :func:`read_state` reads the same things back from Redis.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from proxy.ledger import (
    Account,
    AccountStatus,
    Admission,
    Cycle,
    CycleLimits,
    EntryKind,
    Hold,
    Ledger,
    LedgerEntry,
    NoAccountError,
    Policy,
    Refusal,
    Renewal,
    Resolution,
    UsageWarning,
    decode_entry,
    shard_of,
)

#: how ``resolve.lua`` reads a progress record (``string.match(record, '^(%d+) (%d+) (.+)$')``)
_RECORD = re.compile(rb"([0-9]+) ([0-9]+) (.+)", re.DOTALL)
#: a ledger entry as the tests compare it: (kind, id, amount, balance after, hold id, cycle)
#: for a money movement, ("warning", metric, used, limit) for a usage warning
Entry = tuple[Any, ...]
METRICS = ("credits", "tokens", "requests")
#: resolve.lua's LOST_WINDOW_MS: a hold placed this recently (by Redis's clock) and posted
#: though never admitted or resolved here is charged
LOST_WINDOW_MS = 60_000


def unlimited(limit: int | None) -> int:
    return -1 if limit is None else limit


def parse_record(record: bytes) -> tuple[int, int, bytes] | None:
    """(cost, tokens, usage JSON) of a progress record, or None where ``resolve.lua`` finds none."""
    found = _RECORD.fullmatch(record)
    return (int(found[1]), int(found[2]), found[3]) if found else None


def entry_of(entry: LedgerEntry | UsageWarning) -> Entry:
    """A decoded stream entry as the model writes it down."""
    if isinstance(entry, UsageWarning):
        return ("warning", entry.metric, entry.used, entry.limit)
    return (entry.kind.value, entry.id, entry.amount, entry.balance, entry.hold_id, entry.cycle)


@dataclass
class Pending:
    """A hold that is placed and not yet resolved."""

    hold: Hold
    expiry: int
    record: bytes


@dataclass
class AccountModel:
    user: str
    tier: str
    limits: CycleLimits
    balance: int
    cycle: Cycle
    status: AccountStatus = AccountStatus.ACTIVE
    tokens: int = 0
    requests: int = 0
    cost: int = 0
    warned: set[str] = field(default_factory=set)
    pending: dict[str, Pending] = field(default_factory=dict)
    #: hold id -> "charge" | "void": how each hold was resolved (once)
    resolved: dict[str, str] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)
    #: the largest hold ever admitted: a lenient account may go this far below zero (less 1)
    largest_hold: int = 0

    @property
    def held(self) -> int:
        return sum(p.hold.amount for p in self.pending.values())

    @property
    def open_holds(self) -> int:
        return len(self.pending)

    def as_account(self) -> Account:
        return Account(
            user_id=self.user,
            tier=self.tier,
            status=self.status,
            balance=self.balance,
            held=self.held,
            open_holds=self.open_holds,
            tokens=self.tokens,
            requests=self.requests,
            cost=self.cost,
            cycle_start=self.cycle.start_ms,
            cycle_end=self.cycle.end_ms,
            auto_renew=self.cycle.auto_renew,
        )

    def within_bounds(self, balance: int, held: int) -> bool:
        """The bound the admission policy keeps while every hold is posted at most its
        amount: strict, balance − held ≥ 0 (so the balance never goes below zero);
        lenient, balance − held ≥ 1 − the largest hold (below zero by less than one hold)."""
        if self.limits.policy is Policy.STRICT:
            return balance - held >= 0
        return balance - held >= min(0, 1 - self.largest_hold)

    def _new_cycle(self, balance: int, cycle: Cycle) -> None:
        self.balance, self.tokens, self.requests, self.cost = balance, 0, 0, 0
        self.warned.clear()
        self.cycle = cycle


class LedgerModel:
    """What the ledger should hold after each call, worked out in Python."""

    def __init__(self) -> None:
        self.accounts: dict[str, AccountModel] = {}
        #: (shard, event id) of every grant event applied (``grant.lua``'s markers)
        self.markers: set[tuple[int, str]] = set()

    def _account(self, user: str) -> AccountModel:
        if user not in self.accounts:
            raise NoAccountError(user)
        return self.accounts[user]

    def open(self, user: str, *, tier: str, limits: CycleLimits, allowance: int, cycle: Cycle) -> bool:
        if (shard_of(user), f"open_{user}") in self.markers:
            return False
        self.markers.add((shard_of(user), f"open_{user}"))
        acct = self.accounts[user] = AccountModel(user, tier, limits, allowance, cycle)
        acct.entries.append(("grant", f"open_{user}", allowance, allowance, None, cycle))
        return True

    # requests -----------------------------------------------------------------------------
    def admit(
        self,
        hold: Hold,
        *,
        tier: str,
        limits: CycleLimits,
        hold_ttl_ms: int,
        renewal: Renewal,
        progress: bytes,
        now: int,
    ) -> tuple[Admission, bool]:
        """The admission ``admit.lua`` answers, and whether it renewed the account's cycle."""
        acct = self.accounts.get(hold.account)
        if acct is None:
            return Admission(Refusal.NO_ACCOUNT), False
        if acct.tier != tier:
            return Admission(Refusal.TIER_CHANGED, actual_tier=acct.tier), False
        if acct.status is AccountStatus.SUSPENDED:
            return Admission(Refusal.SUSPENDED), False
        renewed = acct.cycle.auto_renew and now >= acct.cycle.end_ms
        if renewed:
            if renewal.cycle_ms > 0:
                start = acct.cycle.end_ms + (now - acct.cycle.end_ms) // renewal.cycle_ms * renewal.cycle_ms
                end = start + renewal.cycle_ms
            else:
                start, end = renewal.month_start_ms, renewal.month_end_ms
            delta = limits.allowance - acct.balance
            acct._new_cycle(limits.allowance, Cycle(start, end, True))
            acct.entries.append(("reset", f"reset_{acct.user}_{start}", delta, acct.balance, None, acct.cycle))
        ends = acct.cycle.end_ms
        if limits.monthly_tokens is not None and acct.tokens >= limits.monthly_tokens:
            return Admission(Refusal.TOKENS, cycle_end_ms=ends), renewed
        if limits.monthly_requests is not None and acct.requests + acct.open_holds >= limits.monthly_requests:
            return Admission(Refusal.REQUESTS, cycle_end_ms=ends), renewed
        available = acct.balance - acct.held
        fits = available >= hold.amount if limits.policy is Policy.STRICT else available > 0
        if not fits:
            return Admission(Refusal.CREDITS, balance=acct.balance, held=acct.held, cycle_end_ms=ends), renewed
        acct.pending[hold.id] = Pending(hold, now + hold_ttl_ms, progress)
        acct.largest_hold = max(acct.largest_hold, hold.amount)
        return Admission(balance=acct.balance, held=acct.held, tokens=acct.tokens, requests=acct.requests), renewed

    def heartbeat(self, beats: Iterable[tuple[Hold, bytes]], *, expiry: int) -> int:
        renewed = 0
        for hold, record in beats:
            acct = self.accounts.get(hold.account)
            pending = acct.pending.get(hold.id) if acct else None
            if pending is not None and pending.hold.member == hold.member:
                pending.expiry, pending.record = expiry, record
                renewed += 1
        return renewed

    def settle(
        self,
        hold: Hold,
        mode: str,
        *,
        now: int,
        cost: int = 0,
        tokens: int = 0,
        limits: CycleLimits | None = None,
    ) -> Resolution | None:
        """What ``resolve.lua`` does with a post, void or expire of ``hold``: the account
        after it, or None for a duplicate (or, for expire, a hold still alive)."""
        acct = self._account(hold.account)
        pending = acct.pending.get(hold.id)
        if pending is None or pending.hold.member != hold.member:
            # resolve.lua charges a post of a hold placed in the last minute (by the real clock)
            # and never resolved here: its admission was lost (a failover)
            recent = time.time() * 1000 - hold.placed_at < LOST_WINDOW_MS
            if mode != "post" or not recent or hold.id in acct.resolved:
                return None
            return self._charge(acct, hold, cost=cost, tokens=tokens, limits=limits)
        if mode == "expire":
            if pending.expiry > now:
                return None
            parsed = parse_record(pending.record)
            mode, limits = ("post", None) if parsed else ("void", None)
            cost, tokens = parsed[:2] if parsed else (0, 0)
        del acct.pending[hold.id]
        if mode == "post":
            return self._charge(acct, hold, cost=cost, tokens=tokens, limits=limits)
        acct.entries.append(("void", f"void_{hold.id}", 0, acct.balance, hold.id, None))
        acct.resolved[hold.id] = "void"
        return Resolution(False, acct.balance, acct.held, acct.tokens, acct.requests, posted=False)

    def _charge(self, acct: AccountModel, hold: Hold, *, cost: int, tokens: int, limits: CycleLimits | None) -> Resolution:
        acct.balance -= cost
        acct.tokens += tokens
        acct.requests += 1
        acct.cost += cost
        acct.entries.append(("charge", f"chg_{hold.id}", -cost, acct.balance, hold.id, None))
        if limits is not None:
            self._warn(acct, limits)
        acct.resolved[hold.id] = "charge"
        return Resolution(False, acct.balance, acct.held, acct.tokens, acct.requests, posted=True)

    @staticmethod
    def _warn(acct: AccountModel, limits: CycleLimits) -> None:
        checks = (
            ("credits", limits.allowance - acct.balance, limits.allowance),
            ("tokens", acct.tokens, unlimited(limits.monthly_tokens)),
            ("requests", acct.requests, unlimited(limits.monthly_requests)),
        )
        for metric, used, limit in checks:
            if limit > 0 and used * 1000 >= limit * limits.warning_permille and metric not in acct.warned:
                acct.warned.add(metric)
                acct.entries.append(("warning", metric, used, limit))

    # money outside requests ---------------------------------------------------------------
    def credit(self, user: str, *, amount: int, kind: EntryKind, event_id: str) -> int | None:
        if (shard_of(user), event_id) in self.markers:
            return None
        acct = self._account(user)
        self.markers.add((shard_of(user), event_id))
        acct.balance += amount
        acct.entries.append((kind.value, event_id, amount, acct.balance, None, None))
        return acct.balance

    def start_cycle(self, user: str, *, tier: str, allowance: int, cycle: Cycle, event_id: str, rollover: bool) -> int | None:
        if (shard_of(user), event_id) in self.markers:
            return None
        acct = self._account(user)
        self.markers.add((shard_of(user), event_id))
        balance = allowance + (acct.balance if rollover and acct.balance > 0 else 0)
        delta = balance - acct.balance
        acct._new_cycle(balance, cycle)
        acct.tier = tier or acct.tier
        acct.entries.append(("reset", event_id, delta, balance, None, cycle))
        return balance

    def set_status(self, user: str, status: AccountStatus) -> None:
        self._account(user).status = status


# what Redis holds ---------------------------------------------------------------------------
@dataclass
class AccountState:
    account: Account
    #: the ``warned_*`` flags set this cycle
    warned: set[str]


@dataclass
class ShardState:
    #: holds zset: member -> expiry ms
    holds: dict[str, int]
    #: progress hash: hold id -> record
    progress: dict[str, bytes]
    entries: list[LedgerEntry | UsageWarning]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def read_state(ledger: Ledger, users: Iterable[str]) -> tuple[dict[str, AccountState | None], dict[int, ShardState]]:
    """Every account of ``users`` and every key of their shards, read in one round trip."""
    users = sorted(set(users))
    shards = sorted({shard_of(u) for u in users})
    representative = {shard_of(u): u for u in users}
    pipe = ledger.redis.pipeline(transaction=False)
    for user in users:
        pipe.hgetall(ledger.keys.account(user))
    for shard in shards:
        user = representative[shard]
        pipe.zrange(ledger.keys.holds(user), 0, -1, withscores=True)
        pipe.hgetall(ledger.keys.progress(user))
        pipe.xrange(ledger.keys.stream(user))
    replies = await pipe.execute()
    accounts: dict[str, AccountState | None] = {}
    for user, raw in zip(users, replies, strict=False):
        fields = {_text(k): _text(v) for k, v in raw.items()}
        warned = {name.removeprefix("warned_") for name in fields if name.startswith("warned_")}
        accounts[user] = AccountState(Account.from_hash(user, fields), warned) if fields else None
    state: dict[int, ShardState] = {}
    rest = replies[len(users) :]
    for n, shard in enumerate(shards):
        members, progress, stream = rest[3 * n : 3 * n + 3]
        state[shard] = ShardState(
            holds={_text(m): int(score) for m, score in members},
            progress={_text(k): v for k, v in progress.items()},
            entries=[decode_entry({_text(k): _text(v) for k, v in f.items()}, _text(i)) for i, f in stream],
        )
    return accounts, state


async def dump_prefix(redis: Redis, prefix: str) -> dict[bytes, bytes | None]:
    """Every key under ``prefix`` with its serialized value: equal dumps, nothing changed."""
    keys = sorted([key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)])
    return dict(zip(keys, [await redis.dump(key) for key in keys], strict=True))
