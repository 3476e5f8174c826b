"""The money path on a real three-master Redis Cluster (REDIS_URL=redis+cluster://...):
accounts on every node, exact charges through the proxy's pipelined connection, the usage
log reading each shard stream on its node, the webhook listener and `ledger check`, and a
slot migrating in the middle of traffic."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import aiohttp
import asyncpg
import openai
import pytest
from redis.crc import key_slot

from proxy.accounts import Accounts
from proxy.billing.webhooks import create_webhook_app
from proxy.config import load_config
from proxy.keys import KeyMirror
from proxy.ledger import AccountStatus, Ledger
from proxy.ledger.pipeline import ClusterPipeline, request_pipeline
from proxy.recovery import check
from proxy.redis_url import RedisClient, parse_redis_url, redis_client
from proxy.settings import Settings
from proxy.usage import UsageLog
from proxy.worker import expire_holds

from .support import ROOT
from .support.accounts import Customer, create_customer, settled
from .support.cluster import Cluster, redis_cluster
from .support.fake_stripe import FakeState, checkout_completed, event, fake_stripe_app, invoice, line, signed
from .support.mock_upstreams import openai_app
from .support.money import ALLOWANCE
from .support.processes import costproxy, environment
from .support.waiting import until


@dataclass
class OnCluster:
    """The test's ledger, accounts and usage log, on the cluster."""

    redis: RedisClient
    ledger: Ledger
    accounts: Accounts
    usage_log: UsageLog

    async def customer(self, tier: str = "starter") -> Customer:
        return await create_customer(self.accounts, self.ledger, tier)

    async def drained(self) -> None:
        while await self.usage_log.drain_once():
            pass


@pytest.fixture
def settings(settings: Settings, cluster: Cluster) -> Settings:
    # holds expire fast unless renewed; ten beats to a TTL, so a stalled event loop does not let a live hold lapse
    return replace(settings, redis_url=cluster.url, hold_ttl_seconds=1.0, heartbeat_seconds=0.1)


@pytest.fixture
async def on_cluster(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[OnCluster]:
    client = redis_client(parse_redis_url(settings.redis_url))
    ledger = Ledger(client, settings.redis_prefix)
    config = load_config(settings.pricing_file, settings.tiers_file)
    accounts = Accounts(pool, ledger, KeyMirror(client, settings.redis_prefix), config)
    yield OnCluster(client, ledger, accounts, UsageLog(client, ledger, pool, batch=1000))
    keys = [k async for k in client.scan_iter(match=f"{settings.redis_prefix}*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def _on_every_primary(on_cluster: OnCluster, cluster: Cluster, *, at_least: int, tier: str = "starter") -> list[Customer]:
    """``at_least`` new accounts, more if needed until every primary holds one (user ids, and
    so shards, are random: 12 accounts over 16 shards miss a primary about once in 30)."""
    customers: list[Customer] = []
    owners: set[int] = set()
    while len(customers) < at_least or owners != set(cluster.ports):
        assert len(customers) < 100, f"100 accounts and still only on {owners}"
        customers.append(await on_cluster.customer(tier))
        owners.add(cluster.owner(key_slot(on_cluster.ledger.keys.account(customers[-1].user_id).encode())))
    return customers


async def test_accounts_keys_and_the_worker_work_on_every_node(on_cluster, cluster, settings, tmp_path):
    customers = await _on_every_primary(on_cluster, cluster, at_least=20)
    for customer in customers:
        account = await on_cluster.ledger.account(customer.user_id)
        assert account is not None and account.balance == ALLOWANCE["starter"]
    command = ["users", "create", "--email", f"{uuid.uuid4().hex}@example.com", "--tier", "free", "--json"]
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "proxy.cli", *command],
        cwd=ROOT, env=environment(settings), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("cpk-") == 1

    await on_cluster.redis.delete(*[f"{settings.redis_prefix}key:{h}" for h in await _key_hashes(on_cluster, customers)])
    with costproxy(["worker"], environment(settings), tmp_path / "worker.log") as worker:  # on the cluster, as in production

        async def written() -> bool:
            return not await on_cluster.usage_log.lag()

        await until(written, 30, "the worker to write every shard's events")
        assert await on_cluster.ledger.redis.exists(f"{settings.redis_prefix}key:{(await _key_hashes(on_cluster, customers))[0]}")
        assert worker.process.poll() is None, worker.output()


async def _key_hashes(on_cluster: OnCluster, customers: list[Customer]) -> list[str]:
    rows = await on_cluster.accounts.pool.fetch(
        "SELECT key_hash FROM api_keys WHERE user_id = ANY($1::text[])", [c.user_id for c in customers]
    )
    return [row["key_hash"] for row in rows]


async def test_requests_are_charged_exactly_through_the_cluster(on_cluster, start_proxy, pool):
    proxy = await start_proxy({"openai": openai_app()})
    customers = [await on_cluster.customer() for _ in range(6)]
    for customer in customers:
        client = openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=customer.api_key, max_retries=0)
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=[], stream=True)
        async for _ in stream:
            pass
    await on_cluster.drained()
    for customer in customers:
        account = await settled(on_cluster.ledger, customer.user_id)
        assert (account.balance, account.held, account.requests) == (ALLOWANCE["starter"] - 3 * 345, 0, 3)
        report = await check(on_cluster.ledger, pool, user=customer.user_id, wait=0)
        assert report.clean, report.differences
    assert await pool.fetchval(
        "SELECT count(*) FROM usage_events WHERE user_id = ANY($1::text[])", [c.user_id for c in customers]
    ) == 18  # fmt: skip


