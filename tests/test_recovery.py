"""`ledger check` proves Redis and the Postgres ledger agree; `ledger rebuild` restores a
Redis that lost its data; creation is all or nothing; a missing account is said plainly."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.accounts import AccountError, NoLiveAccountError
from proxy.keys import KeyMirror
from proxy.ledger import AccountStatus, Cycle, EntryKind, Hold, Ledger, UsageEvent, new_id, progress_record
from proxy.ledger.events import stream_order
from proxy.ledger.scripts import text
from proxy.recovery import RebuildRefusedError, check, rebuild
from proxy.spool import Spool
from proxy.usage import GROUP

from .support.accounts import account
from .support.money import ALLOWANCE


async def _drained(usage_log) -> None:
    while await usage_log.drain_once():
        pass


async def _traffic(openai_client, api_key: str, requests: int = 3) -> None:
    client = openai_client(api_key)
    for _ in range(requests):
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=20)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=[], stream=True)
    async for _ in stream:
        pass


async def _forget_everything(redis, settings) -> None:
    """What FLUSHALL does to this test's Redis data (other tests share the server)."""
    keys = [k async for k in redis.scan_iter(match=f"{settings.redis_prefix}*", count=1000)]
    await redis.delete(*keys)


async def test_check_is_clean_after_traffic_and_names_every_difference_to_the_micro_dollar(
    make_customer, openai_client, ledger, usage_log, pool, redis
):
    customer = await make_customer("starter")
    await _traffic(openai_client, customer.api_key)
    await _drained(usage_log)
    report = await check(ledger, pool, user=customer.user_id, wait=0)
    assert report.clean and report.accounts == 1, report.differences

    account_key = ledger.keys.account(customer.user_id)
    await redis.hincrby(account_key, "balance", -7)
    await redis.hincrby(account_key, "requests", 1)
    stale = Hold(new_id("hold"), customer.user_id, 900)
    await redis.zadd(ledger.keys.holds(customer.user_id), {stale.member: 1})  # pending since 1970, and not in `held`
    await pool.execute(
        "DELETE FROM usage_events WHERE id = (SELECT id FROM usage_events WHERE user_id = $1 LIMIT 1)", customer.user_id
    )
    report = await check(ledger, pool, user=customer.user_id, wait=0)
    found = {d.what: (d.redis, d.postgres) for d in report.differences}
    spent = 4 * 345  # four requests of 1,500 tokens at 345 µ$ each
    assert found["balance"] == (ALLOWANCE["starter"] - spent - 7, ALLOWANCE["starter"] - spent)
    assert found["requests"] == (5, 4)
    assert found["held"] == (0, 900) and found["open_holds"] == (0, 1) and found["holds_past_expiry"] == (1, 0)
    assert found["usage_rows"] == (3, 4) and found["usage_cost"] == (3 * 345, 4 * 345)
    assert found["tokens"] == (4 * 1500, 3 * 1500)  # the deleted usage row's tokens are missing from Postgres
    assert set(found) == {"balance", "requests", "tokens", "held", "open_holds", "holds_past_expiry", "usage_rows", "usage_cost"}


async def test_check_waits_for_the_worker_and_reports_events_it_never_wrote(make_customer, openai_client, ledger, pool):
    customer = await make_customer("starter")
    await _traffic(openai_client, customer.api_key, requests=1)
    report = await check(ledger, pool, user=customer.user_id, wait=0.3)  # nobody drains the streams
    assert report.unwritten_events >= 3  # the open grant, a charge, the stream's charge
    assert ("", "unwritten_events") in {(d.user, d.what) for d in report.differences}


