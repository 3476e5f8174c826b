"""A failover drops the old primary's last writes — a request's admission and its charge
alike. The proxy sends the settlements Redis answered shortly before a failed call again,
and resolve.lua charges each request once: a hold still pending is posted, a hold whose
admission was lost too is charged as lost, one settled on the survivor is a duplicate.
Real servers: a primary and its replica, promoted by the test as Sentinel does."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis as redis_sync
from redis.asyncio import Redis
from redis.exceptions import ReadOnlyError

from proxy import metrics
from proxy.keys import KeyMirror
from proxy.ledger import Cycle, CycleLimits, Hold, Ledger, Policy, Renewal, UsageEvent, new_id, now_ms
from proxy.ledger.pipeline import Address, NodeConnection, RedisPipeline
from proxy.ledger.resend import RecentSettlements, resend_after_failures
from proxy.ledger.scripts import ScriptCall
from proxy.recovery import rebuild
from proxy.settings import Settings
from proxy.usage import UsageLog

from .support.redis_server import primary_and_replica, replicate
from .support.waiting import until

LIMITS = CycleLimits(
    allowance=1_000_000, monthly_tokens=None, monthly_requests=None, rpm=None, policy=Policy.STRICT, warning_permille=1000
)
USAGE = UsageEvent(key_id="key_1", provider="openai", model="gpt-4o-mini", tier="starter", input_tokens=10, output_tokens=5)


def _applied() -> float:
    return metrics.SETTLEMENTS_RESENT.labels("applied")._value.get()


async def _admit(ledger: Ledger, hold: Hold) -> None:
    admission = await ledger.admit(
        hold, tier="starter", limits=LIMITS, hold_ttl_ms=60_000, renewal=lambda _: Renewal(86_400_000), progress=b""
    )
    assert admission.admitted


async def _request(ledger: Ledger, cost: int) -> Hold:
    """A request's admission and charge, as the gate makes them."""
    hold = Hold(new_id("hold"), "usr_failover", 50_000, placed_at=now_ms())
    await _admit(ledger, hold)
    assert await ledger.post(hold, cost=cost, usage=USAGE, limits=LIMITS) is not None
    return hold


async def test_a_request_the_failover_dropped_is_sent_again_and_charged_once(tmp_path: Path, settings: Settings):
    primary, replica = primary_and_replica(tmp_path)
    serving = {"port": primary.port}  # what Sentinel would name

    async def address() -> Address:
        return "127.0.0.1", serving["port"]

    pipeline = RedisPipeline(NodeConnection(address, timeout=5))
    old, new = Redis(port=primary.port), Redis(port=replica.port)
    recent = RecentSettlements(recent_seconds=120)  # the resync below takes seconds; Sentinel's NOREPLICAS would come at once
    ledger = Ledger(old, settings.redis_prefix, pipeline, recent=recent)
    resending = asyncio.create_task(resend_after_failures(recent, ledger.resend, settle_seconds=0.1, pause=0.1))
    try:
        now = now_ms()
        await ledger.open_account(
            "usr_failover", tier="starter", allowance=1_000_000, cycle=Cycle(now - 1, now + 86_400_000, False)
        )
        kept = await _request(ledger, cost=1_234)
        await old.execute_command("WAIT", 1, 5000)  # the replica has the account and this charge

        await asyncio.to_thread(redis_sync.Redis(port=replica.port).execute_command, "REPLICAOF", "NO", "ONE")
        old_primary = redis_sync.Redis(port=primary.port)
        await until(lambda: old_primary.info("replication")["connected_slaves"] == 0, 10, "the old primary to lose its replica")
        lost = await _request(ledger, cost=4_321)  # taken by the old primary only
        await asyncio.to_thread(replicate, primary.port, replica.port)  # it rejoins as a replica, dropping both writes
        serving["port"] = replica.port
        survivor = Ledger(new, settings.redis_prefix)
        account = await survivor.account("usr_failover")
        assert account is not None and account.balance == 1_000_000 - 1_234  # the charge is gone with the old primary

        applied = _applied()
        with pytest.raises(ReadOnlyError):  # the next call of the request path meets the demoted primary
            await _admit(ledger, Hold(new_id("hold"), "usr_failover", 1, placed_at=now_ms()))
        await until(lambda: _applied() == applied + 1, 10, "the lost charge to be sent again")
        account = await survivor.account("usr_failover")
        assert account is not None
        assert (account.balance, account.held, account.requests) == (1_000_000 - 1_234 - 4_321, 0, 2)

        # Sent once more (another failure, a retry): a duplicate either way, nothing moves.
        resent = await ledger.post(lost, cost=4_321, usage=USAGE, limits=LIMITS)
        assert resent is not None and resent.duplicate
        again = await ledger.post(kept, cost=1_234, usage=USAGE, limits=LIMITS)
        assert again is not None and again.duplicate
        account = await survivor.account("usr_failover")
        assert account is not None and account.balance == 1_000_000 - 1_234 - 4_321
        entries = await new.xrange(survivor.keys.stream("usr_failover"))
        charges = [fields[b"id"] for _, fields in entries if fields[b"kind"] == b"charge"]
        assert sorted(charges) == sorted([f"chg_{kept.id}".encode(), f"chg_{lost.id}".encode()])
    finally:
        resending.cancel()
        pipeline.close()
        await old.aclose()
        await new.aclose()
        replica.kill()
        primary.kill()


