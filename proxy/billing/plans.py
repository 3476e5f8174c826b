"""Routes a subscriber calls with their proxy key: checkout, customer portal, plan change.

Nothing here grants credits: a plan change takes effect when Stripe reports the invoice
paid (:mod:`proxy.billing.effects`).
"""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson
import stripe
from aiohttp import web

from ..state import CONFIG, POOL, SETTINGS, caller
from ..tiers import Tier
from .stripe_api import http_status_for, plain, stripe_client

STRIPE = web.AppKey("stripe", stripe.StripeClient)


def _refusal(status: int, code: str, message: str) -> web.HTTPException:
    """A JSON error answer ``{"error": {"code", "message"}}`` to raise."""
    exc = web.HTTPException(text=orjson.dumps({"error": {"code": code, "message": message}}).decode(), content_type="application/json")
    exc.set_status(status)
    return exc


async def _requested_tier(request: web.Request) -> tuple[str, Tier]:
    try:
        name = orjson.loads(await request.read()).get("tier")
    except (orjson.JSONDecodeError, AttributeError):
        name = None
    tiers = request.app[CONFIG].current.tiers.tiers
    if name not in tiers:
        raise _refusal(400, "unknown_tier", f"Send {{\"tier\": ...}} with one of: {', '.join(tiers)}.")
    tier = tiers[name]
    if not tier.stripe_price_id:
        raise _refusal(400, "tier_not_for_sale", f"The {name} tier is not sold through Stripe.")
    return name, tier


async def _user(request: web.Request) -> asyncpg.Record:
    identity = await caller(request)
    pool = request.app[POOL]
    if pool is None:
        raise _refusal(503, "billing_unavailable", "Billing is not configured on this server.")
    return await pool.fetchrow("SELECT * FROM users WHERE id = $1", identity.user_id)


async def _stripe_call(coro: Any) -> dict[str, Any]:
    try:
        return plain(await coro)
    except stripe.StripeError as exc:
        message = exc.user_message or str(exc)
        raise _refusal(http_status_for(exc), "stripe_error", message) from None


async def checkout_handler(request: web.Request) -> web.Response:
    """``POST /api/billing/checkout {tier}``: a Stripe Checkout URL for a subscription."""
    user = await _user(request)
    name, tier = await _requested_tier(request)
    settings = request.app[SETTINGS]
    params: dict[str, Any] = {
        "mode": "subscription",
        "line_items": [{"price": tier.stripe_price_id, "quantity": 1}],
        "client_reference_id": user["id"],
        "subscription_data": {"metadata": {"user_id": user["id"]}},
        "metadata": {"user_id": user["id"], "tier": name},
        "success_url": settings.checkout_success_url,
        "cancel_url": settings.checkout_cancel_url,
    }
    if user["stripe_customer_id"]:
        params["customer"] = user["stripe_customer_id"]
    else:
        params["customer_email"] = user["email"]
    session = await _stripe_call(request.app[STRIPE].v1.checkout.sessions.create_async(
        params, {"idempotency_key": f"checkout-{user['id']}-{name}-{request.headers.get('Idempotency-Key', '')}"}
    ))
    return web.json_response({"url": session["url"], "id": session["id"], "tier": name})


async def portal_handler(request: web.Request) -> web.Response:
    """``POST /api/billing/portal``: a link to Stripe's customer portal."""
    user = await _user(request)
    if not user["stripe_customer_id"]:
        raise _refusal(404, "no_customer", "Subscribe first (POST /api/billing/checkout).")
    session = await _stripe_call(request.app[STRIPE].v1.billing_portal.sessions.create_async(
        {"customer": user["stripe_customer_id"], "return_url": request.app[SETTINGS].checkout_success_url}
    ))
    return web.json_response({"url": session["url"]})


async def upgrade_handler(request: web.Request) -> web.Response:
    """``POST /api/credits/upgrade {tier}``: upgrade now (prorated, charged at once) or
    schedule a downgrade for the end of the period."""
    user = await _user(request)
    name, tier = await _requested_tier(request)
    tiers = request.app[CONFIG].current.tiers.tiers
    current = tiers.get(user["tier"])
    if name == user["tier"]:
        raise _refusal(400, "same_tier", f"You are on the {name} tier already.")
    if not user["stripe_subscription_id"]:
        raise _refusal(409, "no_subscription", 'Start a subscription first: POST /api/billing/checkout {"tier": ...}.')
    client = request.app[STRIPE]
    sub = await _stripe_call(client.v1.subscriptions.retrieve_async(user["stripe_subscription_id"]))
    item = sub["items"]["data"][0]
    key = f"{user['id']}-{name}-{item['current_period_end']}"
    if current is None or tier.price_usd > current.price_usd:
        change = {"items": [{"id": item["id"], "price": tier.stripe_price_id}], "proration_behavior": "always_invoice"}
        preview = await _stripe_call(client.v1.invoices.create_preview_async(
            {"subscription": sub["id"], "subscription_details": change}, {"idempotency_key": f"preview-{key}"}
        ))
        await _stripe_call(client.v1.subscriptions.update_async(
            sub["id"], {**change, "payment_behavior": "pending_if_incomplete"}, {"idempotency_key": f"upgrade-{key}"}
        ))
        return web.json_response({
            "tier": name, "change": "upgrade", "amount_charged": preview["amount_due"], "currency": preview["currency"],
            "note": "The new tier and its prorated credits apply as soon as the payment succeeds.",
        })
    schedule = await _stripe_call(client.v1.subscription_schedules.create_async(
        {"from_subscription": sub["id"]}, {"idempotency_key": f"schedule-{key}"}
    ))
    phase = schedule["phases"][0]
    await _stripe_call(client.v1.subscription_schedules.update_async(schedule["id"], {
        "end_behavior": "release",
        "phases": [
            {"items": [{"price": item["price"]["id"], "quantity": 1}], "start_date": phase["start_date"], "end_date": phase["end_date"]},
            {"items": [{"price": tier.stripe_price_id, "quantity": 1}]},
        ],
    }, {"idempotency_key": f"downgrade-{key}"}))
    return web.json_response({"tier": name, "change": "downgrade", "effective_at": phase["end_date"], "amount_charged": 0})


def setup_billing(app: web.Application) -> None:
    """Add the billing routes to the proxy application."""

    async def client(app: web.Application):  # noqa: ANN202
        async with stripe_client(app[SETTINGS]) as app[STRIPE]:
            yield

    app.cleanup_ctx.append(client)
    app.router.add_post("/api/billing/checkout", checkout_handler)
    app.router.add_post("/api/billing/portal", portal_handler)
    app.router.add_post("/api/credits/upgrade", upgrade_handler)
