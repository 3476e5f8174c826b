"""Processes killed or doubled: a worker killed mid-flush is replaced and every event is
written exactly once; two proxies on one strict account never take it below zero; a live
stream keeps its hold past the TTL while the worker sweeps."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from proxy.ledger import EntryKind
from proxy.usage import GROUP

from ..support.waiting import until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _pending(world, consumer: str | None = None) -> int:
    """Entries of the ledger streams read by the worker group but not acknowledged (of one
    consumer, or of all), summed over the shard streams."""
    total = 0
    for stream in world.ledger.keys.streams():
        summary = await world.redis.xpending(stream, GROUP)
        if consumer is None:
            total += summary["pending"]
        else:
            names = {_text(c["name"]): c["pending"] for c in summary["consumers"]}
            total += names.get(consumer, 0)
    return total


async def test_worker_killed_during_flushes_is_replaced_and_writes_every_event_once(world):
    customer = await world.customer("starter")
    events = 6_000
    with world.worker("first") as first:
        consumer = f"{socket.gethostname()}-{first.process.pid}"  # the worker's consumer in the group
        semaphore = asyncio.Semaphore(64)

        async def grant(n: int) -> None:
            async with semaphore:
                await world.ledger.credit(customer.user_id, amount=1, kind=EntryKind.GRANT, reason=f"grant {n}")

        moves = asyncio.gather(*(grant(n) for n in range(events)))

        async def some_written() -> bool:
            return bool(await world.pool.fetchval("SELECT count(*) > 500 FROM ledger WHERE user_id = $1", customer.user_id))

        await until(some_written, 30, "the first worker to write")
        # hold the worker in the middle of a flush: its next batch is read (pending, not
        # acknowledged) and its INSERT waits on this lock (reads of the table still go through)
        async with world.pool.acquire() as blocker:
            locked = blocker.transaction()
            await locked.start()
            await blocker.execute("LOCK TABLE ledger IN EXCLUSIVE MODE")
            try:

                async def batch_in_flight() -> bool:
                    return await _pending(world, consumer) > 0

                await until(batch_in_flight, 30, "the first worker to read a batch it cannot write")
                written_by_first = await world.pool.fetchval("SELECT count(*) FROM ledger WHERE user_id = $1", customer.user_id)
                first.kill()
                in_flight = await _pending(world, consumer)
                assert in_flight > 0, "the first worker was killed with nothing read and unacknowledged"
            finally:
                await locked.rollback()
        await moves
    # the batch it was writing died with it: not one of its rows reached Postgres
    assert await world.pool.fetchval("SELECT count(*) FROM ledger WHERE user_id = $1", customer.user_id) == written_by_first
    assert await _pending(world, consumer) == in_flight  # still the dead consumer's
    with world.worker("second"):
        report = await world.ledger_check()

        async def all_acknowledged() -> bool:
            return await _pending(world) == 0

        await until(all_acknowledged, 15, "every event to be acknowledged")
    assert await _pending(world, consumer) == 0  # the replacement claimed what the first had read
    rows = await world.pool.fetchval("SELECT count(*) FROM ledger WHERE user_id = $1", customer.user_id)
    assert rows == events + 1  # the opening grant and every grant, each once
    print(
        f"worker kill -9 mid-flush ({in_flight} events read, unacknowledged) after {written_by_first} of {events + 1} rows;"
        f" the replacement claimed them and wrote the rest, {rows} rows exactly"
    )
    assert report["clean"]


async def test_two_proxies_never_take_a_strict_account_below_zero(world):
    world.without_limits("starter", admission="strict")
    customer = await world.customer("starter", balance_micro=10_000)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    headers = {"Authorization": f"Bearer {customer.api_key}", "x-mock-usage": "prompt=50,completion=100,cached=0,reasoning=0"}
    with world.worker(), world.serve("one") as one, world.serve("two") as two:

        async def fire(http: aiohttp.ClientSession, base: str) -> int:
            async with http.post(f"{base}/openai/v1/chat/completions", json=body, headers=headers) as response:
                await response.read()
                return response.status

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            statuses = await asyncio.gather(*(fire(http, (one, two)[n % 2].url) for n in range(300)))
        report = await world.ledger_check()
    account = await world.ledger.account(customer.user_id)
    assert account is not None
    served = statuses.count(200)
    assert set(statuses) <= {200, 403} and 0 < served < 300
    assert account.balance >= 0 and account.balance == 10_000 - served * 68  # 50 × 0.15 + 100 × 0.60 = 67.5 → 68 µ$
    print(f"two proxies, 300 concurrent requests on one strict 10,000 µ$ account: {served} served, balance {account.balance} µ$")
    assert report["clean"]


async def test_a_stream_outliving_its_hold_ttl_keeps_its_hold_and_strict_stays_at_or_above_zero(world):
    customer = await world.customer("free", balance_micro=1_000)  # strict: one worst case fits, not two
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 1000}
    headers = {"Authorization": f"Bearer {customer.api_key}", "x-mock-scenario": "slow", "x-mock-chunks": "160"}
    with world.worker(), world.serve() as proxy:
        url = f"{proxy.url}/openai/v1/chat/completions"
        async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as stream:
            await stream.content.readany()
            await asyncio.sleep(6)  # twice the hold TTL, the worker sweeping every 0.5 s
            second = await http.post(url, json={**body, "stream": False}, headers=headers)
            assert second.status == 403
            await stream.read()
        report = await world.ledger_check()
    account = await world.ledger.account(customer.user_id)
    assert account is not None and (account.balance, account.requests) == (1_000 - 345, 1)
    print(f"an 8 s stream on a 3 s hold TTL: charged its real usage once, balance {account.balance} µ$ ≥ 0")
    assert report["clean"]


async def test_the_worker_checks_the_ledger_on_a_schedule_and_exports_the_result(world):
    customers = [await world.customer() for _ in range(3)]
    with world.worker(LEDGER_CHECK_SECONDS="1") as worker:

        async def metric(name: str) -> float | None:
            async with aiohttp.ClientSession() as http, http.get(f"{worker.url}/metrics") as response:
                for line in (await response.text()).splitlines():
                    if line.startswith(name + " "):
                        return float(line.split()[1])
            return None

        async def checked(accounts: int) -> bool:
            return await metric("costproxy_ledger_check_accounts") == accounts

        await until(lambda: checked(3), 15, "a scheduled ledger check")
        assert await metric("costproxy_ledger_check_differences") == 0
        await world.redis.hincrby(world.ledger.keys.account(customers[1].user_id), "balance", -5)  # what no script would do

        async def mismatch() -> bool:
            return (await metric("costproxy_ledger_check_differences") or 0) > 0

        await until(mismatch, 15, "the check to find the difference")
    assert "balance" in worker.output() and customers[1].user_id in worker.output()
    print("scheduled ledger check: clean over 3 accounts, then found the 5 µ$ an outside write took")
