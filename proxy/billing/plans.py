"""Plans a subscriber buys through Stripe: checkout, the customer portal, plan changes.

Nothing here grants credits: a plan change takes effect when Stripe reports the invoice
paid (:mod:`proxy.billing.effects`). The HTTP routes are in :mod:`proxy.subscriber` and
:mod:`proxy.portal.api`; the refusals here hold for both: a second subscription
(``already_subscribed``), and a plan change while an invoice is unpaid (``past_due``: a
lapsed account's tier is the free one, from which every paid tier would look like an upgrade).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import stripe
from stripe.params import InvoiceCreatePreviewParams, SubscriptionScheduleUpdateParams, SubscriptionUpdateParams
from stripe.params.checkout import SessionCreateParams

from ..ledger import AccountStatus
from ..settings import Settings
from ..tiers import TierChange, TiersFile
from .stripe_api import http_status_for, plain


class BillingError(Exception):
    """A plan request that cannot be honoured: ``status`` and ``code`` for the answer."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


async def _stripe(call: Awaitable[Any]) -> dict[str, Any]:
    try:
        return plain(await call)
    except stripe.StripeError as exc:
        raise BillingError(http_status_for(exc), "stripe_error", exc.user_message or str(exc)) from None


def _proration_date() -> int:
    """Now, to the minute: an upgrade repeated within it is one Stripe call (its idempotency
    key names it), and its preview and update prorate at the same instant."""
    return int(time.time()) // 60 * 60


