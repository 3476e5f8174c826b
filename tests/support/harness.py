"""The proxy under test as the ``start_proxy`` fixture returns it, the operator's upstream
keys it holds, and checks of what reached an upstream."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from .mock_upstreams import RECEIVED, Received


def operator_key(provider: str) -> str:
    """The operator's upstream key the test proxy holds for a provider that takes its key
    from the settings (``openai``, ``anthropic``, ``google``); the others read theirs from
    their ``api_key_env`` variable (``start_proxy(env=...)``)."""
    return f"operator-key-{provider}"


@dataclass(frozen=True)
class RunningProxy:
    """A proxy serving on ``url``: its aiohttp application (for its state, ``app[GATE]``
    etc.) and the mock upstream servers started for it, by provider name."""

    url: str
    app: web.Application
    upstreams: Mapping[str, TestServer]

    def received(self, provider: str) -> list[Received]:
        """Every request the mock upstream of ``provider`` received, in order."""
        received: list[Received] = self.upstreams[provider].app[RECEIVED]
        return received


class StartProxy(Protocol):
    """The ``start_proxy`` fixture: see its docstring in ``tests/conftest.py``."""

    def __call__(
        self,
        upstreams: Mapping[str, web.Application] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        base_paths: Mapping[str, str] | None = None,
        database: bool = True,
        **changes: Any,
    ) -> Awaitable[RunningProxy]: ...


def assert_credentials_swapped(sent: Received, proxy_key: str, header: str, operator: str) -> None:
    """The upstream saw the operator's key in ``header`` and the caller's key nowhere."""
    assert {k.lower(): v for k, v in sent.headers.items()}[header.lower()] == operator
    assert proxy_key not in orjson.dumps(sent.headers).decode() + sent.query + sent.body.decode()


def assert_forwarded(mock: TestServer, paths: list[str], proxy_key: str, header: str, provider: str) -> None:
    """The mock received exactly ``paths``, each with the operator's key in place of the caller's."""
    assert [r.path for r in mock.app[RECEIVED]] == paths
    for sent in mock.app[RECEIVED]:
        assert_credentials_swapped(sent, proxy_key, header, operator_key(provider))
