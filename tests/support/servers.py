"""The Redis and PostgreSQL servers the suite runs on, and what it makes on them.

``REDIS_URL`` / ``DATABASE_URL`` point the suite at external servers; without them it
starts the embedded ones under ``.data/test-servers``. Every run works in its own
Postgres database (tests that check global figures in one of their own) and every test
under its own Redis key prefix starting with ``t<RUN_ID>``; all are removed at the end.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import asyncpg
from redis.asyncio import Redis

from proxy.db import create_database, drop_database

from . import ROOT

#: this run's tag: its database name and every Redis prefix it uses carry it
RUN_ID = uuid.uuid4().hex[:8]
SERVERS_DIR = ROOT / ".data" / "test-servers"

Seed = Callable[[asyncpg.Connection], Awaitable[None]]


def server_urls() -> tuple[str, str]:
    """(Redis URL, PostgreSQL server URL): from the environment, else the embedded servers."""
    redis_url, database_url = os.environ.get("REDIS_URL", ""), os.environ.get("DATABASE_URL", "")
    if not redis_url or not database_url:
        from proxy import embedded

        redis_url = redis_url or embedded.redis_url(SERVERS_DIR)
        database_url = database_url or embedded.postgres_url(SERVERS_DIR)
    return redis_url, database_url


@contextmanager
def migrated_database(server_url: str, name: str, seed: Seed | None = None) -> Iterator[str]:
    """A new database ``name`` on the server of ``server_url``, migrated and optionally
    seeded; its URL while in use, dropped after."""

    async def seeded() -> str:
        url = await create_database(server_url, name)
        if seed is not None:
            conn = await asyncpg.connect(url)
            try:
                await seed(conn)
            finally:
                await conn.close()
        return url

    url = asyncio.run(seeded())
    try:
        yield url
    finally:
        asyncio.run(drop_database(server_url, name))


def fresh_database(run_url: str, seed: Seed | None = None) -> AbstractContextManager[str]:
    """A migrated database of its own next to the run's (figures are global, so tests that
    check them exactly must not see other tests' rows); ``seed`` fills it; dropped after."""
    return migrated_database(run_url, f"costproxy_admin_{uuid.uuid4().hex[:10]}", seed)


async def delete_prefix(redis_url: str, prefix: str) -> None:
    """Delete every Redis key starting with ``prefix``."""
    redis = Redis.from_url(redis_url)
    try:
        async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
            await redis.delete(key)
    finally:
        await redis.aclose()
