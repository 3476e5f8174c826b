"""The floor: a bare aiohttp pass-through proxy (no auth, no metering), on uvloop.

    python -m bench.floor --listen 8101=http://127.0.0.1:8001 [--listen PORT=UPSTREAM ...]
    python -m bench.floor --listen 8102=ledger+http://127.0.0.1:8001   # the contract floor


Each listener forwards method, path, query, headers (minus hop-by-hop ones) and body to
its upstream over one shared ``ClientSession`` (pooled keep-alive connections, as the
proxy's), returns non-streamed answers whole with ``web.Response`` and relays event
streams chunk by chunk with ``web.StreamResponse``. Whatever the proxy costs beyond
this is what authentication, admission, metering and charging cost. An upstream given as
``ledger+URL`` gets the contract floor (:mod:`bench.ledger_floor`): the same plus the
two ledger scripts per request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from multidict import CIMultiDict

from .mock_server import serve_from_command_line

# The same set the proxy drops (proxy.providers.base.HOP_BY_HOP), kept separate on purpose:
# the floor must not depend on proxy code.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
        "Content-Encoding",
    )
)
SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", str)
TIMEOUT = ClientTimeout(total=None, sock_connect=10, sock_read=300)


def _headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    async with request.app[SESSION].request(
        request.method,
        request.app[UPSTREAM] + request.path_qs,
        headers=_headers(request.headers),
        data=body or None,
        timeout=TIMEOUT,
    ) as upstream:
        if upstream.content_type != "text/event-stream":
            return web.Response(status=upstream.status, body=await upstream.read(), headers=_headers(upstream.headers))
        response = web.StreamResponse(status=upstream.status, headers=_headers(upstream.headers))
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def floor_app(upstream: str, session_holder: dict[str, ClientSession]) -> web.Application:
    with_ledger = upstream.startswith("ledger+")
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[UPSTREAM] = upstream.removeprefix("ledger+").rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # one pool per process, shared by every listener (like the proxy's one Forwarder session)
        if "session" not in session_holder:
            session_holder["session"] = ClientSession(connector=TCPConnector(limit=0, ttl_dns_cache=300), auto_decompress=True)
        app[SESSION] = session_holder["session"]
        yield
        if not session_holder["session"].closed:
            await session_holder["session"].close()

    app.cleanup_ctx.append(session_ctx)
    if with_ledger:
        from .ledger_floor import add_ledger, metered  # only this target imports proxy code

        add_ledger(app)
        app.router.add_route("*", "/{tail:.*}", metered(forward))
    else:
        app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    session_holder: dict[str, ClientSession] = {}
    serve_from_command_line(__doc__ or "", "UPSTREAM_URL", lambda upstream: floor_app(upstream, session_holder))


if __name__ == "__main__":
    main()
