"""A fixture that runs the proxy in front of several mock upstreams at once.

Import ``start_proxy`` into a test module to use it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web

from proxy.settings import Settings


def url_of(server: Any) -> str:
    """Base URL of a test server, without the trailing slash."""
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
def start_proxy(aiohttp_server: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch):
    """``await start_proxy({"groq": app, ...}, env={...}, base_paths={"groq": "/openai"})``:
    start each mock upstream and a proxy routing those providers to it (as
    ``<NAME>_UPSTREAM_URL`` would, plus the base path), with ``env`` set for the providers'
    ``api_key_env`` variables. Returns (proxy URL, {name: upstream server})."""

    async def start(
        upstreams: dict[str, web.Application], env: dict[str, str] | None = None, base_paths: dict[str, str] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        from proxy.app import create_app

        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        servers = {name: await aiohttp_server(app) for name, app in upstreams.items()}
        urls = {name: url_of(s) + (base_paths or {}).get(name, "") for name, s in servers.items()}
        live = replace(settings, upstream_urls=urls)
        return url_of(await aiohttp_server(create_app(live, live.redis_url))), servers

    return start
