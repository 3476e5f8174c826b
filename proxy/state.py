"""Typed application state shared by the proxy's routes, and who is calling them."""

from __future__ import annotations

import asyncpg
from aiohttp import web
from redis.asyncio import Redis

from .config import ConfigStore
from .forward import Forwarder
from .gate import Gate
from .keys import Identity
from .ledger import Ledger
from .settings import Settings

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", Redis)
CONFIG = web.AppKey("config", ConfigStore)
LEDGER = web.AppKey("ledger", Ledger)
GATE = web.AppKey("gate", Gate)
FORWARDER = web.AppKey("forwarder", Forwarder)
PROVIDERS = web.AppKey("providers", dict)
#: Postgres, for the routes off the hot path (billing, usage, admin); connects lazily
POOL = web.AppKey("pool", asyncpg.Pool)


def request_key(request: web.Request) -> str | None:
    """The proxy key on a costproxy API call: ``Authorization: Bearer`` or ``x-api-key``."""
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key")


async def caller(request: web.Request) -> Identity:
    """The identity behind the request's proxy key, or a JSON 401."""
    key = request_key(request)
    identity = await request.app[GATE].keys.lookup(key) if key else None
    if identity is None:
        raise web.HTTPUnauthorized(
            text='{"error": {"message": "Missing or unknown API key.", "code": "invalid_api_key"}}',
            content_type="application/json",
        )
    return identity
