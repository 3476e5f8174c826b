"""Portal test states: a signed-in subscriber with a subscription in the fake Stripe, and
the portal's clock moved ahead."""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from proxy.portal.guard import STORE
from proxy.portal.store import utc_now

from .fake_stripe import FakeState, subscription_obj
from .harness import RunningProxy
from .mail import Inbox
from .portal_client import PortalClient

STARTER = "price_starter_monthly"


async def subscribed(client: PortalClient, inbox: Inbox, pool: asyncpg.Pool, stripe_state: FakeState, address: str) -> str:
    """``client`` signed in as ``address`` (unless it is already), made a starter subscriber
    with a subscription in the fake Stripe; the user's id."""
    if (await client.api("GET", "overview"))[0] != 200:
        await client.sign_in(inbox, address)
    user_id = await pool.fetchval("SELECT id FROM users WHERE email = $1", address)
    sub = f"sub_{user_id}"
    stripe_state.subscriptions[sub] = subscription_obj(STARTER, 1_000, 2_000, user_id=user_id, sub=sub)
    await pool.execute(
        "UPDATE users SET tier = 'starter', stripe_subscription_id = $2, stripe_customer_id = $3 WHERE id = $1",
        user_id,
        sub,
        f"cus_{user_id}",
    )
    return user_id


def shift_clock(proxy: RunningProxy, by: timedelta) -> None:
    """Move the portal's clock (links and sessions) ``by`` ahead of the wall clock."""
    proxy.app[STORE].clock = lambda: utc_now() + by