async def test_lost_redis_data_is_rebuilt_exactly_from_postgres(
    make_customer, openai_client, ledger, usage_log, pool, redis, settings, accounts, proxy_url
):
    customers = [await make_customer(tier) for tier in ("starter", "professional", "free")]
    for customer in customers[:2]:
        await _traffic(openai_client, customer.api_key)
    await accounts.set_status(customers[2].user_id, AccountStatus.SUSPENDED)
    await _drained(usage_log)
    before = {c.user_id: await account(ledger, c.user_id) for c in customers}

    await _forget_everything(redis, settings)
    stream = ledger.keys.stream(customers[0].user_id)
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)  # as a worker recreates it: empty, ids from 0-0
    await asyncio.sleep(settings.key_cache_seconds)
    async with aiohttp.ClientSession() as http:  # every key is unknown now
        answer = await http.get(f"{proxy_url}/api/credits", headers={"Authorization": f"Bearer {customers[0].api_key}"})
        assert answer.status == 401
    with pytest.raises(NoLiveAccountError, match="ledger rebuild"):
        await accounts.grant(customers[0].user_id, 5, "goodwill")

    for customer in customers:
        done = await rebuild(ledger, pool, KeyMirror(redis, settings.redis_prefix), accounts.config.tiers, user=customer.user_id)
        assert done.restored == [customer.user_id] and done.balance == before[customer.user_id].balance
    for customer in customers:
        restored = await account(ledger, customer.user_id)
        was = before[customer.user_id]
        assert (restored.balance, restored.tokens, restored.requests, restored.cost) == (
            was.balance,
            was.tokens,
            was.requests,
            was.cost,
        )
        assert (restored.tier, restored.status, restored.cycle_start, restored.cycle_end) == (
            was.tier,
            was.status,
            was.cycle_start,
            was.cycle_end,
        )
        assert (restored.held, restored.open_holds, restored.auto_renew) == (0, 0, True)
        assert (await check(ledger, pool, user=customer.user_id, wait=0)).clean

    last_in_postgres = await pool.fetchval("SELECT max(stream_order) FROM ledger")
    raised = (await redis.xinfo_stream(stream))["last-generated-id"]
    assert stream_order(text(raised)) >= last_in_postgres  # new entries sort after every old one

    again = await rebuild(ledger, pool, KeyMirror(redis, settings.redis_prefix), accounts.config.tiers, user=customers[0].user_id)
    assert again.restored == [] and again.kept == [customers[0].user_id]  # an existing account is not overwritten
    await asyncio.sleep(settings.key_cache_seconds)
    await _traffic(openai_client, customers[0].api_key, requests=1)  # served again
    await _drained(usage_log)
    assert (await check(ledger, pool, user=customers[0].user_id, wait=0)).clean


async def test_a_hold_lost_with_redis_data_is_still_charged_once_after_the_rebuild(
    make_customer, ledger, usage_log, pool, redis, settings, accounts
):
    """The request was in flight when Redis lost its data: its post (live or spooled) still charges."""
    customer = await make_customer("starter")
    starter = accounts.config.tiers.tiers["starter"]
    hold = Hold(new_id("hold"), customer.user_id, 5_000, placed_at=0)
    await _drained(usage_log)
    await _forget_everything(redis, settings)
    await rebuild(ledger, pool, KeyMirror(redis, settings.redis_prefix), accounts.config.tiers, user=customer.user_id)
    usage = UsageEvent(key_id=customer.key_id, provider="openai", model="gpt-4o-mini", tier="starter", input_tokens=40)
    posted = await ledger.post(hold, cost=321, usage=usage, limits=starter.limits)
    assert posted is not None and (posted.duplicate, posted.balance, posted.held) == (False, ALLOWANCE["starter"] - 321, 0)
    again = await ledger.post(hold, cost=321, usage=usage, limits=starter.limits)
    assert again is not None and again.duplicate and again.balance == ALLOWANCE["starter"] - 321
    await _drained(usage_log)
    assert (await check(ledger, pool, user=customer.user_id, wait=0)).clean


