"""Versioned prices: each pricing.yaml content the proxy loads is stored once in Postgres, a
request is priced by the version it was admitted under whatever reloads follow, and its
usage row and receipt name that version, also when the worker posts its expired hold."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime

import aiohttp
import asyncpg
import orjson
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.config import ConfigStore
from proxy.forward import REQUEST_ID_HEADER
from proxy.ledger import Hold, Ledger, UsageEvent, new_id, progress_record
from proxy.price_versions import list_versions, record_versions, stored_book
from proxy.pricing import ServiceTier
from proxy.receipts import USAGE_LOG_UNAVAILABLE, Receipts
from proxy.spool import Spool
from proxy.state import CONFIG, FORWARDER
from proxy.worker import expire_holds

from .support.accounts import settled
from .support.mock_upstreams import openai_app
from .support.waiting import until
from .test_receipts import CHAT, charge_of, receipt_when_settled

OLD_PRICES = "      gpt-4o-mini:\n        input_per_1m: 0.15\n        output_per_1m: 0.6\n"
NEW_PRICES = "      gpt-4o-mini:\n        input_per_1m: 0.3\n        output_per_1m: 1.2\n"


def version_of(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()[:16]


async def stored(pool: asyncpg.Pool, version: str) -> bool:
    return bool(await pool.fetchval("SELECT count(*) FROM price_versions WHERE version = $1", version))


async def test_a_price_edit_during_a_stream_leaves_it_at_the_prices_it_was_admitted_under(
    start_proxy, make_customer, settings, ledger, usage_log, pool
):
    proxy = await start_proxy({"openai": openai_app()})
    customer = await make_customer("starter")
    before = settings.pricing_file.read_bytes()
    old = version_of(before)
    assert OLD_PRICES.encode() in before
    headers = {"Authorization": f"Bearer {customer.api_key}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{proxy.url}/openai/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={**headers, "x-mock-scenario": "slow", "x-mock-chunks": "16"},
        ) as resp:
            long_id = resp.headers[REQUEST_ID_HEADER]
            await resp.content.readany()
            after = before.replace(OLD_PRICES.encode(), NEW_PRICES.encode())
            settings.pricing_file.write_bytes(after)
            new = version_of(after)
            await until(lambda: proxy.app[CONFIG].current.prices.version == new, 5, "the edit to be loaded")
            assert not resp.content.at_eof()  # the stream was still running under the new prices
            await resp.read()
        async with http.post(f"{proxy.url}/openai/v1/chat/completions", json=CHAT, headers=headers) as resp:
            next_id = resp.headers[REQUEST_ID_HEADER]
            assert resp.status == 200

    await settled(ledger, customer.user_id)
    # 1,000 uncached + 200 cached input and 300 output tokens: 345 µ$ before, 1,000 × 0.3 +
    # 200 × 0.075 (unchanged) + 300 × 1.2 = 675 µ$ after
    assert await charge_of(pool, usage_log, long_id) == 345
    assert await charge_of(pool, usage_log, next_id) == 675
    rows = dict(await pool.fetch("SELECT id, price_version FROM usage_events WHERE user_id = $1", customer.user_id))
    assert rows == {"chg_" + long_id: old, "chg_" + next_id: new}
    old_receipt = await receipt_when_settled(proxy.url, customer.api_key, long_id)
    new_receipt = await receipt_when_settled(proxy.url, customer.api_key, next_id)
    assert (old_receipt["price_version"], old_receipt["unit_prices_usd_per_1m"]["input"]) == (old, "0.150000")
    assert old_receipt["unit_prices_usd_per_1m"]["output"] == "0.600000"  # from the stored old version
    assert (new_receipt["price_version"], new_receipt["unit_prices_usd_per_1m"]["input"]) == (new, "0.300000")
    assert new_receipt["unit_prices_usd_per_1m"]["output"] == "1.200000"

    # both versions stored once, with their content; the newest load is current
    await until(lambda: stored(pool, new), 5, "the new version to be stored")
    contents = dict(await pool.fetch("SELECT version, content FROM price_versions WHERE version = ANY($1)", [old, new]))
    assert {v: c.encode() for v, c in contents.items()} == {old: before, new: after}
    listed = {v.version: v for v in await list_versions(pool)}
    assert listed[new].current and not listed[old].current
    assert listed[new].models == listed[old].models > 50
    assert listed[old].first_loaded_at <= listed[new].first_loaded_at


async def test_a_hold_posted_at_expiry_by_the_worker_carries_its_version(
    start_proxy, make_customer, settings, ledger, redis, usage_log, pool, monkeypatch
):
    """The proxy "dies" mid-stream (its heartbeats stop); the worker posts the hold at its
    last progress record, which names the price version the request was admitted under."""
    proxy = await start_proxy({"openai": openai_app()}, heartbeat_seconds=0.05, hold_ttl_seconds=30)
    customer = await make_customer("starter")
    version = version_of(settings.pricing_file.read_bytes())
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{proxy.url}/openai/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={"Authorization": f"Bearer {customer.api_key}", "x-mock-scenario": "slow", "x-mock-chunks": "24"},
        ) as resp,
    ):
        request_id = resp.headers[REQUEST_ID_HEADER]
        await resp.content.readany()
        progress = ledger.keys.progress(customer.user_id)

        async def output_recorded() -> bool:
            record = await redis.hget(progress, request_id)
            return record is not None and orjson.loads(record.split(b" ", 2)[2]).get("out", 0) > 0

        await until(output_recorded, within=10, what="a heartbeat to record the output relayed so far")
        keeper = proxy.app[FORWARDER].keeper

        async def dead() -> int:
            return 0

        monkeypatch.setattr(keeper, "beat", dead)
        holds = ledger.keys.holds(customer.user_id)
        (member,) = [m async for m, _ in redis.zscan_iter(holds, match=f"{request_id}|*")]

        async def expired() -> bool:
            await redis.zadd(holds, {member: 1})  # its expiry passed
            return await expire_holds(ledger) == 1  # 0 while a beat already on its way renewed it

        await until(expired, within=10, what="the hold to expire once its heartbeats stopped")
        await resp.read()  # the stream ends: its own post is a duplicate
    acct = await settled(ledger, customer.user_id)
    assert acct.requests == 1
    charged = await charge_of(pool, usage_log, request_id)
    row = await pool.fetchrow("SELECT estimated, price_version, cost_micro FROM usage_events WHERE id = $1", "chg_" + request_id)
    assert (row["estimated"], row["price_version"], row["cost_micro"]) == (True, version, charged)
    receipt = await receipt_when_settled(proxy.url, customer.api_key, request_id)
    assert (receipt["estimated"], receipt["price_version"], receipt["cost_micro_usd"]) == (True, version, charged)
    assert receipt["unit_prices_usd_per_1m"]["output"] == "0.600000"
    assert receipt["tokens"]["output"] > 0  # a heartbeat's record (admission's has the prompt alone)


async def test_a_spooled_settlement_carries_its_version(
    make_customer, redis, settings, accounts, usage_log, pool, tmp_path, monkeypatch
):
    """A post Redis did not take waits in the spool as its exact call, and the usage row it
    becomes once Redis takes it names the version, the service tier and the 1-hour writes."""
    import proxy.ledger.ledger as ledger_module

    customer = await make_customer("starter")
    spool = Spool(tmp_path / "spool")
    spool.open()
    ledger = Ledger(redis, settings.redis_prefix, spool=spool)
    tiers = accounts.config.tiers
    limits = tiers.tiers["starter"].limits
    hold = Hold(new_id("hold"), customer.user_id, 5_000)
    usage = UsageEvent(customer.key_id, "anthropic", "claude-sonnet-4", "starter", input_tokens=10, cache_write_tokens=7,
                       cache_write_1h_tokens=4, service_tier=ServiceTier.FLEX, price_version="0123456789abcdef")  # fmt: skip
    progress = progress_record(1, usage)
    admitted = await ledger.admit(
        hold, tier="starter", limits=limits, hold_ttl_ms=60_000, renewal=tiers.renewal, progress=progress
    )
    assert admitted.admitted
    monkeypatch.setattr(ledger_module, "RESOLVE_RETRY_PAUSES", (None,))
    resolve = ledger._resolve

    async def away(keys, args):
        raise RedisConnectionError("Redis is away")

    ledger._resolve = away
    assert await ledger.post(hold, cost=99, usage=usage, limits=limits) is None  # spooled
    ledger._resolve = resolve
    assert await spool.replay(ledger.run_settlement) == 1
    spool.close()
    assert await charge_of(pool, usage_log, hold.id) == 99
    row = await pool.fetchrow(
        "SELECT price_version, service_tier, cache_write_tokens, cache_write_1h_tokens FROM usage_events WHERE id = $1",
        "chg_" + hold.id,
    )
    assert tuple(row) == ("0123456789abcdef", "flex", 7, 4)


async def test_versions_are_stored_in_the_background_and_retried_while_postgres_is_away(settings, pool):
    store = ConfigStore(settings.pricing_file, settings.tiers_file)
    version = store.current.prices.version
    calls: list[str] = []

    class Flaky:
        """Refuses the first write, as a Postgres that is restarting would."""

        async def execute(self, *args):
            calls.append(args[1])
            if len(calls) == 1:
                raise OSError("connection refused")
            return await pool.execute(*args)

    loaded_at = store.price_loads[version][1]
    recorder = asyncio.create_task(record_versions(store, Flaky(), 0.01))
    try:
        await until(lambda: len(calls) >= 2, 5, "a retry")
        await asyncio.sleep(0.05)
    finally:
        recorder.cancel()
    assert calls == [version, version]  # stored once it could be, then not again
    first = await pool.fetchval("SELECT first_loaded_at FROM price_versions WHERE version = $1", version)
    assert first <= loaded_at <= datetime.now(UTC)


async def test_a_stored_version_whose_content_is_not_that_version_prices_nothing(pool, settings):
    """A row edited by hand (content that does not hash to its version) gives no unit prices
    rather than another version's; the real content gives that version's book."""
    content = settings.pricing_file.read_bytes()
    real = hashlib.sha256(content).hexdigest()[:16]
    forged = "f" * 16 if real != "f" * 16 else "e" * 16
    await pool.execute(
        "INSERT INTO price_versions (version, content, models, first_loaded_at, last_loaded_at)"
        " VALUES ($1, $2, 1, now(), now()), ($3, $2, 1, now(), now()) ON CONFLICT (version) DO NOTHING",
        forged,
        content.decode(),
        real,
    )
    assert await stored_book(pool, forged) is None
    book = await stored_book(pool, real)
    assert book is not None and book.version == real


async def test_a_receipt_while_postgres_is_away_is_a_503_not_a_crash(settings, ledger):
    dead = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:9/none", min_size=0)  # nothing listens on 9
    try:
        config = ConfigStore(settings.pricing_file, settings.tiers_file)
        answer = await Receipts(dead, config, ledger).lookup(new_id("hold"), "usr_x")
        assert answer is USAGE_LOG_UNAVAILABLE and answer.status == 503
    finally:
        await dead.close()