class Plans:
    """Subscription changes of one user (a ``users`` row), through Stripe."""

    def __init__(self, client: stripe.StripeClient, tiers: Callable[[], TiersFile], settings: Settings):
        self.client = client
        self.tiers = tiers
        self.settings = settings

    def for_sale(self, name: object) -> tuple[str, str]:
        """The tier called ``name`` and its Stripe price id, if it is sold through Stripe."""
        tiers = self.tiers().tiers
        if not isinstance(name, str) or name not in tiers:
            raise BillingError(400, "unknown_tier", f'Send {{"tier": ...}} with one of: {", ".join(tiers)}.')
        price = tiers[name].stripe_price_id
        if not price:
            raise BillingError(400, "tier_not_for_sale", f"The {name} tier is not sold through Stripe.")
        return name, price

    def offer(self, user: asyncpg.Record, name: str) -> str:
        """What choosing the tier ``name`` would do for ``user``, by the refusals below:
        ``current``; ``billing_portal`` for a tier not sold through Stripe while subscribed
        (cancelling is done in Stripe's portal), else ``none``; ``none`` while a payment is
        past due (:meth:`_subscription` refuses it); ``subscribe`` without a subscription
        (:meth:`checkout` refuses a second); else ``upgrade`` or ``downgrade``."""
        tiers = self.tiers()
        subscribed = bool(user["stripe_subscription_id"])
        if name == user["tier"]:
            return "current"
        if not tiers.tiers[name].stripe_price_id:
            return "billing_portal" if subscribed else "none"
        if user["status"] == AccountStatus.PAST_DUE:
            return "none"
        if not subscribed:
            return "subscribe"
        return "upgrade" if tiers.change(user["tier"], name) is TierChange.UPGRADE else "downgrade"

    async def checkout(
        self, user: asyncpg.Record, tier_name: object, idempotency_key: str, return_url: str | None = None
    ) -> dict[str, Any]:
        """A Stripe Checkout session for a subscription to ``tier_name``; Stripe sends the
        browser back to ``return_url`` (default ``CHECKOUT_SUCCESS_URL`` / ``CHECKOUT_CANCEL_URL``)."""
        name, price = self.for_sale(tier_name)
        if user["stripe_subscription_id"]:
            raise BillingError(
                409,
                "already_subscribed",
                'You have a subscription already: change its tier with POST /api/credits/upgrade {"tier": ...}'
                " or in the portal's plan page.",
            )
        params: SessionCreateParams = {
            "mode": "subscription",
            "line_items": [{"price": price, "quantity": 1}],
            "client_reference_id": user["id"],
            "subscription_data": {"metadata": {"user_id": user["id"]}},
            "metadata": {"user_id": user["id"], "tier": name},
            "success_url": return_url or self.settings.checkout_success_url,
            "cancel_url": return_url or self.settings.checkout_cancel_url,
        }
        if user["stripe_customer_id"]:
            params["customer"] = user["stripe_customer_id"]
        else:
            params["customer_email"] = user["email"]
        session = await _stripe(
            self.client.v1.checkout.sessions.create_async(
                params, {"idempotency_key": f"checkout-{user['id']}-{name}-{idempotency_key}"}
            )
        )
        return {"url": session["url"], "id": session["id"], "tier": name}

    async def portal(self, user: asyncpg.Record, return_url: str | None = None) -> dict[str, Any]:
        """A link to Stripe's customer portal, which returns to ``return_url`` (default
        ``CHECKOUT_SUCCESS_URL``)."""
        if not user["stripe_customer_id"]:
            raise BillingError(404, "no_customer", "Subscribe first (POST /api/billing/checkout).")
        session = await _stripe(
            self.client.v1.billing_portal.sessions.create_async(
                {"customer": user["stripe_customer_id"], "return_url": return_url or self.settings.checkout_success_url}
            )
        )
        return {"url": session["url"]}

    async def _subscription(self, user: asyncpg.Record, tier_name: object) -> tuple[str, str, dict[str, Any], str]:
        """The tier asked for, its price, the user's Stripe subscription and the idempotency
        key of moving it to that tier in this period."""
        name, price = self.for_sale(tier_name)
        if user["status"] == AccountStatus.PAST_DUE:
            raise BillingError(
                409, "past_due", "A payment failed: pay the open invoice first (its link is on the portal's overview)."
            )
        if name == user["tier"]:
            raise BillingError(400, "same_tier", f"You are on the {name} tier already.")
        if not user["stripe_subscription_id"]:
            raise BillingError(409, "no_subscription", 'Start a subscription first: POST /api/billing/checkout {"tier": ...}.')
        sub = await _stripe(self.client.v1.subscriptions.retrieve_async(user["stripe_subscription_id"]))
        return name, price, sub, f"{user['id']}-{name}-{sub['items']['data'][0]['current_period_end']}"

    async def preview(self, user: asyncpg.Record, tier_name: object) -> dict[str, Any]:
        """What :meth:`change` to ``tier_name`` would do, changing nothing: an upgrade's
        prorated amount charged now, or a downgrade's date."""
        name, price, sub, _ = await self._subscription(user, tier_name)
        item = sub["items"]["data"][0]
        if self.tiers().change(user["tier"], name) is TierChange.UPGRADE:
            invoice = await self._preview_invoice(sub, item, price, _proration_date())
            return {"tier": name, "change": "upgrade", "amount_due": invoice["amount_due"], "currency": invoice["currency"]}
        return {"tier": name, "change": "downgrade", "effective_at": item["current_period_end"], "amount_due": 0}

    async def change(self, user: asyncpg.Record, tier_name: object) -> dict[str, Any]:
        """Upgrade now (prorated, charged at once) or schedule a downgrade for the period's end."""
        name, price, sub, key = await self._subscription(user, tier_name)
        item = sub["items"]["data"][0]
        if self.tiers().change(user["tier"], name) is TierChange.UPGRADE:
            return await self._upgrade(sub, item, name, price, key)
        return await self._schedule_downgrade(sub, item, name, price, key)

    async def _preview_invoice(self, sub: dict[str, Any], item: dict[str, Any], price: str, at: int) -> dict[str, Any]:
        """The invoice moving ``item`` to ``price`` with prorations as of ``at`` would make.
        No idempotency key: it creates nothing, and a replayed answer would show an amount
        prorated at an earlier time."""
        params: InvoiceCreatePreviewParams = {
            "subscription": sub["id"],
            "subscription_details": {
                "items": [{"id": item["id"], "price": price}],
                "proration_behavior": "always_invoice",
                "proration_date": at,
            },
        }
        return await _stripe(self.client.v1.invoices.create_preview_async(params))

    async def _upgrade(self, sub: dict[str, Any], item: dict[str, Any], name: str, price: str, key: str) -> dict[str, Any]:
        at = _proration_date()  # the same for the amount shown and the one charged
        preview = await self._preview_invoice(sub, item, price, at)
        update: SubscriptionUpdateParams = {
            "items": [{"id": item["id"], "price": price}],
            "proration_behavior": "always_invoice",
            "proration_date": at,
            "payment_behavior": "pending_if_incomplete",
        }
        await _stripe(self.client.v1.subscriptions.update_async(sub["id"], update, {"idempotency_key": f"upgrade-{key}-{at}"}))
        return {
            "tier": name,
            "change": "upgrade",
            "amount_charged": preview["amount_due"],
            "currency": preview["currency"],
            "note": "The new tier and its prorated credits apply as soon as the payment succeeds.",
        }

    async def _schedule_downgrade(
        self, sub: dict[str, Any], item: dict[str, Any], name: str, price: str, key: str
    ) -> dict[str, Any]:
        schedule = await _stripe(
            self.client.v1.subscription_schedules.create_async(
                {"from_subscription": sub["id"]}, {"idempotency_key": f"schedule-{key}"}
            )
        )
        phase = schedule["phases"][0]
        phases: SubscriptionScheduleUpdateParams = {
            "end_behavior": "release",
            "phases": [
                {
                    "items": [{"price": item["price"]["id"], "quantity": 1}],
                    "start_date": phase["start_date"],
                    "end_date": phase["end_date"],
                },
                {"items": [{"price": price, "quantity": 1}]},
            ],
        }
        await _stripe(
            self.client.v1.subscription_schedules.update_async(schedule["id"], phases, {"idempotency_key": f"downgrade-{key}"})
        )
        return {"tier": name, "change": "downgrade", "effective_at": phase["end_date"], "amount_charged": 0}
