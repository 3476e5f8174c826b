"""The proxy's aiohttp application: routes, shared resources, the metered handler."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone

import asyncpg
import orjson
from aiohttp import ClientSession, TCPConnector, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import BlockingConnectionPool, Redis

from .admin import setup_admin
from .billing.plans import setup_billing
from .config import Config, ConfigStore
from .forward import Forwarder
from .gate import Gate, count_refusal
from .keys import KeyCache, KeyMirror
from .ledger import Ledger
from .ledger.pipeline import RedisPipeline
from .providers.base import Provider, ProxyError
from .providers.registry import build_providers
from .settings import Settings
from .state import CONFIG, FORWARDER, GATE, LEDGER, POOL, PROVIDERS, REDIS, SETTINGS, caller


def _providers(app: web.Application) -> dict[str, Provider]:
    """Provider instances for the live config (rebuilt when a reload changed it)."""
    config = app[CONFIG].current
    cached = app[PROVIDERS]
    if cached.get("config") is not config:
        cached["config"] = config
        cached["by_name"] = build_providers(config.prices, app[SETTINGS])
    return cached["by_name"]


async def _read_json(request: web.Request, limit: int) -> tuple[bytes, object]:
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    if not body:
        return body, None
    try:
        return body, orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProxyError(400, "invalid_json", f"The request body is not valid JSON: {exc}.") from None


def _too_large(limit: int) -> ProxyError:
    return ProxyError(413, "request_too_large", f"The request body is larger than this gateway's limit of {limit:,} bytes.")


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    """Authenticate, admit, forward and charge one provider request."""
    started = time.perf_counter()
    app = request.app
    provider = _providers(app).get(request.match_info["provider"])
    if provider is None:
        raise web.HTTPNotFound(text=f"no provider {request.match_info['provider']!r} is configured")
    tail = request.match_info["tail"]
    config: Config = app[CONFIG].current
    gate = app[GATE]
    try:
        key = provider.caller_key(request)
        identity = await gate.identify(provider, key)
        body, payload = await _read_json(request, app[SETTINGS].max_body_bytes)
        if provider.is_free(request.method, tail):
            gate.tier_for(config, provider, identity)
            return await app[FORWARDER].relay_free(request, provider, tail, body)
        call = provider.inspect(request.method, tail, body, payload)
        ticket = await gate.admit(config, provider, key, identity, call)  # type: ignore[arg-type]
        return await app[FORWARDER].relay(request, provider, tail, ticket, started)
    except ProxyError as error:
        count_refusal(provider.name, error)
        return provider.error_response(error)


async def credits_handler(request: web.Request) -> web.Response:
    """``GET /api/credits``: the caller's balance, holds, usage, limits and cycle."""
    app = request.app
    identity = await caller(request)
    account = await app[LEDGER].account(identity.user_id) or {}
    tier = app[CONFIG].current.tiers.tiers.get(account.get("tier", ""))
    iso = lambda ms: datetime.fromtimestamp(int(ms) / 1000, tz=timezone.utc).isoformat().replace("+00:00", "Z")  # noqa: E731
    balance, held = int(account.get("balance", 0)), int(account.get("held", 0))
    body = {
        "user_id": identity.user_id,
        "tier": account.get("tier"),
        "status": account.get("status", "active"),
        "balance_micro_usd": balance,
        "held_micro_usd": held,
        "available_micro_usd": balance - held,
        "usage": {
            "tokens": int(account.get("tokens", 0)),
            "requests": int(account.get("requests", 0)),
            "cost_usd": int(account.get("cost", 0)) / 1_000_000,
        },
        "limits": {
            "monthly_tokens": tier.monthly_tokens if tier else None,
            "monthly_requests": tier.monthly_requests if tier else None,
            "rpm": tier.rpm if tier else None,
            "monthly_credits_micro_usd": tier.allowance_micro if tier else None,
        },
        "cycle": {"start": iso(account.get("cycle_start", 0)), "end": iso(account.get("cycle_end", 0))},
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def metrics_handler(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def health_handler(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready_handler(request: web.Request) -> web.Response:
    """Ready when Redis answers (the proxy needs nothing else to serve)."""
    try:
        await request.app[REDIS].ping()
    except Exception as exc:  # any failure means not ready
        return web.json_response({"status": "unavailable", "redis": str(exc)}, status=503)
    return web.json_response({"status": "ready"})


def create_app(settings: Settings, redis_url: str, database_url: str = "") -> web.Application:
    """The proxy application on Redis at ``redis_url``; ``database_url`` (optional) serves
    the routes off the hot path: billing, usage and admin."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[PROVIDERS] = {}

    async def resources(app: web.Application) -> AsyncIterator[None]:
        # Waits for a free connection under bursts instead of failing the request.
        redis = Redis(connection_pool=BlockingConnectionPool.from_url(redis_url, max_connections=256, timeout=10))
        app[POOL] = await asyncpg.create_pool(database_url, min_size=0, max_size=4) if database_url else None  # type: ignore[assignment]
        store = ConfigStore(settings.pricing_file, settings.tiers_file)
        pipeline = RedisPipeline(redis_url)
        ledger = Ledger(redis, settings.redis_prefix, pipeline)
        session = ClientSession(connector=TCPConnector(limit=0, ttl_dns_cache=300), auto_decompress=True)
        app[REDIS], app[CONFIG], app[LEDGER] = redis, store, ledger
        app[GATE] = Gate(KeyCache(KeyMirror(redis, settings.redis_prefix), ledger, settings.key_cache_seconds), ledger, settings.hold_ttl_seconds)
        app[FORWARDER] = Forwarder(
            session, ledger, settings.upstream_connect_timeout, settings.upstream_read_timeout, settings.drain_seconds
        )
        watcher = asyncio.create_task(store.watch(settings.config_reload_seconds))
        yield
        watcher.cancel()
        await app[FORWARDER].close(settings.drain_seconds + 5)
        await session.close()
        pipeline.close()
        await redis.aclose()
        if app[POOL] is not None:
            await app[POOL].close()

    app.cleanup_ctx.append(resources)
    app.router.add_get("/healthz", health_handler)
    app.router.add_get("/readyz", ready_handler)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/api/credits", credits_handler)
    setup_billing(app)
    setup_admin(app)
    app.router.add_route("*", "/{provider}/{tail:.*}", proxy_handler)
    return app
