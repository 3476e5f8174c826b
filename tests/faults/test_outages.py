"""Redis goes away under load: the proxy fails closed (only 503 ledger_unavailable in the
provider's shape while it is down), charges it could not post are spooled and posted once
when Redis is back, and nothing the provider served goes uncharged."""

from __future__ import annotations

import asyncio
import collections
import time

import aiohttp
import pytest

from ..support.mock_upstreams import RECEIVED
from ..support.traffic import steady_load
from ..support.waiting import until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


async def test_redis_stopped_for_15_s_under_load_loses_nothing_and_only_answers_503(world, redis_server, upstream):
    world.without_limits("enterprise")
    customer = await world.customer("enterprise")
    outcomes: collections.Counter[str] = collections.Counter()
    with world.worker(), world.serve() as proxy:
        url = f"{proxy.url}/openai/v1/chat/completions"
        end = time.monotonic() + 26
        load = [asyncio.create_task(steady_load(url, customer.api_key, end, outcomes)) for _ in range(6)]
        await asyncio.sleep(5)
        before_outage = len(upstream.app[RECEIVED])
        await asyncio.to_thread(redis_server.shutdown)
        await asyncio.sleep(15)
        during_outage = len(upstream.app[RECEIVED]) - before_outage
        await asyncio.to_thread(redis_server.start)
        await asyncio.gather(*load)

        async def spool_empty() -> bool:
            async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/metrics") as response:
                return "costproxy_spool_pending 0.0" in await response.text()

        await until(spool_empty, 20, "the proxy's spool to be posted")
        report = await world.ledger_check()

    served = len(upstream.app[RECEIVED])
    charges = await world.pool.fetchval("SELECT count(*) FROM ledger WHERE user_id = $1 AND kind = 'charge'", customer.user_id)
    voids = await world.pool.fetchval("SELECT count(*) FROM ledger WHERE user_id = $1 AND kind = 'void'", customer.user_id)
    assert set(outcomes) <= {"200", "503 ledger_unavailable"}, outcomes
    assert outcomes["503 ledger_unavailable"] > 0 and outcomes["200"] > 0
    assert during_outage <= 6  # at most the requests already admitted when Redis went away
    assert charges == served == outcomes["200"] and voids == 0, (charges, served, outcomes)
    print(
        f"Redis stopped 15 s under load: {dict(outcomes)}; the provider served {served} ({during_outage} while Redis was down), "
        f"{charges} charged, none lost; ledger check clean over {report['accounts']} accounts"
    )
