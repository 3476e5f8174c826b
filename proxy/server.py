"""Serving an aiohttp application on a public port: a deadline for every request's head
(a slowloris client trickling header bytes is cut off), a cap on open connections (so
they never exhaust the process's file descriptors), and a graceful stop on SIGTERM.

aiohttp itself times out neither slow headers nor idle fresh connections, so each
connection's handler reports when it waits for a request head with bytes (or nothing)
arriving, and a sweep closes those that have waited longer than ``HEADER_TIMEOUT_SECONDS``.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from . import metrics
from .probes import mark_draining

log = logging.getLogger("costproxy.server")


@dataclass(frozen=True, slots=True)
class ServeLimits:
    """How long a request head may take, how many connections may be open, how long idle
    keep-alive connections stay, and how a stop proceeds."""

    header_timeout: float = 10.0
    max_connections: int = 0  # 0: the open-file limit minus a reserve
    keepalive_timeout: float = 75.0
    #: after SIGTERM: how long /readyz says "draining" before the port closes
    stop_grace: float = 0.0
    #: after the port closes: how long in-flight requests and streams may take to finish
    drain_timeout: float = 60.0

    def connection_cap(self) -> int:
        if self.max_connections > 0:
            return self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return 100_000
        # a quarter of the descriptors (at most 256) stay free for Redis, Postgres, upstreams and files
        return max(16, soft - min(256, soft // 4))


class _Guard:
    """The connections of one server that are waiting for a request head, and since when."""

    def __init__(self, limits: ServeLimits):
        self.limits = limits
        self.cap = limits.connection_cap()
        self.open = 0
        self.waiting: dict[RequestHandler, float] = {}

    async def sweep(self) -> None:
        """Close connections whose request head is overdue, every fraction of the deadline."""
        every = max(0.05, self.limits.header_timeout / 4)
        while True:
            await asyncio.sleep(every)
            overdue = time.monotonic() - self.limits.header_timeout
            for handler, since in list(self.waiting.items()):
                if since < overdue:
                    self.waiting.pop(handler, None)
                    metrics.CONNECTIONS_CUT.labels(reason="header_timeout").inc()
                    handler.force_close()
                    if handler.transport is not None:
                        handler.transport.abort()


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler, reporting to a :class:`_Guard` when it waits for a head."""

    def __init__(self, manager: web.Server, *, guard: _Guard, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._guard = guard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        guard = self._guard
        guard.open += 1
        if guard.open > guard.cap:
            metrics.CONNECTIONS_CUT.labels(reason="connection_cap").inc()
            self.force_close()
            transport.close()
            return
        guard.waiting[self] = time.monotonic()  # a new connection owes a request head

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        super().data_received(data)
        if self._request_count > heads:
            self._guard.waiting.pop(self, None)
        elif self._waiter is not None:  # idle between requests: these bytes start a head
            self._guard.waiting.setdefault(self, time.monotonic())

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.open -= 1
        self._guard.waiting.pop(self, None)
        super().connection_lost(exc)


async def serve(
    app: web.Application,
    *,
    host: str,
    port: int,
    limits: ServeLimits,
    reuse_port: bool = False,
    reload: Callable[[], object] | None = None,
) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then stop gracefully: ``/readyz`` turns
    unready at once, the port closes after ``stop_grace``, in-flight requests get
    ``drain_timeout`` to finish, and the app's cleanup contexts run (holds settle).
    ``reuse_port`` lets several processes share the port (``serve --workers N``); SIGHUP
    calls ``reload`` (the config files are read again)."""
    loop = asyncio.get_running_loop()
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=limits.drain_timeout)
    await runner.setup()
    assert runner.server is not None
    guard = _Guard(limits)
    manager = runner.server

    def handler() -> GuardedRequestHandler:
        return GuardedRequestHandler(manager, guard=guard, loop=loop, keepalive_timeout=limits.keepalive_timeout, access_log=None)

    listener = await loop.create_server(handler, host, port, reuse_port=reuse_port, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, reload))
    sweeper = asyncio.create_task(guard.sweep())
    log.info(
        "listening on %s:%d (at most %d connections, %.0f s for a request head)", host, port, guard.cap, limits.header_timeout
    )
    try:
        await stop.wait()
        log.info("stopping: draining for %.1f s, then closing the port", limits.stop_grace)
        mark_draining(app)
        await asyncio.sleep(limits.stop_grace)
        listener.close()
    finally:
        sweeper.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
