"""Shared fixtures: real Redis and Postgres, a mock upstream, the proxy, accounts.

``REDIS_URL`` / ``DATABASE_URL`` point the suite at external servers; without them it
starts the embedded ones under ``.data/test-servers``. Every run works in its own
Postgres database and every test under its own Redis key prefix, both removed at the end,
so runs can repeat or overlap without colliding.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiosmtpd.controller import Controller
from redis.asyncio import Redis

from proxy.accounts import Accounts
from proxy.config import load_config
from proxy.db import migrate
from proxy.keys import KeyMirror
from proxy.ledger import Ledger
from proxy.settings import Settings
from proxy.usage import UsageLog

from .mock_upstreams import openai_app

ROOT = Path(__file__).resolve().parent.parent
RUN_ID = uuid.uuid4().hex[:8]
SERVERS_DIR = ROOT / ".data" / "test-servers"


def _server_urls() -> tuple[str, str]:
    redis_url, database_url = os.environ.get("REDIS_URL", ""), os.environ.get("DATABASE_URL", "")
    if not redis_url or not database_url:
        from proxy import embedded

        redis_url = redis_url or embedded.redis_url(SERVERS_DIR)
        database_url = database_url or embedded.postgres_url(SERVERS_DIR)
    return redis_url, database_url


@contextmanager
def migrated_database(server_url: str, name: str, seed: Callable[[asyncpg.Connection], Awaitable[None]] | None = None) -> Iterator[str]:
    """A new database ``name`` on the server of ``server_url``, migrated and optionally
    seeded; its URL while in use, dropped after."""

    async def on_server(sql: str) -> None:
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def prepare(url: str) -> None:
        await migrate(url)
        if seed is not None:
            conn = await asyncpg.connect(url)
            try:
                await seed(conn)
            finally:
                await conn.close()

    asyncio.run(on_server(f'CREATE DATABASE "{name}"'))
    url = _with_database(server_url, name)
    try:
        asyncio.run(prepare(url))
        yield url
    finally:
        asyncio.run(on_server(f'DROP DATABASE "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def servers() -> Iterator[tuple[str, str]]:
    """(redis_url, database_url of this run's own database)."""
    redis_url, server_url = _server_urls()
    with migrated_database(server_url, f"costproxy_test_{RUN_ID}") as database_url:
        yield redis_url, database_url
    asyncio.run(_delete_prefix(redis_url, f"t{RUN_ID}"))


def _with_database(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _delete_prefix(redis_url: str, prefix: str) -> None:
    redis = Redis.from_url(redis_url)
    try:
        async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
            await redis.delete(key)
    finally:
        await redis.aclose()


@pytest.fixture
def config_files(tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the repository's pricing.yaml and tiers.yaml the test may edit."""
    pricing, tiers = tmp_path / "pricing.yaml", tmp_path / "tiers.yaml"
    shutil.copy(ROOT / "pricing.yaml", pricing)
    shutil.copy(ROOT / "tiers.yaml", tiers)
    return pricing, tiers


@pytest.fixture
def settings(servers: tuple[str, str], config_files: tuple[Path, Path]) -> Settings:
    redis_url, database_url = servers
    return Settings(
        redis_url=redis_url,
        database_url=database_url,
        pricing_file=config_files[0],
        tiers_file=config_files[1],
        redis_prefix=f"t{RUN_ID}{uuid.uuid4().hex[:6]}:",
        provider_keys={"openai": "sk-operator-openai"},
        key_cache_seconds=0.2,
        config_reload_seconds=0.1,
        drain_seconds=5.0,
        upstream_read_timeout=10.0,
    )


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
    yield p
    await p.close()


@pytest.fixture
def ledger(redis: Redis, settings: Settings) -> Ledger:
    return Ledger(redis, settings.redis_prefix)


@pytest.fixture
def accounts(pool: asyncpg.Pool, ledger: Ledger, redis: Redis, settings: Settings) -> Accounts:
    return Accounts(pool, ledger, KeyMirror(redis, settings.redis_prefix), load_config(settings.pricing_file, settings.tiers_file))


@pytest.fixture
def usage_log(redis: Redis, ledger: Ledger, pool: asyncpg.Pool) -> UsageLog:
    return UsageLog(redis, ledger, pool, batch=1000)


class Inbox:
    """Messages received by the test SMTP server."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], str]] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        self.messages.append((envelope.rcpt_tos, envelope.content.decode()))
        return "250 OK"


@contextmanager
def smtp_server(**options: Any) -> Iterator[tuple[Inbox, int]]:
    """A local SMTP server (aiosmtpd ``Controller`` options) while in the block: (inbox, port)."""
    with socket.socket() as probe:  # aiosmtpd needs a concrete port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port, **options)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


@pytest.fixture
def smtp():
    """A local SMTP server: (inbox, port)."""
    with smtp_server() as server:
        yield server


@dataclass
class Customer:
    user_id: str
    api_key: str
    key_id: str


@pytest.fixture
def make_customer(accounts: Accounts, ledger: Ledger):
    """Create a user on a tier; ``balance_micro`` replaces the allowance when given."""

    async def make(tier: str = "starter", balance_micro: int | None = None) -> Customer:
        user_id, key = await accounts.create_user(f"{uuid.uuid4().hex[:10]}@example.com", tier)
        if balance_micro is not None:
            current = int((await ledger.account(user_id))["balance"])
            await ledger.add(user_id=user_id, amount_micro=balance_micro - current, kind="grant", reason="test balance")
        return Customer(user_id, key.api_key, key.key_id)

    return make


@pytest.fixture
async def upstream(aiohttp_server: Any):
    """The mock OpenAI upstream server."""
    return await aiohttp_server(openai_app())


@pytest.fixture
async def proxy_url(aiohttp_server: Any, settings: Settings, upstream: Any) -> str:
    """Base URL of a running proxy whose OpenAI upstream is the mock."""
    from proxy.app import create_app

    live = replace(settings, upstream_urls={"openai": str(upstream.make_url("")).rstrip("/")})
    server = await aiohttp_server(create_app(live, live.redis_url, live.database_url))
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
def openai_client(proxy_url: str):
    """An ``openai.AsyncOpenAI`` factory pointed at the proxy."""
    import openai

    def make(api_key: str, **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{proxy_url}/openai/v1", api_key=api_key, max_retries=0, **kwargs)

    return make
