"""The suite's fixtures: real Redis and Postgres, the config files, the ledger and accounts,
customers, a local SMTP server, and one factory that starts a proxy in front of mock
upstreams (``start_proxy``), with the OpenAI conveniences built on it.

Support code (servers, money, accounts, mocks, ...) lives in :mod:`tests.support`.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from proxy.accounts import Accounts
from proxy.app import create_app
from proxy.billing.webhooks import create_webhook_app
from proxy.config import load_config
from proxy.keys import KeyMirror
from proxy.ledger import Ledger
from proxy.providers.registry import BUILTIN_URLS
from proxy.settings import Settings
from proxy.usage import UsageLog

from .support import ROOT
from .support.accounts import Customer, create_customer
from .support.cluster import Cluster, redis_cluster
from .support.fake_stripe import WEBHOOK_SECRET, FakeState, fake_stripe_app, signed
from .support.harness import RunningProxy, StartProxy, operator_key
from .support.http import url_of
from .support.mail import Inbox, smtp_server
from .support.mock_upstreams import openai_app
from .support.servers import RUN_ID, delete_prefix, migrated_database, server_urls


@pytest.fixture(scope="session")
def servers() -> Iterator[tuple[str, str]]:
    """(redis_url, database_url of this run's own database)."""
    redis_url, server_url = server_urls()
    with migrated_database(server_url, f"costproxy_test_{RUN_ID}") as database_url:
        yield redis_url, database_url
    asyncio.run(delete_prefix(redis_url, f"t{RUN_ID}"))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real three-master Redis Cluster on loopback ports, for the whole session."""
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


@pytest.fixture
def config_files(tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the repository's pricing.yaml and tiers.yaml the test may edit."""
    pricing, tiers = tmp_path / "pricing.yaml", tmp_path / "tiers.yaml"
    shutil.copy(ROOT / "pricing.yaml", pricing)
    shutil.copy(ROOT / "tiers.yaml", tiers)
    return pricing, tiers


@pytest.fixture
def settings(servers: tuple[str, str], config_files: tuple[Path, Path], tmp_path: Path) -> Settings:
    """The test's settings: its own Redis prefix and spool directory, the config copies,
    short cache and reload intervals, and ``operator_key(name)`` for the built-in providers."""
    redis_url, database_url = servers
    return Settings(
        redis_url=redis_url,
        database_url=database_url,
        pricing_file=config_files[0],
        tiers_file=config_files[1],
        redis_prefix=f"t{RUN_ID}{uuid.uuid4().hex[:6]}:",
        provider_keys={name: operator_key(name) for name in BUILTIN_URLS},
        key_cache_seconds=0.2,
        config_reload_seconds=0.1,
        drain_seconds=5.0,
        upstream_read_timeout=10.0,
        spool_dir=tmp_path / "spool",
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
    config = load_config(settings.pricing_file, settings.tiers_file)
    return Accounts(pool, ledger, KeyMirror(redis, settings.redis_prefix), config)


@pytest.fixture
def usage_log(redis: Redis, ledger: Ledger, pool: asyncpg.Pool) -> UsageLog:
    return UsageLog(redis, ledger, pool, batch=1000)


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    """A local SMTP server: (inbox, port)."""
    with smtp_server() as server:
        yield server


@pytest.fixture
def make_customer(accounts: Accounts, ledger: Ledger) -> Callable[..., Awaitable[Customer]]:
    """``await make_customer(tier="starter", balance_micro=None)``: a user on ``tier`` with a
    key; ``balance_micro`` replaces the allowance when given."""

    async def make(tier: str = "starter", balance_micro: int | None = None) -> Customer:
        return await create_customer(accounts, ledger, tier, balance_micro)

    return make


# the proxy ---------------------------------------------------------------------------------
@pytest.fixture
def start_proxy(aiohttp_server: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> StartProxy:
    """The one way tests start a proxy::

        proxy = await start_proxy(
            {"groq": prefixed_openai_app("/openai"), "bedrock": bedrock_app()},  # mock upstreams to start
            env={"GROQ_API_KEY": "gsk-operator"},  # set for the test: providers' api_key_env
            base_paths={"groq": "/openai"},        # appended to a mock's URL, as in a base_url
            database=False,                        # no Postgres pool (routes off the hot path answer 503)
            admin_token=ADMIN_TOKEN, upstream_urls={"openai": "http://127.0.0.1:9"},  # any Settings field
        )

    starts each mock upstream and a proxy on the test's ``settings`` with those changes,
    routing each started provider to its mock (as ``<NAME>_UPSTREAM_URL`` would; other
    ``upstream_urls`` given are kept, e.g. a dead one). The built-in providers hold
    ``operator_key(name)``. Returns a :class:`RunningProxy` (``.url``, ``.app``, ``.upstreams``).
    """

    async def start(
        upstreams: Mapping[str, web.Application] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        base_paths: Mapping[str, str] | None = None,
        database: bool = True,
        **changes: Any,
    ) -> RunningProxy:
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        servers = {name: await aiohttp_server(app) for name, app in (upstreams or {}).items()}
        live = replace(settings, **changes)
        routed = {name: url_of(server) + (base_paths or {}).get(name, "") for name, server in servers.items()}
        live = replace(live, upstream_urls={**live.upstream_urls, **routed})
        server = await aiohttp_server(create_app(live, live.redis_url, live.database_url if database else ""))
        return RunningProxy(url_of(server), server.app, servers)

    return start


@pytest.fixture
async def openai_proxy(start_proxy: StartProxy) -> RunningProxy:
    """A proxy (with Postgres) whose OpenAI upstream is the mock."""
    return await start_proxy({"openai": openai_app()})


@pytest.fixture
def upstream(openai_proxy: RunningProxy) -> TestServer:
    """The mock OpenAI upstream server of :func:`openai_proxy`."""
    return openai_proxy.upstreams["openai"]


@pytest.fixture
def proxy_url(openai_proxy: RunningProxy) -> str:
    """Base URL of :func:`openai_proxy`."""
    return openai_proxy.url


@pytest.fixture
def openai_client(proxy_url: str) -> Callable[..., openai.AsyncOpenAI]:
    """An ``openai.AsyncOpenAI`` factory pointed at :func:`openai_proxy`."""

    def make(api_key: str, **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{proxy_url}/openai/v1", api_key=api_key, max_retries=0, **kwargs)

    return make


@pytest.fixture
def stripe_state() -> FakeState:
    """What the fake Stripe serves (subscriptions, previews, the objects its lists page through)."""
    return FakeState()


@pytest.fixture
async def fake_stripe(aiohttp_server: Any, stripe_state: FakeState) -> TestServer:
    """A running fake Stripe API (:mod:`tests.support.fake_stripe`); point settings at it
    with :func:`~tests.support.fake_stripe.with_fake_stripe`."""
    return await aiohttp_server(fake_stripe_app(stripe_state))


@pytest.fixture
async def listener(aiohttp_server: Any, settings: Settings) -> TestServer:
    """A running webhook listener (``costproxy webhooks``) on the test's settings."""
    return await aiohttp_server(create_webhook_app(settings, settings.redis_url, settings.database_url))


@pytest.fixture
def deliver(listener: TestServer) -> Callable[..., Awaitable[list[int]]]:
    """``await deliver(*events, secret=WEBHOOK_SECRET, timestamp=None)``: POST each event to
    :func:`listener`, signed as Stripe signs it, in order; returns the statuses."""

    async def send(*events: dict[str, Any], secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> list[int]:
        statuses = []
        async with aiohttp.ClientSession() as http:
            for evt in events:
                body, headers = signed(evt, secret, timestamp)
                async with http.post(listener.make_url("/stripe/webhook"), data=body, headers=headers) as resp:
                    statuses.append(resp.status)
        return statuses

    return send
