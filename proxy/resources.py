"""Cleanup contexts (aiohttp's ``cleanup_ctx``) for the resources a process opens: each
opens one thing and closes exactly it, so a start-up that fails half-way closes only what
was opened, in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import asyncpg
from aiohttp import web

from .config import ConfigStore, ProviderFactory
from .price_versions import record_versions
from .redis_url import RedisClient, parse_redis_url
from .redis_url import redis_client as connect_redis
from .settings import Settings

Resource = Callable[[web.Application], AsyncIterator[None]]


def redis_client(key: web.AppKey[RedisClient], url: str, max_connections: int = 64) -> Resource:
    """A redis-py client for ``REDIS_URL``'s deployment (one server, a cluster, Sentinel) in
    ``app[key]``; callers wait for a free connection under bursts instead of failing."""

    async def redis(app: web.Application) -> AsyncIterator[None]:
        app[key] = connect_redis(parse_redis_url(url), max_connections)
        yield
        await app[key].aclose()

    return redis


def postgres_pool(key: web.AppKey[asyncpg.Pool], url: str, max_size: int = 4) -> Resource:
    """An asyncpg pool in ``app[key]`` that connects lazily; with no ``url`` the key stays
    unset (a process that can serve without Postgres)."""

    async def postgres(app: web.Application) -> AsyncIterator[None]:
        if not url:
            yield
            return
        app[key] = await asyncpg.create_pool(url, min_size=0, max_size=max_size)
        yield
        await app[key].close()

    return postgres


def config_store(
    key: web.AppKey[ConfigStore],
    settings: Settings,
    providers: ProviderFactory | None = None,
    versions: web.AppKey[asyncpg.Pool] | None = None,
) -> Resource:
    """The config store in ``app[key]``, re-reading the files every ``CONFIG_RELOAD_SECONDS``;
    with ``versions`` (a Postgres pool's key, opened before), every price version it loads
    is stored there in the background (:func:`proxy.price_versions.record_versions`)."""

    async def config(app: web.Application) -> AsyncIterator[None]:
        store = ConfigStore(settings.pricing_file, settings.tiers_file, providers)
        app[key] = store
        loops = [store.watch(settings.config_reload_seconds)]
        pool = app.get(versions) if versions is not None else None
        if pool is not None:
            loops.append(record_versions(store, pool, settings.config_reload_seconds))
        async with running(*loops):
            yield

    return config


@contextlib.asynccontextmanager
async def running(*loops: Coroutine[Any, Any, Any]) -> AsyncIterator[None]:
    """Run coroutines (loops that never return) as tasks while in the block; cancel them after."""
    tasks = [asyncio.create_task(loop) for loop in loops]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
