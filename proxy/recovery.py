"""Redis against the Postgres ledger: ``costproxy ledger check`` and ``ledger rebuild``.

Postgres holds every money movement (grants, charges, voids, resets, refunds) in the order
Redis applied them (``stream_order``), with the bounds of every cycle started; so any
account's balance, cycle and cycle counters can be derived from it. :func:`check` compares
that with what Redis holds, to the micro-dollar; :func:`rebuild` writes it back into a
Redis that lost its data.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import asyncpg

from .accounts import sync_key_mirror
from .keys import KeyMirror
from .ledger import Account, AccountStatus, Hold, Ledger, now_ms
from .ledger.events import entry_id
from .ledger.grant import MARKER_TTL_MS
from .ledger.ledger import LOST_HOLD_TTL_MS, Snapshot
from .ledger.scripts import text
from .tiers import TiersFile

#: a hold expired longer ago than this and still pending means the expiry sweep is not running
HOLD_GRACE_MS = 30_000

# An account's ledger up to a point of its shard's stream ($2/$3: user ids and the stream
# order to stop at; users not listed: everything).
_STATE_SQL = """
WITH users AS (
    SELECT id, tier, status FROM users WHERE $1::text IS NULL OR id = $1 OR email = $1
), bounds AS (
    SELECT * FROM unnest($2::text[], $3::bigint[]) AS b(user_id, upto)
), entries AS (
    SELECT l.* FROM ledger l JOIN users u ON u.id = l.user_id LEFT JOIN bounds b ON b.user_id = l.user_id
    WHERE b.upto IS NULL OR l.stream_order <= b.upto
), money AS (
    SELECT user_id, sum(amount_micro)::bigint AS balance,
           count(*) FILTER (WHERE kind = 'charge') AS charges,
           coalesce(sum(-amount_micro) FILTER (WHERE kind = 'charge'), 0)::bigint AS charged
    FROM entries GROUP BY user_id
), usage AS (
    SELECT e.user_id, count(*) AS usage_rows, sum(e.cost_micro)::bigint AS usage_cost
    FROM usage_events e JOIN entries l ON l.id = e.id GROUP BY e.user_id
), cycles AS (
    SELECT DISTINCT ON (user_id) user_id, stream_order, cycle_start, cycle_end, auto_renew
    FROM entries WHERE cycle_start IS NOT NULL ORDER BY user_id, stream_order DESC
), this_cycle AS (
    SELECT c.user_id, count(l.id) AS requests, coalesce(sum(-l.amount_micro), 0)::bigint AS cost,
           coalesce(sum(e.input_tokens + e.cached_input_tokens + e.cache_write_tokens + e.output_tokens), 0)::bigint AS tokens
    FROM cycles c
    LEFT JOIN entries l ON l.user_id = c.user_id AND l.kind = 'charge' AND l.stream_order > c.stream_order
    LEFT JOIN usage_events e ON e.id = l.id
    GROUP BY c.user_id
)
SELECT u.id, u.tier, u.status, coalesce(m.balance, 0) AS balance, coalesce(m.charges, 0) AS charges,
       coalesce(m.charged, 0) AS charged, coalesce(g.usage_rows, 0) AS usage_rows, coalesce(g.usage_cost, 0) AS usage_cost,
       c.cycle_start, c.cycle_end, c.auto_renew, coalesce(t.requests, 0) AS requests, coalesce(t.cost, 0) AS cost,
       coalesce(t.tokens, 0) AS tokens
