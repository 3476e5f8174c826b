"""The portal's JSON API under ``/portal/api``: what the signed-in subscriber sees and
changes. Every handler works on the session's own user only: ids in a path are looked up
together with that user, so another user's keys or sessions answer 404.

Accounts and keys go through :class:`proxy.accounts.Accounts`, plans through
:class:`proxy.billing.plans.Plans` (as the CLI, admin API and subscriber API do).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp import web
from redis.exceptions import RedisError

from ..billing.plans import BillingError, Plans
from ..http_json import (
    LEDGER_UNAVAILABLE,
    ApiError,
    BadRequestError,
    accounts,
    body,
    field,
    handles_errors,
    json_error,
    reply,
    shaped_error,
)
from ..ledger import AccountStatus, EntryKind
from ..receipts import Receipts, request_id_of
from ..reports import usage_query
from ..state import CONFIG, LEDGER, PLANS, POOL, SETTINGS
from ..tiers import Tier
from .guard import require_session, store

CHART_DAYS = 30
RECENT_REQUESTS = 20
RECENT_CREDITS = 10
#: ledger entries that add credits (allowances, upgrades, grants, refunds)
CREDITED = [EntryKind.GRANT.value, EntryKind.RESET.value, EntryKind.REFUND.value]
MAX_KEY_NAME = 100
#: asking for Checkout to the same tier again within this window gets the same session
CHECKOUT_WINDOW_SECONDS = 600
TOO_MANY_STRIPE_CALLS = "Too many billing requests; wait a minute and try again."


def _pool(request: web.Request) -> asyncpg.Pool:
    return request.config_dict[POOL]


async def _user(request: web.Request) -> asyncpg.Record:
    user = await _pool(request).fetchrow("SELECT * FROM users WHERE id = $1", require_session(request).user_id)
    if user is None:
        raise web.HTTPNotFound()
    return user


def _tier_json(name: str, tier: Tier) -> dict[str, Any]:
    return {
        "name": name,
        "price_usd": str(tier.price_usd),
        "allowance_micro": tier.allowance_micro,
        "monthly_tokens": tier.monthly_tokens,
        "monthly_requests": tier.monthly_requests,
        "rpm": tier.rpm,
        "providers": tier.providers,
        "for_sale": bool(tier.stripe_price_id),
    }


@handles_errors
async def overview(request: web.Request) -> web.Response:
    """``GET /portal/api/overview``: tier, status, credits, usage against limits, cycle end,
    the latest credits added, and the failed payment's invoice link when there is one."""
    user = await _user(request)
    try:
        account = await request.config_dict[LEDGER].account(user["id"])
    except RedisError:
        return shaped_error(LEDGER_UNAVAILABLE)
    if account is None:
        return json_error(409, "Your account has no balance in the ledger; contact support.")
    tiers = request.config_dict[CONFIG].current.tiers.tiers
    tier = tiers.get(account.tier)
    credited = await _pool(request).fetch(
        "SELECT kind, amount_micro, balance_micro, reason, created_at FROM ledger WHERE user_id = $1 AND kind = ANY($2::text[])"
        " ORDER BY created_at DESC LIMIT $3",
        user["id"],
        CREDITED,
        RECENT_CREDITS,
    )
    past_due = account.status is AccountStatus.PAST_DUE
    return reply(
        {
            "email": user["email"],
            "tier": _tier_json(account.tier, tier) if tier else {"name": account.tier},
            "status": account.status.value,
            "balance_micro": account.balance,
            "held_micro": account.held,
            "available_micro": account.available,
            "cost_micro": account.cost,
            "tokens": account.tokens,
            "requests": account.requests,
            "cycle": {"start_ms": account.cycle_start, "end_ms": account.cycle_end},
            "subscribed": bool(user["stripe_subscription_id"]),
            "payment_failed": {"invoice_url": user["failed_invoice_url"]} if past_due else None,
            "credited": [dict(row) for row in credited],
        }
    )


def _recent(row: asyncpg.Record) -> dict[str, Any]:
    """A usage row as the portal lists it: by its request id (its receipt's), not its charge's id."""
    fields = dict(row)
    return {"request_id": request_id_of(fields.pop("id")), **fields}


@handles_errors
async def usage(request: web.Request) -> web.Response:
    """``GET /portal/api/usage``: the last 30 days by day and model, and the latest requests
    (each with its request id, for its receipt)."""
    user_id = require_session(request).user_id
    first = datetime.now(UTC).date() - timedelta(days=CHART_DAYS - 1)
    query = usage_query.UsageQuery(group=("day", "model"), filters={"user": user_id}, first=first, limit=usage_query.MAX_LIMIT)
    daily = await usage_query.run(_pool(request), query)
    rows = await _pool(request).fetch(
        "SELECT id, provider, model, input_tokens + cached_input_tokens + cache_write_tokens AS input_tokens,"
        " output_tokens, cost_micro, estimated, created_at FROM usage_events WHERE user_id = $1"
        " ORDER BY created_at DESC LIMIT $2",
        user_id,
        RECENT_REQUESTS,
    )
    return reply({"daily": daily["rows"], "recent": [_recent(row) for row in rows]})


@handles_errors
async def receipt(request: web.Request) -> web.Response:
    """``GET /portal/api/usage/{id}``: the receipt of one of the user's requests, as
    ``GET /api/usage/{id}`` answers it to their key, refusals too (the same status, code,
    message and headers, in the portal's error shape): anyone else's id is not found."""
    receipts = Receipts(_pool(request), request.config_dict[CONFIG], request.config_dict[LEDGER])
    found = await receipts.lookup(request.match_info["id"], require_session(request).user_id)
    if isinstance(found, ApiError):
        return shaped_error(found)
    return reply(found.as_json())