async def test_only_a_recent_hold_never_resolved_here_is_charged_unadmitted_and_only_once(ledger: Ledger):
    """What keeps a resend safe: a post of a hold this Redis resolved is a duplicate,
    however often it comes; a hold placed in the last minute and never seen here (its
    admission was lost) is charged once, even on an account busy with newer requests; an
    older one is not (its resolution may have left the list of recent ones)."""
    now = now_ms()
    user = f"usr_{new_id('t')}"
    await ledger.open_account(user, tier="starter", allowance=100_000, cycle=Cycle(now - 1, now + 86_400_000, False))
    voided, posted = Hold(new_id("hold"), user, 10_000, placed_at=now), Hold(new_id("hold"), user, 10_000, placed_at=now)
    await _admit(ledger, voided)
    await _admit(ledger, posted)
    await ledger.void(voided, reason="upstream_error")
    assert (await ledger.post(posted, cost=900, usage=USAGE, limits=LIMITS)) is not None
    lost = Hold(new_id("hold"), user, 10_000, placed_at=now - 5)  # placed before the two above; its admission was lost
    charged = await ledger.post(lost, cost=300, usage=USAGE, limits=LIMITS)
    assert charged is not None and not charged.duplicate and charged.balance == 100_000 - 900 - 300
    old = Hold(new_id("hold"), user, 10_000, placed_at=now - 61_000)
    stale = await ledger.post(old, cost=50, usage=USAGE, limits=LIMITS)
    assert stale is not None and stale.duplicate
    for hold, cost in ((lost, 300), (posted, 900), (voided, 700), (lost, 300)):
        repeat = await ledger.post(hold, cost=cost, usage=USAGE, limits=LIMITS)
        assert repeat is not None and repeat.duplicate
    account = await ledger.account(user)
    assert account is not None and (account.balance, account.held, account.requests) == (100_000 - 900 - 300, 0, 2)


async def test_a_hold_kept_through_a_forced_rebuild_is_charged_once_however_often_it_is_posted(
    ledger: Ledger, pool, accounts, make_customer, redis, settings: Settings
):
    """``ledger rebuild --force`` keeps the account's requests in flight; a post of one
    placed before the rebuild once looked lost every time it came (a resend, a retry)."""
    customer = await make_customer("starter")
    before = await ledger.account(customer.user_id)
    assert before is not None
    hold = Hold(new_id("hold"), customer.user_id, 10_000, placed_at=now_ms() - 1_000)
    limits = accounts.config.tiers.tiers["starter"].limits
    renewal = lambda _: Renewal(86_400_000)  # noqa: E731
    admission = await ledger.admit(hold, tier="starter", limits=limits, hold_ttl_ms=60_000, renewal=renewal, progress=b"")
    assert admission.admitted
    while await UsageLog(redis, ledger, pool).drain_once():
        pass
    await rebuild(ledger, pool, KeyMirror(redis, settings.redis_prefix), accounts.config.tiers, user=customer.user_id, force=True)
    for attempt in range(3):
        result = await ledger.post(hold, cost=1_111, usage=USAGE, limits=limits)
        assert result is not None and result.duplicate == (attempt > 0)
    account = await ledger.account(customer.user_id)
    assert account is not None and (account.balance, account.held) == (before.balance - 1_111, 0)


def test_failures_in_a_row_send_each_settlement_again_once():
    """Under overload every call may time out; each round sends only what no earlier round took."""
    recent = RecentSettlements(recent_seconds=60)
    first, second = ScriptCall(["k"], ["first"]), ScriptCall(["k"], ["second"])
    recent.sent("hold_a", first)
    recent.disrupted()
    recent.disrupted()  # the same failure, seen twice
    assert recent.take() == [("hold_a", first)]
    recent.sent("hold_b", second)
    recent.sent("hold_a", first)  # answered again since (a retry): the latest counts
    recent.disrupted()
    assert sorted(recent.take()) == [("hold_a", first), ("hold_b", second)]
    recent.disrupted()
    assert recent.take() == []


def test_resend_seconds_is_read_from_the_environment_and_bounded():
    assert Settings.from_env({}).resend_seconds == 15
    assert Settings.from_env({"RESEND_SECONDS": "30"}).resend_seconds == 30
    for bad in ("-1", "61", "NaN", "inf"):
        with pytest.raises(SystemExit, match="RESEND_SECONDS"):
            Settings.from_env({"RESEND_SECONDS": bad})
