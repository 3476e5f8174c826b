"""Pass an admitted request upstream, relay the answer as it arrives, and settle the hold.

Non-streamed answers are read whole (they arrive whole anyway), charged, and returned
with ``x-credits-charged`` / ``x-credits-remaining``. Streams are relayed chunk by chunk;
the charge follows the last chunk. If the client leaves mid-stream the upstream is still
read for up to ``DRAIN_SECONDS`` so the usage the provider bills can be charged; a stream
that never reports usage is charged an estimate, marked as such in the usage log.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import ClientConnectionResetError, ClientError, ClientSession, ClientTimeout, web
from multidict import CIMultiDict

from . import metrics
from .gate import Ticket, credits
from .ledger import Ledger, Resolution, WarnAt
from .pricing import Usage
from .providers.base import HOP_BY_HOP, Provider, ProxyError, estimate_usage

log = logging.getLogger("costproxy.forward")

_CLIENT_GONE = (ConnectionResetError, ClientConnectionResetError)


def _client_headers(upstream: CIMultiDict[str] | object) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in upstream.items() if k.lower() not in HOP_BY_HOP)  # type: ignore[attr-defined]


class Forwarder:
    """Relays requests for one proxy process over a shared upstream connection pool."""

    def __init__(self, session: ClientSession, ledger: Ledger, connect_timeout: float, read_timeout: float, drain_seconds: float):
        self.session = session
        self.ledger = ledger
        self.timeout = ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self.drain_seconds = drain_seconds
        self._tasks: set[asyncio.Task[web.StreamResponse]] = set()

    async def relay_free(self, request: web.Request, provider: Provider, tail: str, body: bytes) -> web.Response:
        """Pass an unmetered request (model listings, token counts) through as it is."""
        url, headers = provider.prepare(request.method, tail, request.query_string, request.headers, body)
        try:
            async with self.session.request(
                request.method, url, headers=headers, data=body or None, timeout=self.timeout
            ) as upstream:
                return web.Response(status=upstream.status, body=await upstream.read(), headers=_client_headers(upstream.headers))
        except (ClientError, asyncio.TimeoutError) as exc:
            raise _unreachable(provider, exc) from None

    async def relay(self, request: web.Request, provider: Provider, tail: str, ticket: Ticket, started: float) -> web.StreamResponse:
        """Forward a metered request and charge what it used.

        The work runs in its own task, shielded from the handler: if the server cancels the
        handler because the client hung up, the upstream is still drained and charged.
        """
        task = asyncio.create_task(self._relay(request, provider, tail, ticket, started))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    async def close(self, timeout: float) -> None:
        """Wait (up to ``timeout`` s) for relays still draining or settling, e.g. at shutdown."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def _relay(self, request: web.Request, provider: Provider, tail: str, ticket: Ticket, started: float) -> web.StreamResponse:
        try:
            return await self._forward(request, provider, tail, ticket, started)
        finally:
            if not ticket.settled:  # an unexpected error or a shutdown cut the relay short
                await self._void(ticket, provider, "relay_failed")

    async def _forward(self, request: web.Request, provider: Provider, tail: str, ticket: Ticket, started: float) -> web.StreamResponse:
        url, headers = provider.prepare(request.method, tail, request.query_string, request.headers, ticket.call.body)
        sent = time.perf_counter()
        try:
            upstream = await self.session.request(
                request.method, url, headers=headers, data=ticket.call.body, timeout=self.timeout
            )
        except (ClientError, asyncio.TimeoutError) as exc:
            await self._void(ticket, provider, "upstream_unreachable")
            raise _unreachable(provider, exc) from None
        async with upstream:
            if upstream.status >= 400:
                return await self._relay_error(upstream, provider, ticket)
            if ticket.call.stream:
                return await self._relay_stream(request, upstream, provider, ticket, started, sent)
            return await self._relay_whole(upstream, provider, ticket, started, sent)

    async def _relay_error(self, upstream, provider: Provider, ticket: Ticket) -> web.Response:
        try:
            body = await upstream.read()
        finally:
            await self._void(ticket, provider, f"upstream_{upstream.status}")
        self._count(provider, ticket, upstream.status)
        return web.Response(status=upstream.status, body=body, headers=_client_headers(upstream.headers))

    async def _relay_whole(self, upstream, provider: Provider, ticket: Ticket, started: float, sent: float) -> web.Response:
        try:
            body = await upstream.read()
        except (ClientError, asyncio.TimeoutError) as exc:
            await self._void(ticket, provider, "upstream_broken")
            raise _unreachable(provider, exc) from None
        upstream_seconds = time.perf_counter() - sent
        usage = provider.usage_from_response(ticket.call, body, upstream.headers)
        if usage is None:
            usage = estimate_usage(ticket.call)
        cost, settled = await self._post(ticket, provider, usage, upstream.status, upstream_seconds)
        headers = _client_headers(upstream.headers)
        headers["x-credits-charged"] = credits(cost)
        headers["x-credits-remaining"] = credits(settled.balance)
        warnings = ticket.tier.usage_warnings(settled.balance, settled.tokens, settled.requests)
        if warnings:
            headers["x-credits-warning"] = ", ".join(warnings)
        metrics.labelled(metrics.OVERHEAD, provider.name).observe(max(0.0, time.perf_counter() - started - upstream_seconds))
        return web.Response(status=upstream.status, body=body, headers=headers)

    async def _relay_stream(
        self, request: web.Request, upstream, provider: Provider, ticket: Ticket, started: float, sent: float
    ) -> web.StreamResponse:
        headers = _client_headers(upstream.headers)
        before = ticket.admission  # a stream's own cost is known only after its last byte
        warnings = ticket.tier.usage_warnings(before.balance, before.tokens, before.requests)
        if warnings:
            headers["x-credits-warning"] = ", ".join(warnings)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        meter = provider.stream_meter(ticket.call)
        client = _Client(request, response, self.drain_seconds)
        gauge = metrics.labelled(metrics.ACTIVE_STREAMS, provider.name)
        gauge.inc()
        try:
            async with asyncio.timeout(None) as client.drain_limit:
                await client.start()
                watcher = asyncio.create_task(client.watch())
                try:
                    async for chunk in upstream.content.iter_any():
                        await client.write(meter.feed(chunk))
                    await client.write(meter.finish())
                finally:
                    watcher.cancel()
            if not client.gone:
                await response.write_eof()
        except _CLIENT_GONE:
            pass
        except (ClientError, asyncio.TimeoutError) as exc:
            log.warning("%s stream ended early (client gone: %s): %r", provider.name, client.gone, exc)
        finally:
            gauge.dec()
            upstream_seconds = time.perf_counter() - sent
            await self._post(ticket, provider, meter.usage or meter.estimate(), upstream.status, upstream_seconds, stream=True)
            # For a stream the proxy's own time is what passes before the request goes out.
            metrics.labelled(metrics.OVERHEAD, provider.name).observe(sent - started)
        return response

    async def _post(
        self, ticket: Ticket, provider: Provider, usage: Usage, status: int, upstream_seconds: float, stream: bool = False
    ) -> tuple[int, Resolution]:
        cost = ticket.model.cost_micro(usage, ticket.call.service_tier, ticket.call.batch)
        tier_name = ticket.identity.tier
        tier = ticket.tier
        ticket.settled = True  # a failed post is not voided: it is retried inside, then the hold expires
        result = await self.ledger.post(
            user_id=ticket.identity.user_id,
            hold_id=ticket.hold_id,
            hold_micro=ticket.hold_micro,
            cost_micro=cost,
            tokens=usage.total_tokens,
            event={
                "key": ticket.identity.key_id, "provider": provider.name, "model": ticket.model.name,
                "tier": tier_name, "in": usage.input_tokens, "cached": usage.cached_input_tokens,
                "cache_write": usage.cache_write_tokens + usage.cache_write_1h_tokens, "out": usage.output_tokens,
                "reasoning": usage.reasoning_tokens, "estimated": int(usage.estimated), "stream": int(stream),
                "status": status, "ms": int(upstream_seconds * 1000),
            },
            warn_at=WarnAt(tier.allowance_micro, tier.monthly_tokens, tier.monthly_requests, int(tier.warning_threshold * 1000)),
        )
        labels = (provider.name, ticket.model.name, tier_name)
        metrics.labelled(metrics.UPSTREAM_LATENCY, provider.name).observe(upstream_seconds)
        metrics.labelled(metrics.TOKENS, *labels, "input").inc(usage.prompt_tokens)
        metrics.labelled(metrics.TOKENS, *labels, "output").inc(usage.output_tokens)
        metrics.labelled(metrics.COST, *labels).inc(cost)
        if usage.estimated:
            metrics.labelled(metrics.ESTIMATED, provider.name).inc()
        self._count(provider, ticket, status)
        return cost, result

    async def _void(self, ticket: Ticket, provider: Provider, reason: str) -> None:
        ticket.settled = True
        await self.ledger.void(user_id=ticket.identity.user_id, hold_id=ticket.hold_id, hold_micro=ticket.hold_micro, reason=reason)
        metrics.HOLDS_VOIDED.labels(reason=reason).inc()

    @staticmethod
    def _count(provider: Provider, ticket: Ticket, status: int) -> None:
        metrics.labelled(metrics.REQUESTS, provider.name, ticket.model.name, ticket.identity.tier, str(status)).inc()


