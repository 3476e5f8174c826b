"""The Stripe client, built from the environment, and Stripe errors as HTTP answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import stripe
from stripe._base_address import BaseAddresses

from ..settings import Settings


@asynccontextmanager
async def stripe_client(settings: Settings) -> AsyncIterator[stripe.StripeClient]:
    """An async ``StripeClient`` on aiohttp, closed on exit; ``STRIPE_API_BASE`` points it
    at another server (a local fake in tests)."""
    bases: BaseAddresses = {"api": settings.stripe_api_base} if settings.stripe_api_base else {}
    http = stripe.AIOHTTPClient()
    try:
        yield stripe.StripeClient(
            settings.stripe_api_key or "sk_unset",
            base_addresses=bases,
            http_client=http,
            max_network_retries=2,
        )
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]  # stripe leaves it unannotated


def plain(obj: Any) -> dict[str, Any]:
    """A Stripe object as plain nested dicts (Stripe objects are not dicts)."""
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def http_status_for(error: stripe.StripeError) -> int:
    """The status the proxy answers with when a Stripe call fails."""
    if isinstance(error, stripe.CardError):
        return 402
    if isinstance(error, stripe.InvalidRequestError):
        return 400
    if isinstance(error, (stripe.APIConnectionError, stripe.RateLimitError)):
        return 503
    return 502
