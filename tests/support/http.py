"""Plain HTTP from the tests: one request answered with the exact bytes received, and the
base URL of a test server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp.test_utils import BaseTestServer
from multidict import CIMultiDictProxy


@dataclass(frozen=True)
class Raw:
    """A response as received: status, headers and the undecoded body."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def fetch(url: str, headers: dict[str, str], body: Any = None, method: str = "POST") -> Raw:
    """One plain HTTP request (``body`` sent as JSON), answered with the exact bytes received."""
    async with (
        aiohttp.ClientSession(auto_decompress=False) as http,
        http.request(method, url, json=body, headers=headers) as resp,
    ):
        return Raw(resp.status, resp.headers, await resp.read())


def url_of(server: BaseTestServer) -> str:
    """Base URL of a test server, without the trailing slash."""
    return str(server.make_url("")).rstrip("/")