class _Client:
    """The receiving end of a relayed stream: written to until it leaves, then the
    upstream is drained for at most ``drain_seconds`` more to learn the usage."""

    POLL_SECONDS = 1.0

    def __init__(self, request: web.Request, response: web.StreamResponse, drain_seconds: float):
        self.request = request
        self.response = response
        self.drain_seconds = drain_seconds
        self.drain_limit: asyncio.Timeout | None = None
        self.gone = False

    async def start(self) -> None:
        """Send the status and headers; a client already gone starts the drain."""
        try:
            await self.response.prepare(self.request)
        except _CLIENT_GONE:
            self.leave()

    async def write(self, data: bytes) -> None:
        if data and not self.gone:
            try:
                await self.response.write(data)
            except _CLIENT_GONE:
                self.leave()

    def leave(self) -> None:
        if not self.gone:
            self.gone = True
            assert self.drain_limit is not None
            self.drain_limit.reschedule(asyncio.get_running_loop().time() + self.drain_seconds)

    async def watch(self) -> None:
        """Notice a client that hung up while the upstream sends nothing to write."""
        while not self.gone:
            await asyncio.sleep(self.POLL_SECONDS)
            transport = self.request.transport
            if transport is None or transport.is_closing():
                self.leave()


def _unreachable(provider: Provider, exc: BaseException) -> ProxyError:
    if isinstance(exc, asyncio.TimeoutError):
        return ProxyError(504, "upstream_timeout", f"{provider.name} did not answer in time; nothing was charged.", should_retry=True)
    return ProxyError(502, "upstream_unreachable", f"{provider.name} could not be reached; nothing was charged.", should_retry=True)
