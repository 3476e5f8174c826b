"""Property tests of the money scripts: random interleavings of every ledger operation, run
against the real Redis through :class:`proxy.ledger.Ledger` (the code the proxy uses), with
the invariants of README "How money works" checked after every step.

A Hypothesis state machine drives 1-3 accounts (lenient and strict tiers, small balances so
refusals happen) through admissions, heartbeats, posts, voids, expiries, grants, new cycles,
settlements sent twice (a lost reply), status changes, calls with out-of-range amounts and
the passing of time. The clock the ledger gives its scripts is the machine's, so expiries
and cycle renewals are deterministic; Redis and the scripts are real. After every step:

- each account equals a plain-Python model of it (``tests/support/ledger_model.py``):
  balance, held, open holds, counters, cycle, warnings, its holds and its ledger entries;
- ``held`` is the sum of the account's holds in its shard's holds zset, ``open_holds`` their
  count, and the progress hash has an entry exactly for each pending hold;
- the balance is the sum of the account's ledger entries (and each entry's ``balance`` is
  the running sum): every movement is an entry with an exact integer amount;
- every hold is resolved at most once: one charge or void entry, and a second post, void or
  expire of it is a duplicate that moves nothing;
- while every hold is posted at most its amount, a strict account keeps balance − held ≥ 0
  (so its balance never goes below zero) and a lenient one keeps it above −(one hold).

Each example works under its own key prefix. The run is derandomized so CI is deterministic;
``LEDGER_PROPERTIES_EXAMPLES=500 pytest tests/test_ledger_properties.py --hypothesis-seed=7
--timeout=0`` explores other interleavings (about 10 s per 100 examples).

The tests at the end are regression tests: each reproduces a way the scripts once broke one
of these properties and pins the fixed behaviour (see their docstrings).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import hypothesis
import pytest
from hypothesis import HealthCheck, event, note
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis
from redis.exceptions import ResponseError

import proxy.ledger.ledger as ledger_module
from proxy.ledger import (
    MAX_AMOUNT,
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
    Renewal,
    Resolution,
    UsageEvent,
    decode_entry,
    progress_record,
    shard_of,
)
from proxy.ledger.grant import credit_call
from proxy.ledger.resolve import expire_call, post_call, void_call
from proxy.settings import Settings

from .support.ledger_model import LedgerModel, dump_prefix, entry_of, parse_record, read_state

T = TypeVar("T")

BASE_MS = 1_700_000_000_000
CYCLE_MS = 100_000
#: the accounts a machine may open: eve and fay share a shard (holds zset, progress hash,
#: stream and grant markers), ann and bob have shards of their own
USERS = ("eve", "fay", "ann", "bob")
#: never opened: every call on it meets "no account"
GHOST = "zed"
LENIENT = CycleLimits(
    allowance=5_000, monthly_tokens=None, monthly_requests=None, rpm=None, policy=Policy.LENIENT, warning_permille=800
)
STRICT = CycleLimits(
    allowance=3_000, monthly_tokens=3_000_000, monthly_requests=4, rpm=None, policy=Policy.STRICT, warning_permille=500
)
TIER = {Policy.LENIENT: "lenient", Policy.STRICT: "strict"}
#: running totals the machine keeps within (the scripts bound each argument to ±2^50, not
#: sums: see test_running_totals_beyond_2_53_stay_exact)
SUM_LIMIT = 2**51


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of the strategies, each drawn ``weight`` times as often."""
    return st.sampled_from([strategy for weight, strategy in choices for _ in range(weight)]).flatmap(lambda s: s)


EDGES = (0, 1, 2**40 - 1, 2**40, 2**40 + 1, MAX_AMOUNT - 1, MAX_AMOUNT)
#: mostly amounts small balances can hold, the account's credit left (and one µ$ either
#: side, the edge of admission), and the edges up to 2^50
AMOUNTS: st.SearchStrategy[int | str] = weighted(
    (4, st.integers(0, 2_000)),
    (2, st.sampled_from(["available", "available+1", "available-1"])),
    (1, st.sampled_from(EDGES)),
    (1, st.integers(0, 2**40)),
)
#: a post's cost: mostly all or part of the hold, or anything from 0 to 2^50
COSTS: st.SearchStrategy[int | str] = weighted(
    (4, st.sampled_from(["all", "half", "less"])),
    (1, st.integers(0, 4_000)),
    (1, st.integers(0, 2**40)),
    (1, st.sampled_from([0, 1, MAX_AMOUNT])),
)
#: tokens of a request; "rest" takes the strict tier's monthly tokens exactly to the limit
TOKENS: st.SearchStrategy[int | str] = weighted((3, st.integers(0, 1_000_000)), (1, st.just("rest")))
#: grants (mostly), refunds taking credit back, and the largest either way
CREDITS = weighted((3, st.integers(0, 6_000)), (1, st.integers(-4_000, 0)), (1, st.sampled_from([-MAX_AMOUNT, MAX_AMOUNT])))
TTLS = st.sampled_from([0, 1, 1_000, 60_000])
WAITS = st.sampled_from([0, 1, 2, 999, 1_000, 60_000, CYCLE_MS, 3 * CYCLE_MS + 7])
#: index into the opened accounts; 0 is an account that does not exist
WHO = st.integers(0, 6)


def usage(tokens: int) -> UsageEvent:
    return UsageEvent(
        key_id="key_1", provider="openai", model="gpt-x", tier="t", input_tokens=tokens // 2, output_tokens=tokens - tokens // 2
    )


