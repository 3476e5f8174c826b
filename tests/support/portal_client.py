"""The subscriber portal driven over plain HTTP, as a browser would: a cookie jar, the CSRF
token read from each page, the sign-in link read from the captured e-mail."""

from __future__ import annotations

import email
import email.policy
import re
from typing import Any

import aiohttp

from .mail import Inbox
from .waiting import until

_CSRF = re.compile(r'name="csrf(?:-token)?" (?:value|content)="([0-9a-f]+)"')
_LINK = re.compile(r"/portal/link\?token=([A-Za-z0-9_-]+)")
_KEY = re.compile(r'id="new-key"[^>]*value="(cpk-[A-Za-z0-9_-]+)"')


def csrf_of(html: str) -> str:
    """The CSRF token a portal page carries."""
    found = _CSRF.search(html)
    assert found, "no CSRF token on the page"
    return found.group(1)


def key_of(html: str) -> str | None:
    """The API key a welcome page shows, if it shows one."""
    found = _KEY.search(html)
    return found.group(1) if found else None


async def link_for(inbox: Inbox, address: str, already: int = 0) -> str:
    """The token of the sign-in link mailed to ``address`` (as the portal writes it: lower
    case) after its first ``already`` links."""
    address = address.strip().lower()

    def links() -> list[str]:
        bodies = [
            email.message_from_string(raw, policy=email.policy.default).get_body().get_content()  # type: ignore[union-attr]
            for rcpt, raw in inbox.messages
            if address in rcpt
        ]
        return [m.group(1) for body in bodies if (m := _LINK.search(body))]

    await until(lambda: len(links()) > already, 5, f"a sign-in link for {address}")
    return links()[already]


class PortalClient:
    """One browser: its own cookies (``unsafe``: the test server is an IP address)."""

    def __init__(self, base: str, **headers: str):
        self.base = base
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), headers=headers)
        self.csrf = ""

    async def close(self) -> None:
        await self.http.close()

    async def page(self, path: str) -> tuple[int, str]:
        """GET a page, remembering its CSRF token."""
        async with self.http.get(self.base + path) as resp:
            text = await resp.text()
        if 'name="csrf' in text:
            self.csrf = csrf_of(text)
        return resp.status, text

    async def form(self, path: str, fields: dict[str, str], csrf: str | None = None) -> tuple[int, str, aiohttp.ClientResponse]:
        """POST a form with the CSRF token (``csrf`` overrides it; ``""`` sends none); no redirects followed."""
        token = self.csrf if csrf is None else csrf
        data = {**fields, **({"csrf": token} if token else {})}
        async with self.http.post(self.base + path, data=data, allow_redirects=False) as resp:
            return resp.status, await resp.text(), resp

    async def ask_link(self, address: str) -> tuple[int, str]:
        await self.page("/portal/sign-in")
        status, text, _ = await self.form("/portal/sign-in", {"email": address})
        return status, text

    async def use_link(self, token: str) -> tuple[int, str]:
        await self.page(f"/portal/link?token={token}")
        status, text, _ = await self.form("/portal/link", {"token": token})
        return status, text

    async def sign_in(self, inbox: Inbox, address: str) -> str | None:
        """Sign in through the mailed link; the first key if this created the account."""
        already = sum(address.strip().lower() in rcpt for rcpt, _ in inbox.messages)
        status, _ = await self.ask_link(address)
        assert status == 200
        status, text = await self.use_link(await link_for(inbox, address, already))
        assert status in (200, 303), text
        await self.page("/portal/")
        return key_of(text)

    async def api(self, method: str, path: str, body: Any = None, csrf: str | None = None) -> tuple[int, Any]:
        """Call ``/portal/api/<path>`` with the page's CSRF token (``csrf`` overrides it; ``""`` sends none)."""
        token = self.csrf if csrf is None else csrf
        headers = {"X-CSRF-Token": token} if token and method != "GET" else {}
        async with self.http.request(method, f"{self.base}/portal/api/{path}", json=body, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)
