"""The operator CLI end to end, and the usage log surviving a Postgres outage."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime

import asyncpg
import pytest

from proxy.config import load_config
from proxy.price_versions import store_version
from proxy.pricing import price_version
from proxy.usage import UsageLog

from .support.accounts import account
from .support.money import ALLOWANCE, credits_text


@pytest.fixture
def cli(settings):
    env = {
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "REDIS_PREFIX": settings.redis_prefix,
        "PRICING_FILE": str(settings.pricing_file),
        "TIERS_FILE": str(settings.tiers_file),
        "PATH": "",
    }

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "proxy.cli", *args], env=env, capture_output=True, text=True)
        assert (done.returncode == 0) == ok, done.stderr
        return done

    return run


async def test_users_keys_and_credits_commands(cli, ledger, usage_log, openai_client):
    created = json.loads(cli("users", "create", "--email", "ada@example.com", "--tier", "professional", "--json").stdout)
    user, key = created["user_id"], created["api_key"]
    assert key.startswith("cpk-") and user.startswith("usr_")
    assert (await account(ledger, user)).balance == ALLOWANCE["professional"]
    for taken in ("ada@example.com", "ADA@Example.com"):  # an address has one account whatever its case
        assert "already exists" in cli("users", "create", "--email", taken, "--tier", "free", ok=False).stderr
    assert "unknown tier 'gold'" in cli("users", "create", "--email", "bob@example.com", "--tier", "gold", ok=False).stderr

    await openai_client(key).chat.completions.create(model="gpt-4o-mini", messages=[], max_tokens=5)

    second = json.loads(cli("keys", "create", "--user", "ada@example.com", "--name", "ci", "--json").stdout)
    listed = json.loads(cli("keys", "list", "--user", user, "--json").stdout)
    assert {k["id"] for k in listed} == {created["key_id"], second["key_id"]}
    assert all("api_key" not in k and "key_hash" not in k for k in listed)
    cli("keys", "revoke", second["key_id"])
    listed = {k["id"]: k for k in json.loads(cli("keys", "list", "--user", user, "--json").stdout)}
    assert listed[second["key_id"]]["revoked_at"] is not None and listed[created["key_id"]]["revoked_at"] is None

    granted = json.loads(cli("credits", "grant", user, "--credits", "25", "--reason", "goodwill", "--json").stdout)
    balance = ALLOWANCE["professional"] - 345 + 250_000
    assert granted["balance_micro_usd"] == balance

    while await usage_log.drain_once():
        pass
    shown = json.loads(cli("credits", "show", user, "--json").stdout)
    assert int(shown["account"]["balance"]) == shown["ledger_sum_micro"] == balance
    assert [(r["kind"], r["amount_micro"]) for r in shown["ledger"]] == [
        ("grant", 250_000),
        ("charge", -345),
        ("grant", ALLOWANCE["professional"]),
    ]
    text = cli("credits", "show", "ada@example.com").stdout
    assert f"redis balance {credits_text(balance)} credits" in text and f"ledger sum    {credits_text(balance)} credits" in text


async def test_postgres_outage_delays_usage_rows_and_loses_none(redis, ledger, pool, make_customer, openai_client):
    customer = await make_customer("starter")
    client = openai_client(customer.api_key)
    for _ in range(3):
        await client.chat.completions.create(model="gpt-4o-mini", messages=[], max_tokens=5)

    dead_pool = await asyncpg.create_pool(pool._connect_args[0], min_size=0, max_size=1)  # type: ignore[attr-defined]
    await dead_pool.close()  # a pool that can no longer reach Postgres
    broken = UsageLog(redis, ledger, dead_pool)
    with pytest.raises(asyncpg.InterfaceError):
        await broken.drain_once()
    assert await broken.lag() == 4  # account opening + 3 charges, still in Redis

    # the same consumer, once Postgres is back, writes what it had read but not acknowledged
    recovered = UsageLog(redis, ledger, pool)
    recovered.consumer = broken.consumer
    assert await recovered.drain_once() == 4
    assert await recovered.lag() == 0
    assert await pool.fetchval("SELECT count(*) FROM usage_events WHERE user_id = $1", customer.user_id) == 3
    # the ledger adds up to the balance
    total = await pool.fetchval("SELECT sum(amount_micro) FROM ledger WHERE user_id = $1", customer.user_id)
    assert total == ALLOWANCE["starter"] - 3 * 345


async def test_worker_loop_drains_in_batches_until_stopped(make_customer, openai_client, usage_log, pool):
    customer = await make_customer("starter")
    stop = asyncio.Event()
    running = asyncio.create_task(usage_log.run(stop, gather_seconds=0.05))
    client = openai_client(customer.api_key)
    for _ in range(3):
        await client.chat.completions.create(model="gpt-4o-mini", messages=[], max_tokens=5)
    for _ in range(100):
        written = await pool.fetchval("SELECT count(*) FROM usage_events WHERE user_id = $1", customer.user_id)
        if written == 3:
            break
        await asyncio.sleep(0.05)
    assert written == 3
    assert await usage_log.lag() == 0
    stop.set()
    await asyncio.wait_for(running, 5)  # the loop notices the stop within one read


async def test_worker_loops_outlive_a_redis_outage(make_customer, openai_client, usage_log, pool, ledger, accounts, monkeypatch):
    """A Redis error in the usage log or the expiry sweep is logged and retried, not fatal."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    import proxy.worker as worker

    failures = {"drain": 1, "sweep": 1, "prune": 1}

    def failing_once(name, method, error: Exception | None = None):
        async def call(*args, **kwargs):
            if failures[name]:
                failures[name] -= 1
                raise error or RedisConnectionError("Redis is restarting")
            return await method(*args, **kwargs)

        return call

    monkeypatch.setattr(usage_log, "drain_once", failing_once("drain", usage_log.drain_once))
    monkeypatch.setattr(ledger, "expired_holds", failing_once("sweep", ledger.expired_holds))
    # what asyncpg raised when Postgres shut down while a connection was being released (a worker died of it)
    dying = asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress")
    monkeypatch.setattr(worker, "prune_portal", failing_once("prune", worker.prune_portal, dying))
    customer = await make_customer("starter")
    await openai_client(customer.api_key).chat.completions.create(model="gpt-4o-mini", messages=[], max_tokens=5)

    stop = asyncio.Event()
    loops = asyncio.gather(usage_log.run(stop, gather_seconds=0.05), worker._sweep(ledger, accounts, stop, every=0.05))
    for _ in range(100):
        if await pool.fetchval("SELECT count(*) FROM usage_events WHERE user_id = $1", customer.user_id) == 1:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(loops, 5)  # neither loop died of its error
    assert failures == {"drain": 0, "sweep": 0, "prune": 0}
    assert await pool.fetchval("SELECT count(*) FROM usage_events WHERE user_id = $1", customer.user_id) == 1


async def test_config_versions_lists_stored_versions_and_marks_the_file_on_disk(cli, settings, pool):
    book = load_config(settings.pricing_file, settings.tiers_file).prices
    await store_version(pool, book, datetime.now(UTC))
    listed = {v["version"]: v for v in json.loads(cli("config", "versions", "--json").stdout)}
    assert listed[book.version]["in_file"] and listed[book.version]["models"] == book.model_count
    assert sum(v["in_file"] for v in listed.values()) == 1

    settings.pricing_file.write_bytes(settings.pricing_file.read_bytes() + b"\n# edited\n")
    edited = price_version(settings.pricing_file.read_bytes())
    text = cli("config", "versions").stdout
    assert f"{edited}  the pricing file as it is now: no process has loaded it yet" in text
    assert book.version in text and "(pricing file)" not in text
    assert not any(v["in_file"] for v in json.loads(cli("config", "versions", "--json").stdout))