RECORDS = st.builds(
    lambda cost, tokens: progress_record(cost, usage(tokens)),
    st.integers(0, 4_000) | st.integers(0, 2**40),
    st.integers(0, 1_000_000),
)
#: admission may also place a hold with no record yet (an expiry then voids it)
ADMIT_RECORDS = RECORDS | st.just(b"")
#: records the scripts refuse (an error reply that changes nothing)
MALFORMED_RECORDS = [b"garbage", b"-5 3 {}", b"1.5 3 {}", b"%d 1 {}" % (2**50 + 1)]
EVENT_IDS = st.one_of(st.sampled_from(["ev_a", "ev_b"]), st.none())  # None: a fresh one
BAD_CALLS = st.sampled_from(
    [
        ("admit", "amount", MAX_AMOUNT + 1),
        ("admit", "amount", -1),
        ("admit", "amount", 1.5),
        ("admit", "amount", math.nan),
        ("admit", "amount", math.inf),
        ("admit", "ttl", 2**51),
        ("admit", "allowance", MAX_AMOUNT + 1),
        ("admit", "monthly_tokens", 0.5),
        ("post", "cost", MAX_AMOUNT + 1),
        ("post", "cost", -1),
        ("post", "cost", 0.5),
        ("post", "tokens", -3),
        ("post", "tokens", 2**51),
        ("post", "amount", MAX_AMOUNT + 1),
        ("void", "amount", -(2**51)),
        ("void", "placed_at", 0.5),
        ("expire", "amount", 1.5),
        ("credit", "amount", MAX_AMOUNT + 1),
        ("credit", "amount", -MAX_AMOUNT - 1),
        ("credit", "amount", 0.5),
        ("credit", "amount", math.nan),
        ("cycle", "allowance", MAX_AMOUNT + 1),
        ("cycle", "allowance", 0.5),
        ("heartbeat", "ttl", 0.5),
    ]
)


class Clock:
    """The ledger's clock (``now_ms``), moved by the machine."""

    def __init__(self) -> None:
        self.now = BASE_MS

    def __call__(self) -> int:
        return self.now


@dataclass
class Env:
    runner: asyncio.Runner
    redis: Redis
    prefix: str
    clock: Clock


_EXAMPLES = itertools.count()