async def test_live_holds_are_renewed_on_their_nodes_while_the_sweep_runs(on_cluster, start_proxy):
    proxy = await start_proxy({"openai": openai_app()})
    customers = [await on_cluster.customer() for _ in range(4)]
    swept = 0

    async def sweeper() -> None:
        nonlocal swept
        while True:
            swept += await expire_holds(on_cluster.ledger)
            await asyncio.sleep(0.05)

    async def slow_stream(customer: Customer) -> None:
        body = {"model": "gpt-4o-mini", "messages": [], "stream": True}
        headers = {"Authorization": f"Bearer {customer.api_key}", "x-mock-scenario": "slow", "x-mock-chunks": "50"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{proxy.url}/openai/v1/chat/completions", json=body, headers=headers) as r,
        ):
            assert r.status == 200
            await r.read()  # 2.5 s: longer than twice the hold TTL

    sweeping = asyncio.create_task(sweeper())
    try:
        await asyncio.gather(*(slow_stream(c) for c in customers))
    finally:
        sweeping.cancel()
    assert swept == 0
    for customer in customers:
        account = await settled(on_cluster.ledger, customer.user_id)
        assert (account.balance, account.requests) == (ALLOWANCE["starter"] - 345, 1)


async def test_a_slot_migrating_in_the_middle_of_traffic_loses_and_doubles_nothing(on_cluster, cluster, start_proxy, pool):
    proxy = await start_proxy({"openai": openai_app()})
    customer = await on_cluster.customer("enterprise")
    slot = key_slot(on_cluster.ledger.keys.account(customer.user_id).encode())
    before = cluster.owner(slot)
    target = next(port for port in cluster.ports if port != before)
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=customer.api_key, max_retries=0)
    sent = 0

    async def traffic(stop: asyncio.Event) -> None:
        nonlocal sent
        while not stop.is_set() and sent < 1_100:  # within the tier's 1,200 requests a minute, however slow the move
            await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
            sent += 1

    stop = asyncio.Event()
    workers = [asyncio.create_task(traffic(stop)) for _ in range(4)]
    await asyncio.sleep(0.3)
    moved = await asyncio.to_thread(cluster.migrate, slot, target)
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*workers)  # every request succeeded: none raised
    assert cluster.owner(slot) == target and moved >= 3
    await on_cluster.drained()
    account = await settled(on_cluster.ledger, customer.user_id)
    assert (account.balance, account.held, account.requests) == (ALLOWANCE["enterprise"] - sent * 345, 0, sent)
    report = await check(on_cluster.ledger, pool, user=customer.user_id, wait=0)
    assert report.clean, report.differences
    print(f"slot {slot} moved {before} → {target} ({moved} keys) under traffic: {sent} requests, each charged once")


