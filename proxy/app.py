"""The proxy's aiohttp application: routes, one cleanup context per resource, the metered handler."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator

import orjson
from aiohttp import ClientSession, TCPConnector, web

from . import subscriber
from .admin import setup_admin
from .billing.plans import Plans
from .billing.stripe_api import stripe_client
from .errors import ProxyError
from .forward import Forwarder
from .gate import Gate, Visit, count_refusal
from .holds import HoldKeeper
from .keys import KeyCache, KeyMirror
from .ledger import Ledger
from .ledger.pipeline import TRANSIENT_ERRORS, request_pipeline
from .ledger.resend import RecentSettlements, resend_after_failures
from .portal import setup_portal
from .probes import add_probes
from .providers.registry import build_providers
from .redis_url import parse_redis_url
from .resources import Resource, config_store, postgres_pool, redis_client, running
from .settings import Settings
from .spool import Spool, replay_spool
from .state import CONFIG, FORWARDER, GATE, LEDGER, PIPELINE, PLANS, POOL, REDIS, SETTINGS


async def _read_json(request: web.Request, limit: int, within: float) -> tuple[bytes, object]:
    """The body (at most ``limit`` bytes, all of it within ``within`` seconds) and its JSON."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    try:
        async with asyncio.timeout(within):
            body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    except TimeoutError:
        raise ProxyError(408, "request_timeout", f"The request body did not arrive within {within:g} s.") from None
    if not body:
        return body, None
    try:
        return body, orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProxyError(400, "invalid_json", f"The request body is not valid JSON: {exc}.") from None


def _raw_tail(request: web.Request, provider: str) -> str:
    """The path after ``/<provider>/`` exactly as the client sent it (still percent-encoded):
    routes are matched on it, never on aiohttp's decoded ``match_info``."""
    path = request.raw_path.partition("?")[0]
    prefix = f"/{provider}/"
    return path[len(prefix) :] if path.startswith(prefix) else ""


def _too_large(limit: int) -> ProxyError:
    return ProxyError(413, "request_too_large", f"The request body is larger than this gateway's limit of {limit:,} bytes.")


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    """Authenticate, admit, forward and charge one provider request."""
    started = time.perf_counter()
    app = request.app
    config = app[CONFIG].current
    provider = config.providers.get(request.match_info["provider"])
    if provider is None:
        raise web.HTTPNotFound(text=f"no provider {request.match_info['provider']!r} is configured")
    try:
        identity, tier = await app[GATE].identify(config, provider, request)
        route = provider.route(request.method, _raw_tail(request, provider.name))
        settings = app[SETTINGS]
        body, payload = await _read_json(request, settings.max_body_bytes, settings.body_timeout)
        if route.free:
            return await app[FORWARDER].relay_free(request, provider, route.tail, body)
        call = provider.inspect(request.method, route.tail, body, payload)
        visit = Visit(provider, route.tail, started, identity, tier)
        ticket = await app[GATE].admit(config, visit, call)
        return await app[FORWARDER].relay(request, ticket)
    except ProxyError as error:
        count_refusal(provider.name, error)
        return provider.error_response(error)


# resources, opened in order and closed in reverse ------------------------------------------
def _pipeline(url: str) -> Resource:
    async def pipeline(app: web.Application) -> AsyncIterator[None]:
        app[PIPELINE] = request_pipeline(parse_redis_url(url))
        yield
        app[PIPELINE].close()

    return pipeline


_UPSTREAM = web.AppKey("upstream_session", ClientSession)


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    app[_UPSTREAM] = ClientSession(connector=TCPConnector(limit=0, ttl_dns_cache=300), auto_decompress=True)
    yield
    await app[_UPSTREAM].close()


async def _stripe(app: web.Application) -> AsyncIterator[None]:
    async with stripe_client(app[SETTINGS]) as client:
        app[PLANS] = Plans(client, lambda: app[CONFIG].current.tiers, app[SETTINGS])
        yield


async def _request_path(app: web.Application) -> AsyncIterator[None]:
    """The ledger (with this process's settlement spool), the gate, the forwarder and the
    hold keeper. At shutdown, relays still draining or settling get ``DRAIN_SECONDS`` (plus
    a margin) to finish, with their holds still renewed; then the spool gets a last replay."""
    settings = app[SETTINGS]
    spool = Spool(settings.spool_dir)
    spool.open()
    recent = RecentSettlements(settings.resend_seconds)
    ledger = Ledger(app[REDIS], settings.redis_prefix, app[PIPELINE], spool, recent)
    keys = KeyCache(KeyMirror(app[REDIS], settings.redis_prefix), ledger, settings.key_cache_seconds)
    keeper = HoldKeeper(ledger, hold_ttl_seconds=settings.hold_ttl_seconds, heartbeat_seconds=settings.heartbeat_seconds)
    app[LEDGER] = ledger
    app[GATE] = Gate(keys, ledger, settings.hold_ttl_seconds)
    app[FORWARDER] = Forwarder(
        app[_UPSTREAM],
        keeper,
        connect_timeout=settings.upstream_connect_timeout,
        read_timeout=settings.upstream_read_timeout,
        drain_seconds=settings.drain_seconds,
    )
    async with running(keeper.run(), replay_spool(spool, ledger), resend_after_failures(recent, ledger.resend)):
        yield
        await app[FORWARDER].close(settings.drain_seconds + 5)
        await app[GATE].releases.drain(5)
    with contextlib.suppress(*TRANSIENT_ERRORS):
        await spool.replay(ledger.run_settlement)
    spool.close()


async def _redis_answers(app: web.Application) -> None:
    """The proxy needs nothing but Redis to serve."""
    await app[REDIS].ping()


def create_app(settings: Settings, redis_url: str, database_url: str = "") -> web.Application:
    """The proxy application on Redis at ``redis_url``; ``database_url`` (optional) serves
    the routes off the hot path: billing, usage and admin."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app.cleanup_ctx.extend(
        [
            redis_client(REDIS, redis_url, max_connections=256),
            _pipeline(redis_url),
            postgres_pool(POOL, database_url),
            config_store(CONFIG, settings, functools.partial(build_providers, settings), versions=POOL),
            _upstream_session,
            _stripe,
            _request_path,
        ]
    )
    add_probes(app, _redis_answers)
    subscriber.add_routes(app)
    setup_admin(app)
    if settings.portal_enabled:
        setup_portal(app)
    # [\s\S]: a decoded newline must reach the handler too, to be refused in the provider's shape
    app.router.add_route("*", r"/{provider}/{tail:[\s\S]*}", proxy_handler)
    return app
