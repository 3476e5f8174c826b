"""The contract floor: the bare pass-through plus the ledger work every metered request needs.

Served by the floor process for listeners given as ``--listen PORT=ledger+UPSTREAM``. Each
request runs ``admit.lua`` before it is forwarded and ``resolve.lua`` after it (whole
answers: before the answer is sent; streams: after the last byte), through costproxy's
own :class:`proxy.ledger.Ledger` on one pipelined Redis connection, as the proxy does. That
is the two Redis round trips per request the contract asks for and nothing else of the
proxy: no key lookup, no JSON parsing, no metering, no metrics, no headers. Its usage
events go to the ledger stream, so the worker writes them to Postgres as the proxy's.

What this target costs beyond the floor is the price of the contract's Redis and Postgres
work on this machine; what the proxy costs beyond this target is costproxy's own Python.

Configured from the environment: ``BENCH_REDIS_URL``, ``BENCH_REDIS_PREFIX`` and the
benchmark account's ``BENCH_USER``, ``BENCH_KEY_ID`` and ``BENCH_TIER``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from aiohttp import web
from redis.asyncio import Redis

from proxy.ledger import CycleLimits, Hold, Ledger, Policy, Renewal, UsageEvent, new_id, progress_record
from proxy.ledger.pipeline import RedisPipeline

LEDGER = web.AppKey("ledger", Ledger)
HOLD_MICRO, COST_MICRO = 12_000, 345
#: a price version as the proxy's events carry one (its length is what costs)
VERSION = "0123456789abcdef"
CYCLE = Renewal(cycle_ms=30 * 86_400_000)
UNLIMITED = CycleLimits(
    allowance=0, monthly_tokens=None, monthly_requests=None, rpm=None, policy=Policy.LENIENT, warning_permille=1000
)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def metered(forward: Handler) -> Handler:
    """``forward`` (the floor's handler) between an admission and a settlement."""

    async def metered_forward(request: web.Request) -> web.StreamResponse:
        ledger, tier = request.app[LEDGER], os.environ["BENCH_TIER"]
        hold = Hold(new_id("hold"), os.environ["BENCH_USER"], HOLD_MICRO)
        # the same event as the proxy's, so the worker does the same work per row; the hold
        # starts with a progress record of the prompt alone, as the proxy's does
        usage = UsageEvent(
            key_id=os.environ["BENCH_KEY_ID"], provider="bench", model="bench", tier=tier, input_tokens=9, price_version=VERSION
        )
        admitted = await ledger.admit(
            hold,
            tier=tier,
            limits=UNLIMITED,
            hold_ttl_ms=900_000,
            renewal=lambda now: CYCLE,
            progress=progress_record(COST_MICRO, usage),
        )
        if not admitted.admitted:
            return web.Response(status=403, text=f"refused: {admitted.refusal}")
        response = await forward(request)
        stream = not isinstance(response, web.Response)
        usage = replace(usage, output_tokens=16, stream=stream, status=response.status, latency_ms=1)
        await ledger.post(hold, cost=COST_MICRO, usage=usage, limits=UNLIMITED)
        return response

    return metered_forward


def add_ledger(app: web.Application) -> None:
    """Give a floor app the contract's ledger work per request."""

    async def ledger_ctx(app: web.Application) -> AsyncIterator[None]:
        url = os.environ["BENCH_REDIS_URL"]
        redis, pipeline = Redis.from_url(url), RedisPipeline.from_url(url)
        app[LEDGER] = Ledger(redis, os.environ["BENCH_REDIS_PREFIX"], pipeline)
        yield
        pipeline.close()
        await redis.aclose()

    app.cleanup_ctx.append(ledger_ctx)
