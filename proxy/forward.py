"""Pass an admitted request upstream, relay the answer as it arrives, and settle the hold.

Non-streamed answers are read whole (they arrive whole anyway), charged, and returned
with ``x-credits-charged`` / ``x-credits-remaining``. Streams are relayed chunk by chunk;
the charge follows the last chunk. If the client leaves mid-stream the upstream is still
read for up to ``DRAIN_SECONDS`` so the usage the provider bills can be charged; a stream
that never reports usage is charged an estimate, marked as such in the usage log. Every
answer to an admitted request, streamed or not, upstream error or not, carries the
request's id (``x-costproxy-request-id``) for its receipt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from aiohttp import ClientConnectionResetError, ClientError, ClientResponse, ClientSession, ClientTimeout, web
from multidict import CIMultiDict

from . import metrics
from .errors import ProxyError
from .gate import Ticket
from .holds import HoldKeeper
from .ledger import Resolution
from .money import credits
from .pricing import ServiceTier, Usage
from .providers.base import HOP_BY_HOP, Provider, estimate_usage
from .tasks import Background

log = logging.getLogger("costproxy.forward")

_CLIENT_GONE = (ConnectionResetError, ClientConnectionResetError)
#: the request's id on every answer to an admitted request: its receipt is ``GET /api/usage/{id}``
REQUEST_ID_HEADER = "x-costproxy-request-id"


def _client_headers(upstream: Mapping[str, str], ticket: Ticket | None = None) -> CIMultiDict[str]:
    """The upstream's headers as the client gets them; for a metered request, with its id."""
    headers = CIMultiDict((k, v) for k, v in upstream.items() if k.lower() not in HOP_BY_HOP)
    if ticket is not None:
        headers[REQUEST_ID_HEADER] = ticket.request_id
    return headers


