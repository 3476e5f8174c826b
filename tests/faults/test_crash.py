"""kill -9 of the proxy with requests in flight: every request that reached the provider is
charged once its hold expires, at its last recorded progress (prompt estimate plus the
output relayed before the last heartbeat), and the ledger check is clean."""

from __future__ import annotations

import asyncio
import math

import aiohttp
import orjson
import pytest

from proxy.config import load_config
from proxy.pricing import Usage

from ..support.mock_upstreams import FINISHED, RECEIVED
from ..support.waiting import until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 2000}


async def _stream(http: aiohttp.ClientSession, url: str, headers: dict[str, str], *, stall: bool) -> int:
    """A streamed request; reads it all (or, ``stall``, only its first bytes); returns the bytes read."""
    read = 0
    try:
        async with http.post(url, json={**BODY, "stream": True}, headers=headers) as response:
            read += len(await response.content.readany())
            if stall:
                await asyncio.sleep(3600)
            async for chunk in response.content.iter_any():
                read += len(chunk)
    except (TimeoutError, aiohttp.ClientError):
        pass
    return read


async def _whole(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
    try:
        async with http.post(url, json=BODY, headers={**headers, "x-fault-delay": "30"}) as response:
            await response.read()
    except aiohttp.ClientError:
        pass


async def test_kill_9_mid_traffic_charges_every_request_the_provider_served(world, upstream):
    prices = load_config(world.settings.pricing_file, world.settings.tiers_file).prices.find("openai", "gpt-4o-mini")
    assert prices is not None
    customer = await world.customer("professional")
    headers = {"Authorization": f"Bearer {customer.api_key}"}
    with world.worker(), world.serve() as proxy:
        url = f"{proxy.url}/openai/v1/chat/completions"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            slow = {**headers, "x-mock-scenario": "slow", "x-mock-chunks": "400"}
            flood = {**headers, "x-mock-chunks": "60000"}  # far more than the socket buffers take
            flights = [asyncio.create_task(_stream(http, url, slow, stall=False)) for _ in range(50)]
            flights += [asyncio.create_task(_stream(http, url, flood, stall=True)) for _ in range(50)]
            flights += [asyncio.create_task(_whole(http, url, headers)) for _ in range(50)]
            await until(lambda: len(upstream.app[RECEIVED]) >= 150, 30, "150 requests at the provider")
            progress = world.ledger.keys.progress(customer.user_id)

            async def streams_recorded_with_output() -> bool:
                # a loaded machine can delay the heartbeats: kill once they have recorded output
                records = [orjson.loads(r.split(b" ", 2)[2]) for r in (await world.redis.hgetall(progress)).values()]
                return sum(1 for usage in records if usage["stream"] and usage["out"] > 0) >= 50

            await until(streams_recorded_with_output, 30, "heartbeats to record the read streams' relayed output")
            finished_at_provider = len(upstream.app[FINISHED])
            proxy.kill()
            for flight in flights:
                flight.cancel()
            await asyncio.gather(*flights, return_exceptions=True)
        served = len(upstream.app[RECEIVED])
        holds_key = world.ledger.keys.holds(customer.user_id)

        async def resolved() -> bool:
            return not await world.redis.zcard(holds_key)

        await until(resolved, 20, "the killed proxy's holds to expire and be posted")  # TTL 3 s, sweep every 0.5 s
        report = await world.ledger_check()

    rows = await world.pool.fetch(
        "SELECT e.stream, e.estimated, e.input_tokens, e.output_tokens, e.cost_micro FROM usage_events e WHERE e.user_id = $1",
        customer.user_id,
    )
    assert len(rows) == served == 150, f"{served} requests reached the provider, {len(rows)} were charged"
    complete = [(r["stream"], r["output_tokens"]) for r in rows if not r["estimated"]]
    assert not complete, f"requests finished before the kill (stream, output tokens): {complete}"
    bodies = {r.body for r in upstream.app[RECEIVED]}
    estimates = {math.ceil((len(b) + 64) / 4) for b in bodies}
    assert {r["input_tokens"] for r in rows} <= estimates  # at least the prompt, estimated from its size
    whole = [r for r in rows if not r["stream"]]
    streams = [r for r in rows if r["stream"]]
    assert len(whole) == 50 and len(streams) == 100
    assert {r["cost_micro"] for r in whole} == {prices.cost_micro(Usage(input_tokens=whole[0]["input_tokens"], estimated=True))}
    relayed = [r for r in streams if r["output_tokens"] > 0]
    assert max(r["output_tokens"] for r in streams) <= prices.max_output_tokens  # an estimate never passes the hold's bound
    assert len(relayed) >= 50  # the streams being read had output relayed before the last heartbeat
    for r in streams:
        assert r["cost_micro"] == prices.cost_micro(
            Usage(input_tokens=r["input_tokens"], output_tokens=r["output_tokens"], estimated=True)
        )
    total = sum(r["cost_micro"] for r in rows)
    print(
        f"kill -9 with {served} requests at the provider (50 streams read, 50 stalled, 50 whole; "
        f"{finished_at_provider} streams the provider had finished): all {len(rows)} charged, "
        f"{total} µ$ in all, {len(relayed)} with relayed output; ledger check clean over {report['accounts']} accounts"
    )