FROM users u
LEFT JOIN money m ON m.user_id = u.id
LEFT JOIN usage g ON g.user_id = u.id
LEFT JOIN cycles c ON c.user_id = u.id
LEFT JOIN this_cycle t ON t.user_id = u.id
ORDER BY u.id
"""


def _ms(at: datetime | None) -> int:
    return int(at.timestamp() * 1000) if at is not None else 0


@dataclass(frozen=True)
class LedgerState:
    """One account as the Postgres ledger tells it."""

    account: Account
    charges: int
    charged: int
    usage_rows: int
    usage_cost: int
    #: the ledger records the start of the running cycle
    has_cycle: bool


async def ledger_states(pool: asyncpg.Pool, user: str | None = None, upto: Mapping[str, int] | None = None) -> list[LedgerState]:
    """Every user's account derived from Postgres (or the one with id or email ``user``),
    from the ledger entries up to ``upto[user_id]`` (a stream order) where given."""
    bounds = dict(upto or {})
    states = []
    for row in await pool.fetch(_STATE_SQL, user, list(bounds), list(bounds.values())):
        account = Account(
            user_id=row["id"], tier=row["tier"], status=AccountStatus(row["status"]), balance=row["balance"], held=0,
            open_holds=0, tokens=row["tokens"], requests=row["requests"], cost=row["cost"],
            cycle_start=_ms(row["cycle_start"]), cycle_end=_ms(row["cycle_end"]), auto_renew=bool(row["auto_renew"]),
        )  # fmt: skip
        has_cycle = row["cycle_start"] is not None
        states.append(LedgerState(account, row["charges"], row["charged"], row["usage_rows"], row["usage_cost"], has_cycle))
    return states


async def unwritten_events(ledger: Ledger) -> int:
    """Ledger events in the Redis streams that the worker has not written to Postgres yet."""
    lengths = await asyncio.gather(*(ledger.redis.xlen(stream) for stream in ledger.keys.streams()))
    return sum(lengths)


async def _unwritten_upto(ledger: Ledger, stream: str, upto: int) -> int:
    """Entries of ``stream`` up to the stream order ``upto`` not yet written (the worker deletes
    what it wrote)."""
    if not upto:
        return 0
    entries = await ledger.redis.xrange(stream, "-", entry_id(upto))
    return len(entries or [])


async def _holds_of_no_user(ledger: Ledger, known: set[str]) -> dict[str, int]:
    """Pending holds of accounts Postgres has no user for, by account."""
    found: dict[str, int] = defaultdict(int)
    for key in ledger.keys.holds_sets():
        for member in cast(list[bytes], await ledger.redis.zrange(key, 0, -1)):
            hold = Hold.from_member(text(member))
            if hold.account not in known:
                found[hold.account] += 1
    return found


@dataclass(frozen=True)
class Difference:
    """Something Redis and Postgres disagree on (``user`` empty: the ledger as a whole)."""

    user: str
    what: str
    redis: int | str | None
    postgres: int | str | None

    def line(self) -> str:
        delta = f"  ({self.redis - self.postgres:+,})" if isinstance(self.redis, int) and isinstance(self.postgres, int) else ""
        return f"{self.user or '-':<26} {self.what:<18} redis {self.redis!s:>16}  postgres {self.postgres!s:>16}{delta}"


@dataclass
class CheckReport:
    """What :func:`check` compared and found."""

    accounts: int = 0
    unwritten_events: int = 0
    differences: list[Difference] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.differences

    def as_json(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "accounts": self.accounts,
            "unwritten_events": self.unwritten_events,
            "differences": [vars(d) for d in self.differences],
        }


async def check(ledger: Ledger, pool: asyncpg.Pool, *, user: str | None = None, wait: float = 30.0) -> CheckReport:
    """Compare every account (or ``user``'s) in Redis with the Postgres ledger: balance =
    ledger sum; held and open holds = the pending holds; this cycle's tokens, requests and
    cost = its ledger; one usage row per charge, of the same cost; no hold long past its
    expiry; no hold of an account Postgres does not know.

    Each account is read at one instant together with how far its shard's stream had got
    (:meth:`Ledger.snapshot`) and compared with Postgres up to exactly that entry, once the
    worker has written it (waiting up to ``wait`` s): so the check holds under live traffic."""
    report = CheckReport()
    users = [row["id"] for row in await pool.fetch("SELECT id FROM users WHERE $1::text IS NULL OR id = $1 OR email = $1", user)]
    snapshots = {user_id: await ledger.snapshot(user_id) for user_id in users}
    by_stream: dict[str, int] = defaultdict(int)
    for user_id, snap in snapshots.items():
        stream = ledger.keys.stream(user_id)
        by_stream[stream] = max(by_stream[stream], snap.upto or 0)
    deadline = time.monotonic() + wait
    while True:
        behind = sum(await asyncio.gather(*(_unwritten_upto(ledger, s, upto) for s, upto in by_stream.items())))
        if not behind or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.2)
    report.unwritten_events = await unwritten_events(ledger)
    if behind:
        report.differences.append(Difference("", "unwritten_events", behind, 0))
    bounds = {user_id: snap.upto for user_id, snap in snapshots.items() if snap.upto is not None}
    states = await ledger_states(pool, user, bounds)
    report.accounts = len(states)
    now = now_ms()
    for state in states:
        report.differences += _compare(state, snapshots[state.account.user_id], now)
    if user is None:
        orphans = await _holds_of_no_user(ledger, set(users))
        report.differences += [Difference(account, "holds_of_no_user", n, None) for account, n in orphans.items()]
    return report


def _compare(state: LedgerState, snap: Snapshot, now: int) -> list[Difference]:
    want, user = state.account, state.account.user_id
    found: list[Difference] = []
    if state.usage_rows != state.charges:
        found.append(Difference(user, "usage_rows", state.usage_rows, state.charges))
    if state.usage_cost != state.charged:
        found.append(Difference(user, "usage_cost", state.usage_cost, state.charged))
    have = snap.account
    if have is None:
        return [*found, Difference(user, "account", "missing", want.balance)]
    holds = [(hold, expiry) for hold, expiry in snap.shard_holds if hold.account == user]
    pairs = [
        ("balance", have.balance, want.balance),
        ("held", have.held, sum(hold.amount for hold, _ in holds)),
        ("open_holds", have.open_holds, len(holds)),
    ]
    if state.has_cycle:
        pairs += [
            ("tokens", have.tokens, want.tokens),
            ("requests", have.requests, want.requests),
            ("cost", have.cost, want.cost),
        ]
    found += [Difference(user, what, got, expected) for what, got, expected in pairs if got != expected]
    late = [hold.id for hold, expiry in holds if expiry < now - HOLD_GRACE_MS]
    if late:
        found.append(Difference(user, "holds_past_expiry", len(late), 0))
    return found


@dataclass
class _Done:
    """What Postgres shows one account has had done, whose replay must be a duplicate."""

    #: holds charged or voided within a day (a spool may still replay their settlement)
    settled_holds: list[str] = field(default_factory=list)
    #: grants, refunds and resets (by event id) within the time grant.lua remembers them
    applied_events: list[str] = field(default_factory=list)


async def _done(pool: asyncpg.Pool, user: str | None) -> dict[str, _Done]:
    """By user, what Redis must remember as done once it is rebuilt."""
    rows = await pool.fetch(
        "SELECT l.user_id, l.id, l.hold_id FROM ledger l JOIN users u ON u.id = l.user_id"
        " WHERE ($1::text IS NULL OR u.id = $1 OR u.email = $1) AND CASE WHEN l.hold_id IS NULL"
        " THEN l.created_at > now() - make_interval(secs => $3) ELSE l.created_at > now() - make_interval(secs => $2) END",
        user,
        LOST_HOLD_TTL_MS / 1000,
        MARKER_TTL_MS / 1000,
    )
    done: dict[str, _Done] = defaultdict(_Done)
    for row in rows:
        if row["hold_id"] is None:
            done[row["user_id"]].applied_events.append(row["id"])
        else:
            done[row["user_id"]].settled_holds.append(row["hold_id"])
    return done


async def _drop_unwritten(ledger: Ledger, users: set[str]) -> int:
    """Delete the stream entries of ``users`` the worker has not written: a forced rebuild
    replaces their accounts with what Postgres has, and those entries written afterwards
    would make the two disagree. The number deleted."""
    dropped = 0
    for stream in {ledger.keys.stream(user_id) for user_id in users}:
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await ledger.redis.xrange(stream))
        ids = [entry_id for entry_id, fields in entries if text(fields.get(b"user", b"")) in users]
        if ids:
            dropped += await ledger.redis.xdel(stream, *ids)
    return dropped


class RebuildRefusedError(Exception):
    """Rebuilding now would lose or double money; the message says why and what to do."""


@dataclass
class RebuildReport:
    """What :func:`rebuild` did."""

    restored: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    balance: int = 0
    keys: int = 0
    #: ledger events deleted from the streams unwritten (``force``)
    dropped: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "restored": self.restored,
            "kept_existing": self.kept,
            "balance_micro": self.balance,
            "keys_mirrored": self.keys,
            "dropped_events": self.dropped,
        }


async def rebuild(
    ledger: Ledger, pool: asyncpg.Pool, mirror: KeyMirror, tiers: TiersFile, *, user: str | None = None, force: bool = False
) -> RebuildReport:
    """Write every account (or ``user``'s) back into Redis from the Postgres ledger, and the
    key mirror. Accounts Redis still has are kept unless ``force``; refuses while the
    streams hold events Postgres does not have yet (they would be lost), unless ``force``,
    which deletes those of the accounts it rebuilds."""
    waiting = await unwritten_events(ledger)
    if waiting and not force:
        raise RebuildRefusedError(
            f"{waiting} ledger events in Redis are not in Postgres yet: start the worker and let it write them "
            "(`costproxy ledger check` shows them), or rebuild with --force to drop them"
        )
    report = RebuildReport()
    states = await ledger_states(pool, user)
    if waiting:
        report.dropped = await _drop_unwritten(ledger, {state.account.user_id for state in states})
    done = await _done(pool, user)
    last_order = await pool.fetchval("SELECT coalesce(max(stream_order), 0) FROM ledger")
    for state in states:
        account = state.account
        if not state.has_cycle:  # no cycle recorded: start one now, as a new account would
            start = now_ms()
            account = Account(**{**vars(account), "cycle_start": start, "cycle_end": tiers.cycle_end(start), "auto_renew": True})
        marked = done.get(account.user_id, _Done())
        restored = await ledger.restore(
            account,
            force=force,
            settled_holds=marked.settled_holds,
            applied_events=marked.applied_events,
            last_order=last_order,
        )
        if restored:
            report.restored.append(account.user_id)
            report.balance += account.balance
        else:
            report.kept.append(account.user_id)
    report.keys = await sync_key_mirror(pool, mirror)
    return report