async def test_a_charge_finishing_before_the_rebuild_is_spooled_and_charged_once_after_it(
    make_customer, ledger, usage_log, pool, redis, settings, accounts, tmp_path
):
    """Redis lost its data while the request ran and nobody has rebuilt yet: the post finds no
    account, waits in the spool, and is charged once when `ledger rebuild` brings it back."""
    customer = await make_customer("starter")
    starter = accounts.config.tiers.tiers["starter"]
    spool = Spool(tmp_path / "spool")
    spool.open()
    spooling = Ledger(redis, settings.redis_prefix, spool=spool)
    hold = Hold(new_id("hold"), customer.user_id, 5_000, placed_at=0)
    await _drained(usage_log)
    await _forget_everything(redis, settings)

    usage = UsageEvent(key_id=customer.key_id, provider="openai", model="gpt-4o-mini", tier="starter", input_tokens=40)
    assert await spooling.post(hold, cost=321, usage=usage, limits=starter.limits) is None  # kept, not lost
    assert await spool.replay(spooling.run_settlement) == 0 and len(spool) == 1  # still no account: it waits

    await rebuild(ledger, pool, KeyMirror(redis, settings.redis_prefix), accounts.config.tiers, user=customer.user_id)
    assert await spool.replay(spooling.run_settlement) == 1 and len(spool) == 0
    assert (await account(ledger, customer.user_id)).balance == ALLOWANCE["starter"] - 321
    await _drained(usage_log)
    assert (await check(ledger, pool, user=customer.user_id, wait=0)).clean
    spool.close()


async def test_a_grant_replayed_after_the_rebuild_is_a_duplicate(
    make_customer, ledger, usage_log, pool, redis, settings, accounts
):
    """Stripe redelivers an invoice's event after Redis was rebuilt: it must not credit twice."""
    customer = await make_customer("starter")
    event = f"evt_{new_id('paid')}"
    granted = await ledger.credit(customer.user_id, amount=500_000, kind=EntryKind.GRANT, reason="invoice", event_id=event)
    assert granted == ALLOWANCE["starter"] + 500_000
    await _drained(usage_log)
    await _forget_everything(redis, settings)
    await rebuild(ledger, pool, KeyMirror(redis, settings.redis_prefix), accounts.config.tiers, user=customer.user_id)

    again = await ledger.credit(customer.user_id, amount=500_000, kind=EntryKind.GRANT, reason="invoice", event_id=event)
    assert again is None
    assert (await account(ledger, customer.user_id)).balance == ALLOWANCE["starter"] + 500_000
    assert await ledger.open_account(
        customer.user_id, tier="starter", allowance=1, cycle=Cycle(1, 2, True)
    ) is False  # fmt: skip


async def test_a_forced_rebuild_of_a_live_account_keeps_its_holds_and_drops_its_unwritten_events(
    make_customer, ledger, usage_log, pool, redis, settings, accounts
):
    customer = await make_customer("starter")
    starter = accounts.config.tiers.tiers["starter"]
    await _drained(usage_log)
    hold = Hold(new_id("hold"), customer.user_id, 7_000)
    usage = UsageEvent(key_id=customer.key_id, provider="openai", model="gpt-4o-mini", tier="starter", input_tokens=40)
    admitted = await ledger.admit(
        hold, tier="starter", limits=starter.limits, hold_ttl_ms=60_000, renewal=accounts.config.tiers.renewal,
        progress=progress_record(0, usage),
    )  # fmt: skip
    assert admitted.admitted
    await ledger.credit(customer.user_id, amount=-123, kind=EntryKind.GRANT, reason="never written")  # still in the stream
    read = await usage_log._read(">")  # the worker read it and could not write it (say, no replica acknowledged)
    assert [len(entries) for _, entries in read] == [1]

    mirror = KeyMirror(redis, settings.redis_prefix)
    done = await rebuild(ledger, pool, mirror, accounts.config.tiers, user=customer.user_id, force=True)
    assert done.restored == [customer.user_id] and done.dropped == 1
    rebuilt = await account(ledger, customer.user_id)
    assert (rebuilt.balance, rebuilt.held, rebuilt.open_holds) == (ALLOWANCE["starter"], 7_000, 1)  # the -123 is gone

    posted = await ledger.post(hold, cost=321, usage=usage, limits=starter.limits)
    assert posted is not None and (posted.duplicate, posted.balance, posted.held) == (False, ALLOWANCE["starter"] - 321, 0)
    # the worker's pending list still names the dropped entry: it is acknowledged, nothing written
    assert await usage_log.drain_once(pending_first=True) == 0
    await _drained(usage_log)
    assert await redis.xpending(ledger.keys.stream(customer.user_id), GROUP) == {
        "pending": 0, "min": None, "max": None, "consumers": []
    }  # fmt: skip
    assert (await check(ledger, pool, user=customer.user_id, wait=0)).clean


