"""The usage log writes to Postgres only what a replica has: events read from a primary
whose replica has not acknowledged them stay pending in Redis and are written once it has
(a failover to that replica could otherwise leave Postgres with charges Redis lost).
Real servers: a primary with a replica, and a Redis Cluster primary with one."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import asyncpg
import pytest
import redis as redis_sync

from proxy.accounts import Accounts
from proxy.config import load_config
from proxy.keys import KeyMirror
from proxy.ledger import EntryKind, Ledger
from proxy.recovery import check
from proxy.redis_url import RedisClient, parse_redis_url, redis_client
from proxy.settings import Settings
from proxy.usage import UnreplicatedError, UsageLog

from .support.accounts import create_customer
from .support.cluster import redis_cluster
from .support.money import ALLOWANCE
from .support.redis_server import primary_and_replica, replicate
from .support.waiting import until


async def _held_back_while_the_replicas_are_stopped(
    client: RedisClient, replicas: list[int], pool: asyncpg.Pool, settings: Settings
) -> None:
    ledger = Ledger(client, settings.redis_prefix)
    accounts = Accounts(
        pool, ledger, KeyMirror(client, settings.redis_prefix), load_config(settings.pricing_file, settings.tiers_file)
    )
    log = UsageLog(client, ledger, pool, replication_wait_ms=300)
    await log.ensure_groups()  # as the worker does at start
    assert await log.drain_once() == 0  # nothing yet, and no wait for an empty read
    for pid in replicas:
        os.kill(pid, signal.SIGSTOP)  # the replica stops taking the replication stream
    try:
        customer = await create_customer(accounts, ledger, "starter")
        waiting = await log.lag()
        assert waiting >= 1  # the account's opening grant, at least
        started = time.monotonic()
        with pytest.raises(UnreplicatedError):
            await log.drain_once()
        assert time.monotonic() - started >= 0.3  # it waited the replication wait for the acknowledgement
        assert await pool.fetchval("SELECT count(*) FROM ledger WHERE user_id = $1", customer.user_id) == 0
        assert await log.lag() == waiting  # nothing acknowledged or deleted in Redis
    finally:
        for pid in replicas:
            os.kill(pid, signal.SIGCONT)
    log.replication_wait_ms = 5_000  # from here every batch must be acknowledged, however busy the machine
    # Read again from the consumer's pending entries, as the worker's loop does after an error.
    assert await log.drain_once(pending_first=True) == waiting
    assert await log.lag() == 0
    assert await pool.fetchval("SELECT count(*) FROM ledger WHERE user_id = $1", customer.user_id) == waiting
    total = await pool.fetchval("SELECT sum(amount_micro) FROM ledger WHERE user_id = $1", customer.user_id)
    account = await ledger.account(customer.user_id)
    assert account is not None and total == account.balance


async def test_a_primary_with_a_stopped_replica_writes_nothing_until_the_replica_has_it(tmp_path: Path, pool, settings):
    primary, replica = primary_and_replica(tmp_path)
    try:
        client = redis_client(parse_redis_url(primary.url))
        try:
            assert replica.process is not None
            await _held_back_while_the_replicas_are_stopped(client, [replica.process.pid], pool, settings)
        finally:
            await client.aclose()
    finally:
        replica.kill()
        primary.kill()


async def test_a_cluster_primary_with_a_stopped_replica_writes_nothing_until_the_replica_has_it(tmp_path: Path, pool, settings):
    with redis_cluster(tmp_path / "cluster") as cluster:
        for port in cluster.ports:  # every primary gets a replica: whichever shard the account lands in waits
            cluster.add_replica(port)
        replicas = [process.pid for port, process in cluster.processes.items() if port not in cluster.ports]
        client = redis_client(parse_redis_url(cluster.url))
        try:
            await _held_back_while_the_replicas_are_stopped(client, replicas, pool, settings)
        finally:
            await client.aclose()


async def test_what_a_promoted_replica_never_received_is_in_neither_postgres_nor_redis(tmp_path: Path, pool, settings):
    """The failover a Sentinel runs, step by step: the replica is promoted, the old primary
    still takes a write (no ``min-replicas-to-write``), then becomes a replica itself and
    drops it. The worker read that write from the old primary but never wrote it, so the
    new primary and Postgres agree to the micro-dollar."""
    primary, replica = primary_and_replica(tmp_path)
    old, new = redis_client(parse_redis_url(primary.url)), redis_client(parse_redis_url(replica.url))
    try:
        ledger = Ledger(old, settings.redis_prefix)
        config = load_config(settings.pricing_file, settings.tiers_file)
        customer = await create_customer(Accounts(pool, ledger, KeyMirror(old, settings.redis_prefix), config), ledger, "starter")
        log = UsageLog(old, ledger, pool, replication_wait_ms=5_000)
        await log.ensure_groups()
        assert await log.drain_once() >= 1  # the account's opening, acknowledged by the replica

        await asyncio.to_thread(redis_sync.Redis(port=replica.port).execute_command, "REPLICAOF", "NO", "ONE")
        old_primary = redis_sync.Redis(port=primary.port)
        await until(lambda: old_primary.info("replication")["connected_slaves"] == 0, 10, "the old primary to lose its replica")
        await ledger.credit(customer.user_id, amount=5_000, kind=EntryKind.GRANT, reason="written to the old primary only")
        await log.refresh_replicas()  # the old primary has no replica now; it had one
        log.replication_wait_ms = 300
        with pytest.raises(UnreplicatedError):
            await log.drain_once()
        lost = "SELECT count(*) FROM ledger WHERE user_id = $1 AND reason = 'written to the old primary only'"
        assert await pool.fetchval(lost, customer.user_id) == 0

        await asyncio.to_thread(replicate, primary.port, replica.port)  # the old primary rejoins and drops the grant
        survivor = UsageLog(new, Ledger(new, settings.redis_prefix), pool, replication_wait_ms=5_000)
        survivor.consumer = log.consumer
        while await survivor.drain_once():
            pass
        report = await check(Ledger(new, settings.redis_prefix), pool, user=customer.user_id, wait=5)
        assert report.clean, report.differences
        account = await Ledger(new, settings.redis_prefix).account(customer.user_id)
        assert account is not None and account.balance == ALLOWANCE["starter"]
        assert await pool.fetchval(lost, customer.user_id) == 0
    finally:
        await old.aclose()
        await new.aclose()
        replica.kill()
        primary.kill()


async def test_a_full_primary_is_still_drained_and_a_new_primary_without_replicas_is_not_waited_on(
    tmp_path: Path, pool, settings
):
    """At ``maxmemory`` (noeviction) a primary refuses SET, yet the worker must drain the
    streams that fill it: the acknowledgement rides on PEXPIRE. And after a failover to a
    replica whose old primary is gone for good, the worker learns it is another server with
    no replica and writes again (it does not wait forever for the lost one's replica)."""
    primary, replica = primary_and_replica(tmp_path)
    old, new = redis_client(parse_redis_url(primary.url)), redis_client(parse_redis_url(replica.url))
    try:
        ledger = Ledger(old, settings.redis_prefix)
        config = load_config(settings.pricing_file, settings.tiers_file)
        accounts = Accounts(pool, ledger, KeyMirror(old, settings.redis_prefix), config)
        log = UsageLog(old, ledger, pool, replication_wait_ms=5_000)
        await log.ensure_groups()  # the marks are written while there is room
        first = await create_customer(accounts, ledger, "starter")
        assert await log.drain_once() >= 1

        second = await create_customer(accounts, ledger, "starter")
        await old.config_set("maxmemory", 1)  # full: every SET is refused with OOM from here on
        try:
            with pytest.raises(redis_sync.exceptions.ResponseError, match="maxmemory"):
                await old.set("probe", "x")
            assert await log.drain_once() >= 1
            assert await log.lag() == 0
        finally:
            await old.config_set("maxmemory", 0)
        written = "SELECT count(*) FROM ledger WHERE user_id = ANY($1::text[])"
        assert await pool.fetchval(written, [first.user_id, second.user_id]) >= 2

        await asyncio.to_thread(redis_sync.Redis(port=replica.port).execute_command, "REPLICAOF", "NO", "ONE")
        primary.kill()  # the old primary is gone for good: the new one has no replica
        third = await create_customer(
            Accounts(pool, Ledger(new, settings.redis_prefix), KeyMirror(new, settings.redis_prefix), config),
            Ledger(new, settings.redis_prefix),
            "starter",
        )
        log.redis = new  # as Sentinel's client follows the new primary
        log.replication_wait_ms = 300
        with pytest.raises(UnreplicatedError):  # read from another server than the one it knew
            await log.drain_once(pending_first=True)
        while await log.drain_once(pending_first=True):
            pass
        assert await pool.fetchval("SELECT count(*) FROM ledger WHERE user_id = $1", third.user_id) >= 1
        assert await log.lag() == 0
    finally:
        await old.aclose()
        await new.aclose()
        replica.kill()
        if primary.process is not None and primary.process.poll() is None:
            primary.kill()
