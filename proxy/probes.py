"""``GET /healthz``, ``/readyz`` and ``/metrics``: what every costproxy process serves."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

#: raises when the process cannot serve (a dependency it needs does not answer)
Readiness = Callable[[web.Application], Awaitable[None]]
_READINESS: web.AppKey[Readiness] = web.AppKey("readiness")
_DRAINING = web.AppKey("draining", bool)


def mark_draining(app: web.Application) -> None:
    """The process is stopping: ``/readyz`` answers 503 from now on, so load balancers stop sending."""
    app[_DRAINING] = True


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _ready(request: web.Request) -> web.Response:
    if request.app.get(_DRAINING):
        return web.json_response({"status": "draining"}, status=503)
    check = request.app.get(_READINESS)
    try:
        if check is not None:
            await check(request.app)
    except Exception as exc:  # any failure means not ready; say which
        return web.json_response({"status": "unavailable", "error": f"{type(exc).__name__}: {exc}"}, status=503)
    return web.json_response({"status": "ready"})


async def _metrics(request: web.Request) -> web.Response:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # `serve --workers N`: every worker's samples, merged
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # unannotated upstream
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_probes(app: web.Application, readiness: Readiness | None = None) -> None:
    """Serve liveness (``/healthz``: the process answers), readiness (``/readyz``: and
    ``readiness`` passes) and the Prometheus metrics on ``app``."""
    if readiness is not None:
        app[_READINESS] = readiness
    app.router.add_get("/healthz", _health)
    app.router.add_get("/readyz", _ready)
    app.router.add_get("/metrics", _metrics)
