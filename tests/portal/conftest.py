"""The portal tests' fixtures: the test's settings with the portal on (mail to the local
SMTP server, billing against the local fake Stripe), a proxy serving it, and browsers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest
from aiohttp.test_utils import TestServer

from proxy.portal.guard import STORE
from proxy.portal.store import RateLimits
from proxy.settings import Settings

from ..support.fake_stripe import with_fake_stripe
from ..support.harness import RunningProxy, StartProxy
from ..support.mail import Inbox
from ..support.portal_client import PortalClient


@pytest.fixture
def settings(settings: Settings, smtp: tuple[Inbox, int], fake_stripe: TestServer) -> Settings:
    """The suite's settings with the portal enabled, its mail going to :func:`smtp` and its
    billing to :func:`fake_stripe` (webhooks signed with its secret)."""
    return replace(with_fake_stripe(settings, fake_stripe), smtp_url=f"smtp://127.0.0.1:{smtp[1]}", portal_enabled=True)


@pytest.fixture
async def proxy(start_proxy: StartProxy) -> RunningProxy:
    """A proxy with the portal. Every test's requests come from 127.0.0.1 into one database,
    so the limit per client address is lifted except where a test checks it."""
    running = await start_proxy()
    running.app[STORE].limits = replace(RateLimits(), per_client=10**6)
    return running


@pytest.fixture
async def browser(proxy: RunningProxy) -> AsyncIterator[Callable[..., Awaitable[PortalClient]]]:
    """``await browser(**headers)``: a new browser on :func:`proxy` (closed at the end of the test)."""
    opened: list[PortalClient] = []

    async def make(**headers: str) -> PortalClient:
        opened.append(PortalClient(proxy.url, **headers))
        return opened[-1]

    yield make
    for client in opened:
        await client.close()
