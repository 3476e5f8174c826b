"""The settlement spool against a real Redis: one call Redis refuses does not block the rest."""

from __future__ import annotations

import fcntl
from dataclasses import replace

from proxy.ledger import Hold, UsageEvent, new_id, progress_record
from proxy.ledger.resolve import post_call
from proxy.spool import Spool

from .support.accounts import account
from .support.money import ALLOWANCE


async def test_a_settlement_redis_refuses_stays_spooled_and_the_next_ones_are_posted(make_customer, ledger, accounts, tmp_path):
    customer = await make_customer("starter")
    tiers = accounts.config.tiers
    starter = tiers.tiers["starter"]
    usage = UsageEvent(key_id=customer.key_id, provider="openai", model="gpt-4o-mini", tier="starter", input_tokens=50)
    holds = [Hold(new_id("hold"), customer.user_id, 2_000) for _ in range(2)]
    for hold in holds:
        await ledger.admit(
            hold, tier="starter", limits=starter.limits, hold_ttl_ms=60_000, renewal=tiers.renewal,
            progress=progress_record(8, usage),
        )  # fmt: skip
    spool = Spool(tmp_path)
    spool.open()
    good = post_call(ledger.keys, holds[1], cost=300, usage=usage, limits=starter.limits, now=1)
    refused = post_call(ledger.keys, holds[0], cost=300, usage=usage, limits=starter.limits, now=1)
    refused = replace(refused, args=[*refused.args[:1], "not a number", *refused.args[2:]])  # the script refuses it
    await spool.keep(holds[0].id, refused)
    await spool.keep(holds[1].id, good)

    assert await spool.replay(ledger.run_settlement) == 1
    assert len(spool) == 1  # the refused one waits for an operator, logged
    after = await account(ledger, customer.user_id)
    assert (after.balance, after.held, after.requests) == (ALLOWANCE["starter"] - 300, 2_000, 1)
    spool.close()


def test_a_spool_being_created_is_not_adopted_by_a_process_starting_in_the_same_instant(tmp_path, monkeypatch):
    """``serve --workers N`` starts N processes on one SPOOL_DIR at once: one of them must
    not adopt another's new file between its creation and its lock (the other then failed
    to start)."""
    flock = fcntl.flock
    rival = Spool(tmp_path)

    def a_rival_starts_first(handle, operation):
        monkeypatch.setattr(fcntl, "flock", flock)
        rival.open()  # between the first process's creating its file and locking it
        return flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", a_rival_starts_first)
    first = Spool(tmp_path)
    assert first.open() == 0 and rival._adopted == [] and first._adopted == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(s._own.path.name for s in (first, rival))  # type: ignore[union-attr]
    first.close()
    rival.close()
