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
from collections.abc import Awaitable, Callable

from aiohttp import web
from redis.asyncio import Redis

from proxy.ledger import Ledger, new_id
from proxy.ledger.pipeline import RedisPipeline

LEDGER = web.AppKey("ledger", Ledger)
HOLD_MICRO, COST_MICRO = 12_000, 345
CYCLE_MS = 30 * 86_400_000


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def metered(forward: Handler) -> Handler:
    """``forward`` (the floor's handler) between an admission and a settlement."""

    async def metered_forward(request: web.Request) -> web.StreamResponse:
        ledger, user = request.app[LEDGER], os.environ["BENCH_USER"]
        hold_id = new_id("hold")
        admitted = await ledger.admit(
            user_id=user, tier=os.environ["BENCH_TIER"], hold_id=hold_id, hold_micro=HOLD_MICRO, strict=False,
            monthly_tokens=None, monthly_requests=None, rpm=None, hold_ttl_ms=900_000, allowance_micro=0,
            renewal=lambda now: (CYCLE_MS, 0, 0),
        )
        if admitted.reason != "ok":
            return web.Response(status=403, text=f"refused: {admitted.reason}")
        response = await forward(request)
        # the same event fields as the proxy's, so the worker does the same work per row
        await ledger.post(
            user_id=user, hold_id=hold_id, hold_micro=HOLD_MICRO, cost_micro=COST_MICRO, tokens=25,
            event={"key": os.environ["BENCH_KEY_ID"], "provider": "bench", "model": "bench", "tier": os.environ["BENCH_TIER"],
                   "in": 9, "cached": 0, "cache_write": 0, "out": 16, "reasoning": 0, "estimated": 0,
                   "stream": int(not isinstance(response, web.Response)), "status": response.status, "ms": 1},
        )
        return response

    return metered_forward


def add_ledger(app: web.Application) -> None:
    """Give a floor app the contract's ledger work per request."""

    async def ledger_ctx(app: web.Application):
        url = os.environ["BENCH_REDIS_URL"]
        redis, pipeline = Redis.from_url(url), RedisPipeline(url)
        app[LEDGER] = Ledger(redis, os.environ["BENCH_REDIS_PREFIX"], pipeline)
        yield
        pipeline.close()
        await redis.aclose()

    app.cleanup_ctx.append(ledger_ctx)
