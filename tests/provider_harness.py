"""Shared pieces of the per-provider tests: a proxy in front of one mock upstream, raw requests, accounts."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.settings import Settings

from .mock_upstreams import RECEIVED, Received

# tier allowances in micro-dollars (1 credit = 10,000 µ$)
STARTER_MICRO = 380 * 10_000
PROFESSIONAL_MICRO = 1980 * 10_000


def micro(*priced: tuple[int, str]) -> int:
    """Exact cost in micro-dollars of (tokens, "$ per 1M tokens") pairs, rounded up once."""
    return math.ceil(sum(tokens * Decimal(price) for tokens, price in priced))


def operator_key(provider: str) -> str:
    """The operator's upstream key the test proxy holds for ``provider``."""
    return f"operator-key-{provider}"


def base_url(server: Any) -> str:
    return str(server.make_url("")).rstrip("/")


async def start_proxy(aiohttp_server: Any, settings: Settings, provider: str, upstream: Any) -> str:
    """Base URL of a running proxy whose ``provider`` upstream is the mock ``upstream``."""
    from proxy.app import create_app

    live = replace(settings, upstream_urls={provider: base_url(upstream)}, provider_keys={provider: operator_key(provider)})
    return base_url(await aiohttp_server(create_app(live, live.redis_url)))


def provider_fixtures(provider: str, mock_app: Callable[[], web.Application]) -> tuple[Any, Any]:
    """Fixtures ``mock`` (the mock upstream server) and ``proxy`` (the base URL of a proxy in front of it)."""

    @pytest.fixture
    async def mock(aiohttp_server: Any) -> Any:
        return await aiohttp_server(mock_app())

    @pytest.fixture
    async def proxy(aiohttp_server: Any, settings: Settings, mock: Any) -> str:
        return await start_proxy(aiohttp_server, settings, provider, mock)

    return mock, proxy


async def account(ledger: Any, user_id: str) -> dict[str, Any]:
    """The account hash with its integer fields as ints."""
    raw = await ledger.account(user_id)
    return {k: int(v) if v.lstrip("-").isdigit() else v for k, v in raw.items()}


async def assert_untouched(ledger: Any, user_id: str, balance: int = PROFESSIONAL_MICRO) -> None:
    """Nothing was charged, held or counted."""
    acct = await account(ledger, user_id)
    assert (acct["balance"], acct["held"], acct["open_holds"], acct["requests"]) == (balance, 0, 0, 0)


@dataclass
class Raw:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def fetch(url: str, headers: dict[str, str], body: Any = None, method: str = "POST") -> Raw:
    """One plain HTTP request, answered with the exact bytes received."""
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.request(method, url, json=body, headers=headers) as resp:
            return Raw(resp.status, resp.headers, await resp.read())


async def held_during_stream(url: str, headers: dict[str, str], body: Any, ledger: Any, user_id: str) -> int:
    """The credit held for a streamed request while it is still running (use a ``slow`` mock)."""
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=body, headers=headers) as resp:
            assert resp.status == 200
            await resp.content.readany()
            held = (await account(ledger, user_id))["held"]
            await resp.read()
    return held


def assert_credentials_swapped(sent: Received, proxy_key: str, header: str, operator: str) -> None:
    """The upstream saw the operator's key in ``header`` and the caller's key nowhere."""
    assert {k.lower(): v for k, v in sent.headers.items()}[header.lower()] == operator
    assert proxy_key not in orjson.dumps(sent.headers).decode() + sent.query + sent.body.decode()


def assert_forwarded(mock: Any, paths: list[str], proxy_key: str, header: str, provider: str) -> None:
    """The mock received exactly ``paths``, each with the operator's key in place of the caller's."""
    assert [r.path for r in mock.app[RECEIVED]] == paths
    for sent in mock.app[RECEIVED]:
        assert_credentials_swapped(sent, proxy_key, header, operator_key(provider))
