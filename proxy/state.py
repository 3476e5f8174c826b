"""Typed state of the proxy application (``app[KEY]``), shared by its routes."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from .billing.plans import Plans
from .config import ConfigStore
from .forward import Forwarder
from .gate import Gate
from .ledger import Ledger
from .ledger.pipeline import RequestPipeline
from .redis_url import RedisClient
from .settings import Settings

SETTINGS = web.AppKey("settings", Settings)
REDIS: web.AppKey[RedisClient] = web.AppKey("redis")
#: the pipelined connection that carries the request path's two scripts
PIPELINE: web.AppKey[RequestPipeline] = web.AppKey("pipeline")
CONFIG = web.AppKey("config", ConfigStore)
LEDGER = web.AppKey("ledger", Ledger)
GATE = web.AppKey("gate", Gate)
FORWARDER = web.AppKey("forwarder", Forwarder)
PLANS = web.AppKey("plans", Plans)
#: Postgres, for the routes off the hot path (billing, usage, admin); absent without a database
POOL = web.AppKey("pool", asyncpg.Pool)