async def test_rebuild_refuses_while_events_wait_in_the_streams(make_customer, ledger, pool, redis, settings, accounts):
    customer = await make_customer("starter")  # its opening grant is still in the stream
    with pytest.raises(RebuildRefusedError, match="not in Postgres yet"):
        await rebuild(ledger, pool, KeyMirror(redis, settings.redis_prefix), accounts.config.tiers, user=customer.user_id)


async def test_user_creation_is_all_or_nothing_and_safe_to_retry(accounts, ledger, pool, monkeypatch):
    email = f"{new_id('retry')}@example.com"
    opened = ledger.open_account

    async def redis_down(*args, **kwargs):
        raise RedisConnectionError("Redis went away")

    monkeypatch.setattr(ledger, "open_account", redis_down)
    with pytest.raises(RedisConnectionError):
        await accounts.create_user(email, "starter")
    assert await pool.fetchval("SELECT count(*) FROM users WHERE email = $1", email) == 0
    assert await pool.fetchval("SELECT count(*) FROM api_keys k JOIN users u ON u.id = k.user_id WHERE u.email = $1", email) == 0

    monkeypatch.setattr(ledger, "open_account", opened)
    user_id, key = await accounts.create_user(email, "starter")  # the retry works, once
    assert (await account(ledger, user_id)).balance == ALLOWANCE["starter"] and key.api_key.startswith("cpk-")
    with pytest.raises(AccountError, match="already exists"):
        await accounts.create_user(email, "starter")


async def test_status_of_a_missing_account_is_not_half_written(make_customer, accounts, ledger, redis, settings):
    customer = await make_customer("starter")
    await redis.delete(ledger.keys.account(customer.user_id))
    with pytest.raises(NoLiveAccountError):
        await accounts.set_status(customer.user_id, AccountStatus.SUSPENDED)
    assert not await redis.exists(ledger.keys.account(customer.user_id))  # no hash holding only a status


async def test_progress_records_survive_only_while_the_hold_is_pending(make_customer, ledger, accounts, redis):
    customer = await make_customer("starter")
    tiers = accounts.config.tiers
    hold = Hold(new_id("hold"), customer.user_id, 1_000)
    usage = UsageEvent(
        key_id=customer.key_id, provider="openai", model="gpt-4o-mini", tier="starter", input_tokens=8, estimated=True
    )
    limits = tiers.tiers["starter"].limits
    await ledger.admit(
        hold, tier="starter", limits=limits, hold_ttl_ms=60_000, renewal=tiers.renewal, progress=progress_record(2, usage)
    )
    assert await redis.hget(ledger.keys.progress(customer.user_id), hold.id) == b"2 8 " + usage.encode()
    await ledger.void(hold, reason="test")
    assert not await redis.hexists(ledger.keys.progress(customer.user_id), hold.id)


async def test_check_is_exact_under_live_traffic(make_customer, openai_client, ledger, usage_log, pool):
    """Each account is compared at one instant with Postgres up to the same stream entry, so
    requests settling while the check runs are no difference."""
    customers = [await make_customer("enterprise") for _ in range(3)]  # 1,200 requests a minute each
    stop = asyncio.Event()
    writing = asyncio.create_task(usage_log.run(stop, gather_seconds=0.02))

    async def traffic(api_key: str) -> None:
        client = openai_client(api_key)
        while not stop.is_set():
            await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5)

    load = [asyncio.create_task(traffic(c.api_key)) for c in customers]
    try:
        reports = []
        for _ in range(4):
            for customer in customers:
                reports.append(await check(ledger, pool, user=customer.user_id, wait=10))
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.gather(*load, writing)
    assert all(r.clean for r in reports), [r.differences for r in reports if not r.clean]
    served = [(await account(ledger, c.user_id)).requests for c in customers]
    assert min(served) > 5, served