class LedgerMachine(RuleBasedStateMachine):
    holds = Bundle("holds")

    def __init__(self, env: Env):
        super().__init__()
        self.env = env
        env.clock.now = BASE_MS
        self.prefix = f"{env.prefix}{next(_EXAMPLES)}:"
        self.ledger = Ledger(env.redis, self.prefix)
        self.model = LedgerModel()
        self.opened: list[str] = []
        self.hold_ids = itertools.count()
        self.event_ids = itertools.count()
        #: accounts whose bound is kept (see AccountModel.within_bounds) ...
        self.bounded: dict[str, bool] = {}
        #: ... and those the last step moved outside a request or over a hold
        self.dirty: set[str] = set()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.env.runner.run(coro)

    def teardown(self) -> None:
        async def clear() -> None:
            keys = [key async for key in self.env.redis.scan_iter(match=f"{self.prefix}*", count=1000)]
            if keys:
                await self.env.redis.delete(*keys)

        self.run(clear())

    # helpers --------------------------------------------------------------------------------
    def user(self, who: int) -> str:
        return GHOST if who == 0 else self.opened[who % len(self.opened)]

    def limits(self, user: str) -> CycleLimits:
        acct = self.model.accounts.get(user)
        return acct.limits if acct else LENIENT

    def tier(self, user: str) -> str:
        acct = self.model.accounts.get(user)
        return acct.tier if acct else "lenient"

    def fits(self, user: str, change: int, spent: int = 0) -> bool:
        """Whether the account's running totals stay within SUM_LIMIT after this change."""
        acct = self.model.accounts.get(user)
        return acct is None or (abs(acct.balance + change) <= SUM_LIMIT and acct.cost + spent <= SUM_LIMIT)

    def same(self, expected: Callable[[], T], actual: Awaitable[T]) -> T | None:
        """Run the model and the ledger; both answer the same or both find no account."""
        try:
            want: tuple[str, T | None] = ("ok", expected())
        except NoAccountError:
            want = ("no account", None)

        async def call() -> tuple[str, T | None]:
            try:
                return "ok", await actual
            except NoAccountError:
                return "no account", None

        got = self.run(call())
        assert got == want
        return want[1]

    def pick(self, data: st.DataObject, hold: Hold, live: bool) -> Hold:
        """A pending hold (when ``live`` and there is one), else ``hold``: one placed,
        refused or already resolved, as the bundle has it."""
        pending = [p.hold for acct in self.model.accounts.values() for p in acct.pending.values()]
        return data.draw(st.sampled_from(pending), label="pending hold") if live and pending else hold

    def amount(self, user: str, amount: int | str) -> int:
        """A hold's amount; "available" (± 1) is the account's balance − held now."""
        if isinstance(amount, int):
            return amount
        acct = self.model.accounts.get(user)
        available = acct.balance - acct.held if acct else 0
        return min(max(available + {"available": 0, "available+1": 1, "available-1": -1}[amount], 0), MAX_AMOUNT)

    def tokens(self, user: str, tokens: int | str) -> int:
        if isinstance(tokens, int):
            return tokens
        acct = self.model.accounts.get(user)
        return max(STRICT.monthly_tokens - acct.tokens, 0) if acct else 0  # type: ignore[operator]

    def duplicate(self, user: str) -> Resolution:
        """What Ledger.post / void answer for a hold already resolved."""
        acct = self.model.accounts[user]
        return Resolution(True, acct.balance, acct.held, acct.tokens, acct.requests)

    # setup ----------------------------------------------------------------------------------
    @initialize(
        specs=st.lists(
            st.tuples(st.sampled_from(USERS), st.booleans(), st.integers(0, 6_000), st.booleans()),
            min_size=1,
            max_size=3,
            unique_by=lambda spec: spec[0],
        )
    )
    def open_accounts(self, specs: list[tuple[str, bool, int, bool]]) -> None:
        now = self.env.clock.now
        for user, strict, balance, auto_renew in specs:
            limits = STRICT if strict else LENIENT
            cycle = Cycle(now - 10, now + CYCLE_MS, auto_renew)
            tier = TIER[limits.policy]
            kwargs = {"tier": tier, "allowance": balance, "cycle": cycle}
            assert self.same(
                lambda: self.model.open(user, limits=limits, **kwargs),  # noqa: B023
                self.ledger.open_account(user, **kwargs),
            )
            self.opened.append(user)
            self.bounded[user] = True
        note(f"accounts: {[(u, self.model.accounts[u].limits.policy.value) for u in self.opened]}")

    # requests -------------------------------------------------------------------------------
    @rule(
        target=holds,
        requests=st.lists(
            st.tuples(WHO, AMOUNTS, TTLS, ADMIT_RECORDS, st.integers(0, 11).map(lambda n: n == 0), st.booleans()),
            min_size=1,
            max_size=3,
        ),
        calendar=st.booleans(),
    )
    def admit(self, requests: list[tuple[int, int | str, int, bytes, bool, bool]], calendar: bool) -> MultipleResults[Hold]:
        """Requests arrive one after the other (some priced for a tier the account left).
        Some are stamped by the real clock, which resolve.lua's lost-admission rule reads
        (Redis's ``TIME``): a post of such a hold that was refused or never placed is
        charged. The machine's own clock is years behind, so the others never are."""
        holds = []
        for who, worst_case, ttl, record, wrong_tier, real_clock in requests:
            user, now = self.user(who), self.env.clock.now
            amount = self.amount(user, worst_case)
            placed_at = time.time_ns() // 1_000_000 if real_clock else now
            hold = Hold(f"h{next(self.hold_ids)}", user, amount, placed_at=placed_at)
            tier = "other" if wrong_tier else self.tier(user)
            renewal = Renewal(0, now - 5, now + CYCLE_MS) if calendar else Renewal(CYCLE_MS)
            kwargs = {"tier": tier, "limits": self.limits(user), "hold_ttl_ms": ttl, "progress": record}
            expected, renewed = self.model.admit(hold, renewal=renewal, now=now, **kwargs)
            admission = self.run(self.ledger.admit(hold, renewal=lambda _now: renewal, **kwargs))  # noqa: B023
            assert admission == expected
            event(f"admit: {admission.refusal or 'placed'}{' after renewal' if renewed else ''}")
            if renewed:
                self.dirty.add(user)
            if admission.admitted:
                if self.limits(user).policy is Policy.STRICT:  # the worst case fitted: balance − held ≥ 0 after
                    assert admission.balance - admission.held >= 0
                else:  # there was credit left: balance − (held before) > 0
                    assert admission.balance - (admission.held - amount) > 0
            holds.append(hold)
        return multiple(*holds)

    @rule(beats=st.lists(st.tuples(holds, RECORDS), max_size=3), ttl=TTLS, data=st.data())
    def heartbeat(self, beats: list[tuple[Hold, bytes]], ttl: int, data: st.DataObject) -> None:
        pending = [p.hold for acct in self.model.accounts.values() for p in acct.pending.values()]
        if pending:
            beats += data.draw(st.lists(st.tuples(st.sampled_from(pending), RECORDS), max_size=3), label="pending beats")
        expiry = self.env.clock.now + ttl
        renewed = self.same(lambda: self.model.heartbeat(beats, expiry=expiry), self.ledger.heartbeat(beats, hold_ttl_ms=ttl))
        event(f"heartbeat: {renewed} of {len(beats)} renewed")

    def _cost(self, hold: Hold, cost: int | str) -> int:
        shares = {"all": hold.amount, "half": hold.amount // 2, "less": max(hold.amount - 1, 0)}
        value = shares[cost] if isinstance(cost, str) else cost
        if not self.fits(hold.account, -value, value):
            note(f"cost {value} of {hold.id} kept out: it would take a running total past 2^51")
            return 0
        if value > hold.amount:
            self.dirty.add(hold.account)
        return value

    def _model_post(self, hold: Hold, value: int, tokens: int, limits: CycleLimits) -> Resolution | None:
        """The model's post of ``hold``. A charge of a hold this Redis never admitted (its
        admission lost in a failover) had no reservation: the account may leave its bound."""
        acct = self.model.accounts.get(hold.account)
        unadmitted = acct is not None and hold.id not in acct.pending
        resolved = self.model.settle(hold, "post", now=self.env.clock.now, cost=value, tokens=tokens, limits=limits)
        if resolved is not None and unadmitted:
            self.dirty.add(hold.account)
            event("post: charged a hold never admitted here")
        return resolved

    @rule(hold=holds, cost=COSTS, tokens=TOKENS, data=st.data(), live=weighted((3, st.just(True)), (1, st.just(False))))
    def post(self, hold: Hold, cost: int | str, tokens: int | str, data: st.DataObject, live: bool) -> None:
        hold = self.pick(data, hold, live)
        tokens = self.tokens(hold.account, tokens)
        value, limits = self._cost(hold, cost), self.limits(hold.account)

        resolution = self.same(
            lambda: self._model_post(hold, value, tokens, limits) or self.duplicate(hold.account),
            self.ledger.post(hold, cost=value, usage=usage(tokens), limits=limits),
        )
        event(f"post: {'no account' if resolution is None else 'duplicate' if resolution.duplicate else 'charged'}")

    @rule(hold=holds, data=st.data(), live=weighted((3, st.just(True)), (1, st.just(False))))
    def void(self, hold: Hold, data: st.DataObject, live: bool) -> None:
        hold = self.pick(data, hold, live)

        def model() -> Resolution:
            return self.model.settle(hold, "void", now=self.env.clock.now) or self.duplicate(hold.account)

        resolution = self.same(model, self.ledger.void(hold, reason="upstream_error"))
        event(f"void: {'no account' if resolution is None else 'duplicate' if resolution.duplicate else 'released'}")

    def _expire_is_dirty(self, hold: Hold) -> None:
        acct = self.model.accounts.get(hold.account)
        pending = acct.pending.get(hold.id) if acct else None
        parsed = parse_record(pending.record) if pending else None
        if parsed and parsed[0] > hold.amount:
            self.dirty.add(hold.account)

    @rule(hold=holds, data=st.data(), live=weighted((3, st.just(True)), (1, st.just(False))))
    def expire(self, hold: Hold, data: st.DataObject, live: bool) -> None:
        hold = self.pick(data, hold, live)
        self._expire_is_dirty(hold)
        now = self.env.clock.now
        resolution = self.same(lambda: self.model.settle(hold, "expire", now=now), self.ledger.expire(hold))
        event(f"expire: {'alive, resolved or no account' if resolution is None else 'posted' if resolution.posted else 'voided'}")

    @rule(wait=WAITS, sweep=st.booleans())
    def time_passes(self, wait: int, sweep: bool) -> None:
        """Time passes; then, with ``sweep``, the worker expires every hold whose expiry has
        passed: each is posted at its last progress record (or voided if it has none)."""
        self.env.clock.now += wait
        if not sweep:
            return
        now = self.env.clock.now
        for shard in sorted({shard_of(user) for user in self.opened}):
            expired = self.run(self.ledger.expired_holds(self.ledger.keys.holds_sets()[shard], now))
            due = {
                p.hold.member
                for acct in self.model.accounts.values()
                for p in acct.pending.values()
                if shard_of(acct.user) == shard and p.expiry <= now
            }
            assert {hold.member for hold in expired} == due
            for hold in expired:
                self._expire_is_dirty(hold)
                resolution = self.same(lambda: self.model.settle(hold, "expire", now=now), self.ledger.expire(hold))  # noqa: B023
                assert resolution is not None
                event(f"sweep: {'posted' if resolution.posted else 'voided'}")

    @rule(
        hold=holds,
        mode=st.sampled_from(["post", "void", "expire"]),
        cost=COSTS,
        tokens=TOKENS,
        through_post=st.booleans(),
        data=st.data(),
        live=weighted((3, st.just(True)), (1, st.just(False))),
    )
    def settle_twice(
        self, hold: Hold, mode: str, cost: int | str, tokens: int | str, through_post: bool, data: st.DataObject, live: bool
    ) -> None:
        """A settlement whose reply was lost, sent again: the second one moves nothing."""
        hold = self.pick(data, hold, live)
        tokens = self.tokens(hold.account, tokens)
        now, limits = self.env.clock.now, self.limits(hold.account)
        value = self._cost(hold, cost) if mode == "post" else 0
        if mode == "expire":
            self._expire_is_dirty(hold)
        if mode == "post" and through_post:  # Ledger.post called twice: the second is a duplicate
            for _ in range(2):
                self.same(
                    lambda: self._model_post(hold, value, tokens, limits) or self.duplicate(hold.account),
                    self.ledger.post(hold, cost=value, usage=usage(tokens), limits=limits),
                )
            return
        keys = self.ledger.keys
        call = {
            "post": lambda: post_call(keys, hold, cost=value, usage=usage(tokens), limits=limits, now=now),
            "void": lambda: void_call(keys, hold, reason="retried", now=now),
            "expire": lambda: expire_call(keys, hold, now=now),
        }[mode]()
        first = self.same(
            lambda: (
                self._model_post(hold, value, tokens, limits)
                if mode == "post"
                else self.model.settle(hold, mode, now=now, cost=value, tokens=tokens, limits=limits)
            ),
            self.ledger.run_settlement(call),
        )
        second = self.same(
            lambda: self.model.settle(hold, mode, now=now, cost=value, tokens=tokens, limits=limits),
            self.ledger.run_settlement(call),
        )
        assert second is None
        event(f"settle twice ({mode}): first {'moved money' if first else 'was a duplicate'}")

    # money outside requests -----------------------------------------------------------------
    @rule(who=WHO, what=st.sampled_from(["credit", "credit", "credit", "cycle", "status"]), data=st.data())
    def outside_requests(self, who: int, what: str, data: st.DataObject) -> None:
        """A grant or refund, a new cycle, or a status change (grants the most often)."""
        user = self.user(who)
        if what == "credit":
            self.credit(user, data.draw(CREDITS, label="amount"), data.draw(EVENT_IDS, label="event id"))
        elif what == "cycle":
            self.start_cycle(
                user,
                data.draw(st.one_of(st.integers(0, 6_000), st.just(MAX_AMOUNT)), label="allowance"),
                rollover=data.draw(st.booleans(), label="rollover"),
                auto_renew=data.draw(st.booleans(), label="auto renew"),
                event_id=data.draw(EVENT_IDS, label="event id"),
            )
        else:
            status = data.draw(st.sampled_from([AccountStatus.ACTIVE, AccountStatus.ACTIVE, *AccountStatus]), label="status")
            self.same(lambda: self.model.set_status(user, status), self.ledger.set_status(user, status))

    def credit(self, user: str, amount: int, event_id: str | None) -> None:
        if not self.fits(user, amount):
            return
        event_id = event_id or f"ev_{next(self.event_ids)}"
        kind = EntryKind.GRANT if amount >= 0 else EntryKind.REFUND
        balance = self.same(
            lambda: self.model.credit(user, amount=amount, kind=kind, event_id=event_id),
            self.ledger.credit(user, amount=amount, kind=kind, reason="property test", event_id=event_id),
        )
        if amount < 0 and balance is not None:
            self.dirty.add(user)
        event(f"credit: {'applied' if balance is not None else 'duplicate event or no account'}")

    def start_cycle(self, user: str, allowance: int, *, rollover: bool, auto_renew: bool, event_id: str | None) -> None:
        now = self.env.clock.now
        acct = self.model.accounts.get(user)
        if acct is not None and not self.fits(user, allowance + max(acct.balance, 0) - acct.balance):
            return
        event_id = event_id or f"cycle_{next(self.event_ids)}"
        kwargs = {"tier": self.tier(user), "allowance": allowance, "cycle": Cycle(now, now + CYCLE_MS, auto_renew)}
        balance = self.same(
            lambda: self.model.start_cycle(user, event_id=event_id, rollover=rollover, **kwargs),
            self.ledger.start_cycle(user, event_id=event_id, rollover=rollover, reason="property test", **kwargs),
        )
        if balance is not None:
            self.dirty.add(user)
        event(f"start cycle: {'applied' if balance is not None else 'duplicate event or no account'}")

    @rule(hold=holds, bad=BAD_CALLS, data=st.data(), live=weighted((3, st.just(True)), (1, st.just(False))))
    def out_of_range(self, hold: Hold, bad: tuple[str, str, float], data: st.DataObject, live: bool) -> None:
        """An amount out of range is an error reply, and nothing changes (a pending hold stays pending)."""
        hold = self.pick(data, hold, live)
        operation, what, value = bad
        before = self.run(dump_prefix(self.env.redis, self.prefix))
        with pytest.raises(ResponseError):
            self.run(self._bad_call(hold, operation, what, value))
        assert self.run(dump_prefix(self.env.redis, self.prefix)) == before
        event(f"out of range: {operation} {what}")

    async def _bad_call(self, hold: Hold, operation: str, what: str, value: Any) -> object:
        ledger, user, limits = self.ledger, hold.account, self.limits(hold.account)
        if operation == "admit":
            placed = Hold(f"h{next(self.hold_ids)}", user, value if what == "amount" else 10)
            if what in ("allowance", "monthly_tokens"):
                limits = replace(limits, **{what: value})
            ttl = value if what == "ttl" else 1_000
            return await ledger.admit(
                placed, tier=self.tier(user), limits=limits, hold_ttl_ms=ttl, renewal=lambda _: Renewal(CYCLE_MS), progress=b""
            )
        if what in ("amount", "placed_at"):
            hold = replace(hold, **{what: value})
        if operation == "post":
            cost = value if what == "cost" else 0
            return await ledger.post(hold, cost=cost, usage=usage(value if what == "tokens" else 0), limits=limits)
        if operation == "void":
            return await ledger.void(hold, reason="bad")
        if operation == "expire":
            return await ledger.expire(hold)
        if operation == "credit":
            return await ledger.credit(user, amount=value, kind=EntryKind.GRANT, reason="bad", event_id="ev_a")
        if operation == "cycle":
            now = self.env.clock.now
            cycle = Cycle(now, now + CYCLE_MS, False)
            return await ledger.start_cycle(
                user, tier=self.tier(user), allowance=value, cycle=cycle, event_id="ev_b", reason="bad"
            )
        return await ledger.heartbeat([(hold, b"")], hold_ttl_ms=value)

    # invariants -----------------------------------------------------------------------------
    @invariant()
    def ledger_is_exact(self) -> None:
        accounts, shards = self.run(read_state(self.ledger, [*USERS, GHOST]))
        for user, state in accounts.items():
            want = self.model.accounts.get(user)
            if want is None:
                assert state is None, f"{user} was never opened"
                continue
            assert state is not None
            got, shard = state.account, shards[shard_of(user)]
            assert got == want.as_account()
            assert state.warned == want.warned
            # held and open_holds are the account's pending holds in the zset, as placed
            mine = {member: expiry for member, expiry in shard.holds.items() if Hold.from_member(member).account == user}
            assert got.held == sum(Hold.from_member(member).amount for member in mine)
            assert got.open_holds == len(mine)
            assert mine == {p.hold.member: p.expiry for p in want.pending.values()}
            # the balance is the sum of the account's ledger entries, each an exact integer
            entries = [e for e in shard.entries if e.user_id == user]
            running = 0
            for entry in entries:
                if isinstance(entry, LedgerEntry):
                    running += entry.amount
                    assert entry.balance == running, entry
            assert got.balance == running
            # a hold is resolved at most once, and a pending one not yet
            resolutions = Counter(e.hold_id for e in entries if isinstance(e, LedgerEntry) and e.hold_id)
            assert set(resolutions.values()) <= {1}
            assert not set(resolutions) & {Hold.from_member(member).id for member in mine}
            assert want.resolved == {e.hold_id: e.kind.value for e in entries if isinstance(e, LedgerEntry) and e.hold_id}
            assert [entry_of(e) for e in entries] == want.entries
            self._check_bound(user, got.balance, got.held)
        for shard in shards.values():
            # the progress hash holds an entry exactly for each pending hold with a record, its latest
            recorded = {p.hold.id for acct in self.model.accounts.values() for p in acct.pending.values() if p.record}
            assert set(shard.progress) == {Hold.from_member(m).id for m in shard.holds} & recorded
            for member in shard.holds:
                hold = Hold.from_member(member)
                assert shard.progress.get(hold.id, b"") == self.model.accounts[hold.account].pending[hold.id].record
        self.dirty.clear()

    def _check_bound(self, user: str, balance: int, held: int) -> None:
        acct = self.model.accounts[user]
        ok = acct.within_bounds(balance, held)
        if user not in self.dirty and self.bounded[user]:
            assert ok, f"{user} ({acct.limits.policy}) left its bound on admissions and posts within holds alone"
            if acct.limits.policy is Policy.STRICT:
                assert balance >= 0
            else:
                assert balance > -max(acct.largest_hold, 1)
        self.bounded[user] = ok if user in self.dirty else self.bounded[user] or ok


def _explore() -> dict[str, Any]:
    examples = os.environ.get("LEDGER_PROPERTIES_EXAMPLES")
    return {"max_examples": int(examples), "derandomize": False} if examples else {"max_examples": 150, "derandomize": True}


MACHINE_SETTINGS = hypothesis.settings(
    stateful_step_count=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    **_explore(),
)


async def _client(url: str) -> Redis:
    return Redis.from_url(url)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The ledger's clock, set by the test."""
    clock = Clock()
    monkeypatch.setattr(ledger_module, "now_ms", clock)
    return clock


def test_random_interleavings_keep_the_ledger_exact(settings: Settings, clock: Clock) -> None:
    with asyncio.Runner() as runner:
        redis = runner.run(_client(settings.redis_url))
        env = Env(runner, redis, settings.redis_prefix, clock)
        try:
            run_state_machine_as_test(lambda: LedgerMachine(env), settings=MACHINE_SETTINGS)
        finally:
            runner.run(redis.aclose())


# exactness near 2^40 -----------------------------------------------------------------------------
async def _many_holds_at_once(ledger: Ledger, policy: Policy, amounts: list[int]) -> None:
    user = f"many_{policy.value}"
    limits = replace(LENIENT if policy is Policy.LENIENT else STRICT, monthly_tokens=None, monthly_requests=None)
    total = sum(amounts)
    assert total <= MAX_AMOUNT
    await ledger.open_account(user, tier="t", allowance=total, cycle=Cycle(0, BASE_MS * 2, False))
    holds = [Hold(f"big{n}", user, amount) for n, amount in enumerate(amounts)]

    # as many calls in flight as the client's connection pool allows (100)
    in_flight = asyncio.Semaphore(64)

    async def at_once(call: Awaitable[T]) -> T:
        async with in_flight:
            return await call

    def admit(hold: Hold) -> Awaitable[Admission]:
        record = progress_record(hold.amount, usage(1))
        return ledger.admit(
            hold, tier="t", limits=limits, hold_ttl_ms=60_000, renewal=lambda _: Renewal(CYCLE_MS), progress=record
        )

    admissions = await asyncio.gather(*(at_once(admit(hold)) for hold in holds))
    assert all(a.admitted for a in admissions)
    # in whatever order Redis ran them, each admission saw the running sum of the holds, exactly
    helds = sorted(a.held for a in admissions)
    assert Counter(b - a for a, b in itertools.pairwise([0, *helds])) == Counter(amounts)
    assert helds[-1] == total
    acct = await ledger.account(user)
    assert acct is not None
    assert (acct.balance, acct.held, acct.open_holds) == (total, total, len(amounts))
    members = await ledger.redis.zrange(ledger.keys.holds(user), 0, -1)
    assert sum(Hold.from_member(m.decode()).amount for m in members) == total

    # nothing left: one more µ$ is refused by both policies; a free request only by lenient
    refused = await admit(Hold("one_more", user, 1))
    assert (refused.refusal, refused.balance, refused.held) == ("credits", total, total)
    free = await admit(Hold("free", user, 0))
    assert free.admitted == (policy is Policy.STRICT)
    if free.admitted:
        await ledger.void(Hold("free", user, 0), reason="test")

    # post each one a little under its amount, all at once: the balance is exact to the µ$
    costs = [amount - n % 7 for n, amount in enumerate(amounts)]
    await asyncio.gather(
        *(at_once(ledger.post(hold, cost=cost, usage=usage(1), limits=limits)) for hold, cost in zip(holds, costs, strict=True))
    )
    acct = await ledger.account(user)
    assert acct is not None
    assert (acct.balance, acct.held, acct.open_holds) == (total - sum(costs), 0, 0)
    assert acct.cost == sum(costs)
    stream = await ledger.redis.xrange(ledger.keys.stream(user))
    entries = [decode_entry({k.decode(): v.decode() for k, v in f.items()}, i.decode()) for i, f in stream]
    assert sum(e.amount for e in entries if isinstance(e, LedgerEntry) and e.user_id == user) == acct.balance


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("policy", list(Policy))
async def test_many_holds_near_2_40_at_once_keep_held_exact(ledger: Ledger, policy: Policy, seed: int) -> None:
    """Hundreds of holds just under 2^40 placed and posted at once: every sum is exact to
    the µ$, as Python's integers have it."""
    rng = random.Random(seed)
    await _many_holds_at_once(ledger, policy, [2**40 - rng.randrange(2**20) for _ in range(rng.randrange(600, 1_000))])


# regressions -----------------------------------------------------------------------------------
# Each test below reproduces a way the scripts once broke one of the properties above and
# asserts the fixed behaviour.
OPEN = Cycle(0, BASE_MS * 2, False)


async def _entries(ledger: Ledger, user: str) -> list[LedgerEntry]:
    stream = await ledger.redis.xrange(ledger.keys.stream(user))
    decoded = [decode_entry({k.decode(): v.decode() for k, v in f.items()}, i.decode()) for i, f in stream]
    return [e for e in decoded if isinstance(e, LedgerEntry) and e.user_id == user]


def _admit(ledger: Ledger, hold: Hold, progress: bytes = b"") -> Awaitable[Admission]:
    return ledger.admit(
        hold, tier="t", limits=LENIENT, hold_ttl_ms=60_000, renewal=lambda _: Renewal(CYCLE_MS), progress=progress
    )


async def test_running_totals_stay_within_2_52_so_every_sum_is_exact(ledger: Ledger) -> None:
    """Each amount is within 2^50, but sums could pass 2^53, where Lua's doubles round:
    the scripts refuse a move that would take a balance beyond 2^52, changing nothing."""
    await ledger.open_account("rich", tier="t", allowance=1, cycle=OPEN)
    for _ in range(3):
        await ledger.credit("rich", amount=MAX_AMOUNT, kind=EntryKind.GRANT, reason="large")
    with pytest.raises(ResponseError, match="2\\^52"):
        await ledger.credit("rich", amount=MAX_AMOUNT, kind=EntryKind.GRANT, reason="too large")
    hold = Hold("h", "rich", 0)
    assert (await _admit(ledger, hold)).admitted
    await ledger.void(hold, reason="test")
    acct = await ledger.account("rich")
    assert acct is not None
    assert acct.balance == sum(e.amount for e in await _entries(ledger, "rich")) == 3 * MAX_AMOUNT + 1


async def test_a_post_refused_for_its_totals_leaves_the_hold_pending(
    ledger: Ledger, redis: Redis, settings: Settings, clock: Clock
) -> None:
    """The 2^52 check used to come after the hold left its set: the refusal then left the
    hold released but still counted in ``held``. Now it changes nothing, and a corrected
    post (or the expiry) still settles the hold."""
    await ledger.open_account("u", tier="t", allowance=1_000, cycle=OPEN)
    await redis.hset(ledger.keys.account("u"), "cost", 2**52 - 5)  # this cycle's cost near the limit
    hold = Hold("h", "u", 10, placed_at=clock.now)
    assert (await _admit(ledger, hold)).admitted
    before = await dump_prefix(redis, settings.redis_prefix)
    with pytest.raises(ResponseError, match="2\\^52"):
        await ledger.post(hold, cost=10, usage=usage(1), limits=LENIENT)
    assert await dump_prefix(redis, settings.redis_prefix) == before
    await redis.hset(ledger.keys.account("u"), "cost", 0)
    posted = await ledger.post(hold, cost=10, usage=usage(1), limits=LENIENT)
    assert posted is not None and (posted.duplicate, posted.balance, posted.held) == (False, 990, 0)


async def test_a_grant_in_an_unknown_mode_changes_nothing(ledger: Ledger, redis: Redis, settings: Settings) -> None:
    await ledger.open_account("u", tier="t", allowance=1_000, cycle=OPEN)
    call = credit_call(ledger.keys, "u", amount=5, kind=EntryKind.GRANT, reason="test", event_id="e1", tier="", now=1)
    before = await dump_prefix(redis, settings.redis_prefix)
    with pytest.raises(ResponseError, match="unknown grant mode"):
        await ledger._grant(keys=call.keys, args=["renew", *call.args[1:]])
    assert await dump_prefix(redis, settings.redis_prefix) == before


async def test_an_expiry_posts_its_progress_record_exactly_or_it_was_refused(
    ledger: Ledger, redis: Redis, settings: Settings, clock: Clock
) -> None:
    """resolve.lua posts a progress record's cost when its hold expires, and past 2^53 Lua's
    doubles would charge something other than the cost: admit.lua and heartbeat.lua refuse a
    record whose cost is beyond 2^50 (an error reply, nothing changed), so none is ever stored."""
    await ledger.open_account("u", tier="t", allowance=1_000, cycle=OPEN)
    record = progress_record(2**53 + 1, usage(1))
    before = await dump_prefix(redis, settings.redis_prefix)
    with pytest.raises(ResponseError, match=r"progress record .* within 2\^50"):
        await _admit(ledger, Hold("h", "u", 10, placed_at=clock.now), record)
    assert await dump_prefix(redis, settings.redis_prefix) == before
    hold = Hold("h2", "u", 10, placed_at=clock.now)
    assert (await _admit(ledger, hold, progress_record(3, usage(1)))).admitted
    before = await dump_prefix(redis, settings.redis_prefix)
    with pytest.raises(ResponseError, match=r"progress record .* within 2\^50"):
        await ledger.heartbeat([(hold, record)], hold_ttl_ms=60_000)
    assert await dump_prefix(redis, settings.redis_prefix) == before
    clock.now += 60_000
    resolution = await ledger.expire(hold)  # the expiry posts the record that was taken
    assert resolution is not None and resolution.posted
    assert (await _entries(ledger, "u"))[-1].amount == -3


async def test_a_grant_refused_by_redis_leaves_its_event_id_unused(ledger: Ledger, redis: Redis, settings: Settings) -> None:
    """``5.0`` once passed grant.lua's check (tonumber gives an integer), the event's marker
    was set, then HINCRBY refused "5.0" - and the marker stayed, so the retry with the right
    amount was taken for a duplicate. Now the refusal changes nothing (no marker either), and
    the retry is applied once."""
    await ledger.open_account("u", tier="t", allowance=1_000, cycle=OPEN)
    before = await dump_prefix(redis, settings.redis_prefix)
    with pytest.raises(ResponseError):
        await ledger.credit("u", amount=5.0, kind=EntryKind.GRANT, reason="test", event_id="invoice_1")  # type: ignore[arg-type]
    assert await dump_prefix(redis, settings.redis_prefix) == before
    assert await ledger.credit("u", amount=5, kind=EntryKind.GRANT, reason="test", event_id="invoice_1") == 1_005


async def test_admitting_the_same_hold_again_holds_it_once(ledger: Ledger) -> None:
    """An admission retried after a lost reply (the gate voids instead, but a redis-py
    client retries a command on a connection error): ZADD only moves the expiry, so held
    and open_holds must not grow again - after the hold is voided both are back at 0."""
    await ledger.open_account("u", tier="t", allowance=1_000, cycle=OPEN)
    hold = Hold("h", "u", 10)
    for _ in range(2):
        assert (await _admit(ledger, hold)).admitted
    await ledger.void(hold, reason="test")
    acct = await ledger.account("u")
    assert acct is not None
    assert (acct.held, acct.open_holds) == (0, 0)


async def test_a_settlement_replayed_after_a_rebuild_is_charged_once(ledger: Ledger, redis: Redis, clock: Clock) -> None:
    """A post goes through but its reply is lost, and Redis then goes away: the proxy spools
    it. The worker had written the charge to Postgres; Redis loses its data and `ledger
    rebuild` restores the account (charge included, stamped `rebuilt`). The spool replays
    the post: the hold is not pending and was placed before the rebuild, so resolve.lua
    would take it for a hold lost with the data and charge it again (Postgres drops the
    second ``chg_<hold>`` entry, same id, and Redis would stay 70 µ$ below the ledger). The
    rebuild marks the holds Postgres shows as settled, so the replay is a duplicate and the
    balance stays 930 µ$."""
    await ledger.open_account("u", tier="t", allowance=1_000, cycle=OPEN)
    hold = Hold("h", "u", 100, placed_at=clock.now)
    assert (await _admit(ledger, hold)).admitted
    call = post_call(ledger.keys, hold, cost=70, usage=usage(10), limits=LENIENT, now=clock.now)
    assert await ledger.run_settlement(call) is not None  # its reply is lost: the proxy spools the call
    in_postgres = await ledger.account("u")
    assert in_postgres is not None and in_postgres.balance == 930
    clock.now += 5_000
    await redis.delete(ledger.keys.account("u"), ledger.keys.holds("u"), ledger.keys.progress("u"))
    assert await ledger.restore(in_postgres, settled_holds=["h"])  # what `ledger rebuild` reads from Postgres
    await ledger.run_settlement(call)  # the spool replays it
    acct = await ledger.account("u")
    assert acct is not None
    assert acct.balance == 930


@pytest.mark.parametrize("record", MALFORMED_RECORDS)
async def test_a_progress_record_the_scripts_cannot_post_is_refused_and_changes_nothing(
    ledger: Ledger, redis: Redis, settings: Settings, record: bytes
) -> None:
    """An expiry posts the record's cost: only "<cost> <tokens> <json>" within 2^50 is taken."""
    await ledger.open_account("u", tier="t", allowance=1_000, cycle=OPEN)
    before = await dump_prefix(redis, settings.redis_prefix)
    with pytest.raises(ResponseError, match="progress record"):
        await _admit(ledger, Hold("h", "u", 10), record)
    assert await dump_prefix(redis, settings.redis_prefix) == before
    hold = Hold("h2", "u", 10)
    assert (await _admit(ledger, hold, progress_record(3, usage(1)))).admitted
    before = await dump_prefix(redis, settings.redis_prefix)
    with pytest.raises(ResponseError, match="progress record"):
        await ledger.heartbeat([(hold, record)], hold_ttl_ms=60_000)
    assert await dump_prefix(redis, settings.redis_prefix) == before