async def test_stripe_events_and_ledger_check_reach_accounts_on_every_node(on_cluster, cluster, settings, pool, aiohttp_server):
    """The webhook listener and `ledger check` on the cluster: a subscription paid for each
    of twelve or more accounts (on all three primaries) sets its tier and allowance."""
    stripe = await aiohttp_server(fake_stripe_app(FakeState()))
    secret = "whsec_cluster"
    billing = replace(
        settings,
        stripe_api_key="sk_test_fake",
        stripe_webhook_secret=secret,
        stripe_api_base=str(stripe.make_url("")).rstrip("/"),
    )
    listener = await aiohttp_server(create_webhook_app(billing, billing.redis_url, billing.database_url))
    customers = await _on_every_primary(on_cluster, cluster, at_least=12, tier="free")
    now = int(time.time())
    async with aiohttp.ClientSession() as http:
        for customer in customers:
            sub, cus = f"sub_{customer.user_id}", f"cus_{customer.user_id}"
            paid = invoice(
                f"in_{customer.user_id}", "subscription_create", [line("price_starter_monthly", now, now + 30 * 86400, 1900)],
                now, user_id=customer.user_id, sub=sub, customer=cus,
            )  # fmt: skip
            for evt in (checkout_completed(customer.user_id, now, sub, cus), event("invoice.paid", paid, now)):
                body, headers = signed(evt, secret)
                async with http.post(listener.make_url("/stripe/webhook"), data=body, headers=headers) as answer:
                    assert answer.status == 200, await answer.text()
    for customer in customers:
        account = await on_cluster.ledger.account(customer.user_id)
        assert account is not None
        assert (account.tier, account.balance, account.status) == ("starter", ALLOWANCE["starter"], AccountStatus.ACTIVE)
    await on_cluster.drained()
    for customer in customers:
        report = await check(on_cluster.ledger, pool, user=customer.user_id, wait=5)
        assert report.clean, report.differences


async def test_a_replica_taking_over_a_dead_primary_is_followed_without_a_restart(tmp_path):
    """A primary that died answers no MOVED: the request path reads the slot map again and
    sends the call to the replica that took the slots over."""
    with redis_cluster(tmp_path / "cluster") as own:
        pipeline = request_pipeline(parse_redis_url(own.url), timeout=2)
        assert isinstance(pipeline, ClusterPipeline)
        failovers: list[str] = []
        pipeline.on_failover = lambda: failovers.append("followed")  # the proxy sends recent settlements again
        key = next(f"{{s{n}}}:k" for n in range(1000) if own.owner(key_slot(f"{{s{n}}}:k".encode())) == own.ports[0])
        assert await pipeline.execute("SET", key, "before", key=key) == b"OK"
        replica = own.add_replica(own.ports[0])
        await asyncio.to_thread(own.node(own.ports[0]).execute_command, "WAIT", 1, 5000)  # the key reached the replica
        await asyncio.to_thread(own.take_over, own.ports[0], replica)
        await until(lambda: own.owner(key_slot(key.encode())) == replica, 30, "the replica to own the slot")
        assert await pipeline.execute("GET", key, key=key) == b"before"
        assert failovers == ["followed"]
        assert await pipeline.execute("SET", key, "after", key=key) == b"OK"
        assert failovers == ["followed"]
        pipeline.close()
