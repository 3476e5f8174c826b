"""Redis fails over under traffic (REDIS_URL=redis+sentinel://…): the proxy and the worker
follow the new primary without a manual step, every served request is charged once and
the ledger check is clean afterwards (proxy.ledger.resend, proxy.usage)."""

from __future__ import annotations

import asyncio
import collections
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
import redis as redis_sync

from ..support.mock_upstreams import RECEIVED
from ..support.processes import free_port
from ..support.redis_server import redis_binary, start_replica
from ..support.waiting import until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


def _start_sentinel(directory: Path, primary_port: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
        f"sentinel monitor primary 127.0.0.1 {primary_port} 1\n"
        "sentinel down-after-milliseconds primary 1000\nsentinel failover-timeout primary 10000\n"
    )
    process = subprocess.Popen([redis_binary(), str(config), "--sentinel"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            replicas = redis_sync.Redis(port=port).execute_command("SENTINEL", "REPLICAS", "primary")
            if replicas:
                return process, port
        except redis_sync.exceptions.RedisError:
            pass
        assert time.monotonic() < deadline, "the sentinel did not find the primary and its replica"
        time.sleep(0.2)


def _primary(sentinel_port: int) -> int:
    _, port = redis_sync.Redis(port=sentinel_port).execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "primary")
    return int(port)


async def test_a_sentinel_failover_under_traffic_is_followed_and_the_ledger_stays_exact(world, redis_server, upstream, tmp_path):
    world.without_limits("enterprise")
    customer = await world.customer("enterprise")
    replica = start_replica(tmp_path / "replica", redis_server.port)
    # What the README asks of a Sentinel deployment: a primary that has lost its replica (it
    # was just promoted) refuses writes at once, rather than taking charges a failover drops.
    redis_sync.Redis(port=redis_server.port).config_set("min-replicas-to-write", 1)
    sentinel, sentinel_port = _start_sentinel(tmp_path / "sentinel", redis_server.port)
    url = f"redis+sentinel://127.0.0.1:{sentinel_port}/primary"
    outcomes: collections.Counter[str] = collections.Counter()
    try:
        with world.worker(REDIS_URL=url), world.serve(REDIS_URL=url) as proxy:
            stop = asyncio.Event()

            async def load() -> None:
                body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
                headers = {"Authorization": f"Bearer {customer.api_key}"}
                async with aiohttp.ClientSession() as http:
                    while not stop.is_set():
                        async with http.post(f"{proxy.url}/openai/v1/chat/completions", json=body, headers=headers) as r:
                            await r.read()
                            outcomes[str(r.status)] += 1

            clients = [asyncio.create_task(load()) for _ in range(4)]
            await asyncio.sleep(3)
            await asyncio.to_thread(redis_sync.Redis(port=sentinel_port).execute_command, "SENTINEL", "FAILOVER", "primary")
            await until(lambda: _primary(sentinel_port) == replica.port, 30, "the sentinel to promote the replica")
            served_at_failover = outcomes["200"]
            await asyncio.sleep(2)  # traffic goes on through the switch
            await until(lambda: outcomes["200"] > served_at_failover + 20, 30, "serving again, on the new primary")
            stop.set()
            await asyncio.gather(*clients)
            report = await world.ledger_check(REDIS_URL=url)
        served = len(upstream.app[RECEIVED])
        charges = await world.pool.fetchval(
            "SELECT count(*) FROM ledger WHERE user_id = $1 AND kind = 'charge'", customer.user_id
        )
    finally:
        sentinel.kill()
        replica.kill()
    assert set(outcomes) <= {"200", "503"}, outcomes
    # Replication is asynchronous: the old primary's last writes (admissions and charges
    # alike) can miss the promoted replica; the proxy sends its recent settlements again and
    # the worker wrote only what the replica had, so each is charged once, in both ledgers.
    assert charges == served == outcomes["200"], (charges, served, outcomes)
    assert report["clean"]
    print(f"sentinel failover under traffic: {dict(outcomes)}, {charges} charged of {served} served; ledger check clean")