@handles_errors
async def list_keys(request: web.Request) -> web.Response:
    """``GET /portal/api/keys``: the user's keys (never their secrets), with the last day used."""
    user_id = require_session(request).user_id
    keys = await accounts(request).list_keys(user_id)
    rows = await _pool(request).fetch(
        "SELECT key_id, max(day) AS day FROM usage_daily WHERE user_id = $1 GROUP BY key_id", user_id
    )
    used = {row["key_id"]: row["day"] for row in rows}
    return reply([{**key, "last_used_day": used.get(key["id"])} for key in keys])


@handles_errors
async def create_key(request: web.Request) -> web.Response:
    """``POST /portal/api/keys {name}``: a new key, shown in this answer only."""
    name = field(await body(request, "name"), "name", str, "").strip()
    if len(name) > MAX_KEY_NAME:
        raise BadRequestError(f"name must be at most {MAX_KEY_NAME} characters")
    key = await accounts(request).create_key(require_session(request).user_id, name)
    return reply({"key_id": key.key_id, "api_key": key.api_key, "name": name}, 201)


@handles_errors
async def revoke_key(request: web.Request) -> web.Response:
    """``POST /portal/api/keys/{key}/revoke``: one of the user's keys stops working."""
    await accounts(request).revoke_key(request.match_info["key"], owner=require_session(request).user_id)
    return reply({"key_id": request.match_info["key"], "revoked": True})


@handles_errors
async def list_sessions(request: web.Request) -> web.Response:
    """``GET /portal/api/sessions``: the user's signed-in browsers, this one marked."""
    session = require_session(request)
    found = await store(request).sessions(session.user_id)
    return reply([{**row, "current": row["id"] == session.id} for row in found])


@handles_errors
async def revoke_session(request: web.Request) -> web.Response:
    """``POST /portal/api/sessions/{session}/revoke``: sign one of the user's browsers out."""
    session = require_session(request)
    if not await store(request).revoke(session.user_id, request.match_info["session"]):
        return json_error(404, "No such session.")
    return reply({"session_id": request.match_info["session"], "revoked": True})


@handles_errors
async def plans(request: web.Request) -> web.Response:
    """``GET /portal/api/plans``: every tier, and what choosing it would do for this user
    (:meth:`proxy.billing.plans.Plans.offer`, by the rules the plan calls enforce)."""
    user = await _user(request)
    plans: Plans = request.config_dict[PLANS]
    tiers = plans.tiers().tiers
    return reply(
        {
            "current": user["tier"],
            "subscribed": bool(user["stripe_subscription_id"]),
            "has_customer": bool(user["stripe_customer_id"]),
            "tiers": [{**_tier_json(name, tier), "action": plans.offer(user, name)} for name, tier in tiers.items()],
        }
    )


def _return_url(request: web.Request) -> str:
    return request.config_dict[SETTINGS].portal_base_url + "/portal/return"


async def _billing(
    request: web.Request, call: Callable[[Plans, asyncpg.Record, str], Awaitable[dict[str, Any]]], *, tier: bool = True
) -> web.Response:
    """``call`` (the plans, the user and, with ``tier``, the tier the body asks for, which
    must be for sale) for the session's user, within the per-user limit on Stripe-backed
    calls (429 past it; a request refused for its tier is not counted)."""
    user = await _user(request)
    plans: Plans = request.config_dict[PLANS]
    try:
        name = plans.for_sale((await body(request, "tier")).get("tier"))[0] if tier else ""
        if not await store(request).stripe_call_allowed(user["id"]):
            return json_error(429, TOO_MANY_STRIPE_CALLS)
        return reply(await call(plans, user, name))
    except BillingError as exc:
        return json_error(exc.status, exc.message, exc.code)


@handles_errors
async def checkout(request: web.Request) -> web.Response:
    """``POST /portal/api/plan/checkout {tier}``: a Stripe Checkout URL to subscribe (the
    same session when asked again for that tier within :data:`CHECKOUT_WINDOW_SECONDS`)."""
    back, window = _return_url(request), int(store(request).clock().timestamp()) // CHECKOUT_WINDOW_SECONDS
    return await _billing(request, lambda plans, user, tier: plans.checkout(user, tier, f"w{window}", back))


@handles_errors
async def preview(request: web.Request) -> web.Response:
    """``POST /portal/api/plan/preview {tier}``: what a change would cost (an upgrade's
    prorated amount) or when it would apply (a downgrade), changing nothing."""
    return await _billing(request, lambda plans, user, tier: plans.preview(user, tier))


@handles_errors
async def change(request: web.Request) -> web.Response:
    """``POST /portal/api/plan/change {tier}``: upgrade now or schedule a downgrade."""
    return await _billing(request, lambda plans, user, tier: plans.change(user, tier))


@handles_errors
async def billing_portal(request: web.Request) -> web.Response:
    """``POST /portal/api/plan/billing-portal``: a link to Stripe's customer portal."""
    back = _return_url(request)
    return await _billing(request, lambda plans, user, _: plans.portal(user, back), tier=False)


ROUTES = [
    ("GET", "/api/overview", overview),
    ("GET", "/api/usage", usage),
    ("GET", "/api/usage/{id}", receipt),
    ("GET", "/api/keys", list_keys),
    ("POST", "/api/keys", create_key),
    ("POST", "/api/keys/{key}/revoke", revoke_key),
    ("GET", "/api/sessions", list_sessions),
    ("POST", "/api/sessions/{session}/revoke", revoke_session),
    ("GET", "/api/plans", plans),
    ("POST", "/api/plan/checkout", checkout),
    ("POST", "/api/plan/preview", preview),
    ("POST", "/api/plan/change", change),
    ("POST", "/api/plan/billing-portal", billing_portal),
]
