"""PostgreSQL: connection pools and the numbered migrations in ``migrations/``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

MIGRATIONS = Path(__file__).parent / "migrations"
#: what a call to Postgres raises while the server is away, restarting or cut off; the loops
#: that outlive an outage catch these (a connection that dies while it is being released
#: raises ``InternalClientError``)
POSTGRES_UNAVAILABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
#: a connection of its own, or one borrowed from a pool
Connection = asyncpg.Connection | PoolConnectionProxy
# Serialises concurrent `migrate` runs (several replicas starting at once).
_MIGRATION_LOCK = 7_201_453


async def connect_pool(dsn: str, *, min_size: int = 1, max_size: int = 5) -> asyncpg.Pool:
    """A pool to the database at ``dsn``."""
    with _reaching(dsn):
        return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size)


async def migrate(dsn: str) -> list[str]:
    """Apply every migration not yet applied, in order; return the names applied now."""
    with _reaching(dsn):
        conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        applied = []
        for path in sorted(MIGRATIONS.glob("*.sql")):
            if path.name in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", path.name)
            applied.append(path.name)
        return applied
    finally:
        await conn.close()  # which releases the lock


@contextmanager
def _reaching(dsn: str) -> Iterator[None]:
    """Name the server in the error when Postgres cannot be reached (a refused or timed-out
    connection says only "Connection refused")."""
    try:
        yield
    except OSError as exc:
        where = urlsplit(dsn).netloc.rpartition("@")[2] or "localhost"  # never the password
        raise OSError(f"cannot connect to PostgreSQL at {where}: {str(exc) or type(exc).__name__}") from exc


def database_url(server_url: str, name: str) -> str:
    """The URL of database ``name`` on the server that ``server_url`` points at."""
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


async def _on_server(server_url: str, sql: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def create_database(server_url: str, name: str) -> str:
    """Create database ``name`` (a plain identifier) on ``server_url``'s server, apply the
    migrations, and return its URL (tests and the benchmark work in databases of their own)."""
    await _on_server(server_url, f'CREATE DATABASE "{name}"')
    url = database_url(server_url, name)
    try:
        await migrate(url)
    except BaseException:
        await drop_database(server_url, name)
        raise
    return url


async def drop_database(server_url: str, name: str) -> None:
    """Drop database ``name`` on ``server_url``'s server, closing its connections."""
    await _on_server(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