class Forwarder:
    """Relays requests for one proxy process over a shared upstream connection pool."""

    def __init__(
        self,
        session: ClientSession,
        keeper: HoldKeeper,
        *,
        connect_timeout: float,
        read_timeout: float,
        drain_seconds: float,
    ):
        self.session = session
        self.keeper = keeper
        self.ledger = keeper.ledger
        self.timeout = ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self.drain_seconds = drain_seconds
        self.relays = Background()

    async def relay_free(self, request: web.Request, provider: Provider, tail: str, body: bytes) -> web.Response:
        """Pass an unmetered request (model listings, token counts) through as it is."""
        url, headers = provider.prepare(request.method, tail, request.rel_url.raw_query_string, request.headers, body)
        try:
            async with self.session.request(
                request.method, url, headers=headers, data=body or None, timeout=self.timeout
            ) as upstream:
                return web.Response(status=upstream.status, body=await upstream.read(), headers=_client_headers(upstream.headers))
        except (TimeoutError, ClientError) as exc:
            raise _unreachable(provider, exc) from None

    async def relay(self, request: web.Request, ticket: Ticket) -> web.StreamResponse:
        """Forward a metered request and charge what it used.

        The work runs in its own task, shielded from the handler: if the server cancels the
        handler because the client hung up, the upstream is still drained and charged.
        """
        return await asyncio.shield(self.relays.spawn(self._relay(request, ticket)))

    async def close(self, within: float) -> None:
        """Wait (up to ``within`` s) for relays still draining or settling, e.g. at shutdown."""
        await self.relays.drain(within)

    async def _relay(self, request: web.Request, ticket: Ticket) -> web.StreamResponse:
        self.keeper.track(ticket)
        try:
            return await self._forward(request, ticket)
        finally:
            self.keeper.release(ticket)
            if not ticket.settled:  # an unexpected error or a shutdown cut the relay short
                await self._void(ticket, "relay_failed")

    async def _forward(self, request: web.Request, ticket: Ticket) -> web.StreamResponse:
        provider, call = ticket.provider, ticket.call
        url, headers = provider.prepare(
            request.method, ticket.visit.tail, request.rel_url.raw_query_string, request.headers, call.body
        )
        sent = time.perf_counter()
        try:
            upstream = await self.session.request(request.method, url, headers=headers, data=call.body, timeout=self.timeout)
        except (TimeoutError, ClientError) as exc:
            await self._void(ticket, "upstream_unreachable")
            raise _unreachable(provider, exc, ticket) from None
        async with upstream:
            if upstream.status >= 400:
                return await self._relay_error(upstream, ticket)
            if call.stream:
                return await self._relay_stream(request, upstream, ticket, sent)
            return await self._relay_whole(upstream, ticket, sent)

    async def _relay_error(self, upstream: ClientResponse, ticket: Ticket) -> web.Response:
        try:
            body = await upstream.read()
        finally:
            await self._void(ticket, f"upstream_{upstream.status}")
        self._count(ticket, upstream.status)
        return web.Response(status=upstream.status, body=body, headers=_client_headers(upstream.headers, ticket))

    async def _relay_whole(self, upstream: ClientResponse, ticket: Ticket, sent: float) -> web.Response:
        provider = ticket.provider
        try:
            body = await upstream.read()
        except (TimeoutError, ClientError) as exc:
            await self._void(ticket, "upstream_broken")
            raise _unreachable(provider, exc, ticket) from None
        upstream_seconds = time.perf_counter() - sent
        usage = provider.usage_from_response(ticket.call, body, upstream.headers)
        if usage is None:  # the answer's size bounds the text generated
            usage = estimate_usage(ticket.call, generated_chars=len(body))
        cost, settled = await self._post(ticket, usage, upstream.status, upstream_seconds)
        headers = _client_headers(upstream.headers, ticket)
        headers["x-credits-charged"] = credits(cost)
        if settled is not None:  # None: Redis is away, the charge waits in the spool
            headers["x-credits-remaining"] = credits(settled.balance)
            warnings = ticket.tier.usage_warnings(settled.balance, settled.tokens, settled.requests)
            if warnings:
                headers["x-credits-warning"] = ", ".join(warnings)
        overhead = time.perf_counter() - ticket.visit.started - upstream_seconds
        metrics.labelled(metrics.OVERHEAD, provider.name).observe(max(0.0, overhead))
        return web.Response(status=upstream.status, body=body, headers=headers)

    async def _relay_stream(
        self, request: web.Request, upstream: ClientResponse, ticket: Ticket, sent: float
    ) -> web.StreamResponse:
        provider = ticket.provider
        headers = _client_headers(upstream.headers, ticket)
        before = ticket.admission  # a stream's own cost is known only after its last byte
        warnings = ticket.tier.usage_warnings(before.balance, before.tokens, before.requests)
        if warnings:
            headers["x-credits-warning"] = ", ".join(warnings)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        meter = ticket.meter = provider.stream_meter(ticket.call)
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
        except (TimeoutError, ClientError) as exc:
            log.warning("%s stream ended early (client gone: %s): %r", provider.name, client.gone, exc)
        finally:
            gauge.dec()
            upstream_seconds = time.perf_counter() - sent
            await self._post(ticket, meter.usage or meter.estimate(), upstream.status, upstream_seconds)
            # For a stream the proxy's own time is what passes before the request goes out.
            metrics.labelled(metrics.OVERHEAD, provider.name).observe(sent - ticket.visit.started)
        return response

    async def _post(self, ticket: Ticket, usage: Usage, status: int, upstream_seconds: float) -> tuple[int, Resolution | None]:
        provider, tier_name = ticket.provider, ticket.identity.tier
        usage = ticket.bound(usage)
        cost = ticket.cost(usage)
        served = usage.service_tier
        if served is ServiceTier.PRIORITY and served not in ticket.model.service_tiers:
            # served above the standard prices, which are all pricing.yaml has: undercharged
            metrics.labelled(metrics.UNPRICED_TIER, provider.name, ticket.model.name, served.value).inc()
        ticket.settled = True  # a post Redis does not take is spooled, never voided
        event = ticket.describe(usage, status=status, latency_ms=int(upstream_seconds * 1000))
        result = await self.ledger.post(ticket.hold, cost=cost, usage=event, limits=ticket.tier.limits)
        labels = (provider.name, ticket.model.name, tier_name)
        metrics.labelled(metrics.UPSTREAM_LATENCY, provider.name).observe(upstream_seconds)
        metrics.labelled(metrics.TOKENS, *labels, "input").inc(usage.prompt_tokens)
        metrics.labelled(metrics.TOKENS, *labels, "output").inc(usage.output_tokens)
        metrics.labelled(metrics.COST, *labels).inc(cost)
        if usage.estimated:
            metrics.labelled(metrics.ESTIMATED, provider.name).inc()
        self._count(ticket, status)
        return cost, result

    async def _void(self, ticket: Ticket, reason: str) -> None:
        ticket.settled = True
        await self.ledger.void(ticket.hold, reason=reason)
        metrics.HOLDS_VOIDED.labels(reason=reason).inc()

    @staticmethod
    def _count(ticket: Ticket, status: int) -> None:
        metrics.labelled(metrics.REQUESTS, ticket.provider.name, ticket.model.name, ticket.identity.tier, str(status)).inc()


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


def _unreachable(provider: Provider, exc: BaseException, ticket: Ticket | None = None) -> ProxyError:
    """The 504 or 502 when the upstream fails; for an admitted request, with its id (its
    receipt says the hold was voided)."""
    headers = {REQUEST_ID_HEADER: ticket.request_id} if ticket is not None else None
    if isinstance(exc, asyncio.TimeoutError):
        return ProxyError(
            504,
            "upstream_timeout",
            f"{provider.name} did not answer in time; nothing was charged.",
            should_retry=True,
            headers=headers,
        )
    return ProxyError(
        502,
        "upstream_unreachable",
        f"{provider.name} could not be reached; nothing was charged.",
        should_retry=True,
        headers=headers,
    )
