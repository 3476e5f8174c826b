"""The routes a subscriber calls with their proxy key (``Authorization: Bearer`` or
``x-api-key``): credits, usage history, receipts, and their plan through Stripe.

Every error here has one shape, ``{"error": {"code": ..., "message": ...}}``
(:func:`proxy.http_json.api_error`).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import asyncpg
import orjson
from aiohttp import web
from redis.exceptions import RedisError

from .bearer import bearer_token
from .billing.plans import BillingError
from .http_json import LEDGER_UNAVAILABLE, ApiError, api_error, reply
from .keys import Identity
from .money import MICRO_PER_USD
from .receipts import Receipts
from .reports import usage_query
from .reports.periods import QueryError
from .state import CONFIG, GATE, LEDGER, PLANS, POOL

USAGE_GROUP = ("day", "provider", "model")


async def caller(request: web.Request) -> Identity:
    """The identity behind the request's proxy key, or a 401."""
    key = bearer_token(request.headers.get("Authorization")) or request.headers.get("x-api-key")
    try:
        identity = await request.app[GATE].keys.lookup(key) if key else None
    except RedisError:
        api_error(LEDGER_UNAVAILABLE)
    if identity is None:
        api_error(ApiError(401, "invalid_api_key", "Missing or unknown API key."))
    return identity


def _pool(request: web.Request, what: str) -> asyncpg.Pool:
    pool = request.app.get(POOL)
    if pool is None:
        api_error(ApiError(503, "unavailable", f"{what} needs PostgreSQL; none is configured."))
    return pool


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


async def credits_handler(request: web.Request) -> web.Response:
    """``GET /api/credits``: the caller's balance, holds, usage, limits and cycle."""
    identity = await caller(request)
    try:
        account = await request.app[LEDGER].account(identity.user_id)
    except RedisError:
        api_error(LEDGER_UNAVAILABLE)
    if account is None:
        api_error(ApiError(404, "no_account", "This key's account has no balance in the ledger; contact support."))
    tier = request.app[CONFIG].current.tiers.tiers.get(account.tier)
    return reply(
        {
            "user_id": identity.user_id,
            "tier": account.tier,
            "status": account.status.value,
            "balance_micro_usd": account.balance,
            "held_micro_usd": account.held,
            "available_micro_usd": account.available,
            "usage": {
                "tokens": account.tokens,
                "requests": account.requests,
                "cost_micro_usd": account.cost,  # exact; cost_usd is the same as a JSON number
                "cost_usd": account.cost / MICRO_PER_USD,
            },
            "limits": {
                "monthly_tokens": tier.monthly_tokens if tier else None,
                "monthly_requests": tier.monthly_requests if tier else None,
                "rpm": tier.rpm if tier else None,
                "monthly_credits_micro_usd": tier.allowance_micro if tier else None,
            },
            "cycle": {"start": _iso(account.cycle_start), "end": _iso(account.cycle_end)},
        }
    )


async def usage_handler(request: web.Request) -> web.Response:
    """``GET /api/usage``: the caller's usage from the daily rollup by day, provider and
    model, newest day first; filters ``provider``, ``model``, ``from``, ``to`` (inclusive
    dates), paginated by ``limit`` and ``offset``. The user is always the key's owner."""
    identity = await caller(request)
    pool = _pool(request, "Usage history")
    try:
        query = usage_query.parse(request.query, filters=("provider", "model"), group=USAGE_GROUP)
    except QueryError as exc:
        api_error(ApiError(400, "invalid_request", str(exc)))
    page = await usage_query.run(pool, replace(query, filters={**query.filters, "user": identity.user_id}))
    return reply({"user_id": identity.user_id, **page})


async def _user(request: web.Request) -> asyncpg.Record:
    identity = await caller(request)
    user = await _pool(request, "Billing").fetchrow("SELECT * FROM users WHERE id = $1", identity.user_id)
    if user is None:
        api_error(ApiError(404, "no_user", "This key's user no longer exists."))
    return user


async def _requested_tier(request: web.Request) -> object:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None
    return body.get("tier") if isinstance(body, dict) else None


async def checkout_handler(request: web.Request) -> web.Response:
    """``POST /api/billing/checkout {tier}``: a Stripe Checkout URL for a subscription."""
    user = await _user(request)
    try:
        return reply(
            await request.app[PLANS].checkout(user, await _requested_tier(request), request.headers.get("Idempotency-Key", ""))
        )
    except BillingError as exc:
        api_error(ApiError(exc.status, exc.code, exc.message))


async def portal_handler(request: web.Request) -> web.Response:
    """``POST /api/billing/portal``: a link to Stripe's customer portal."""
    user = await _user(request)
    try:
        return reply(await request.app[PLANS].portal(user))
    except BillingError as exc:
        api_error(ApiError(exc.status, exc.code, exc.message))


async def upgrade_handler(request: web.Request) -> web.Response:
    """``POST /api/credits/upgrade {tier}``: upgrade now (prorated, charged at once) or
    schedule a downgrade for the end of the period."""
    user = await _user(request)
    try:
        return reply(await request.app[PLANS].change(user, await _requested_tier(request)))
    except BillingError as exc:
        api_error(ApiError(exc.status, exc.code, exc.message))


async def receipt_handler(request: web.Request) -> web.Response:
    """``GET /api/usage/{id}``: the receipt of one of the caller's requests (its
    ``x-costproxy-request-id``). Any id that is not a request of the caller's account —
    malformed, unknown or another account's — is the same 404 ``not_found``; a request not
    settled yet (still running, or its charge on its way) is a 404 ``receipt_pending`` with
    ``retry-after: 1``."""
    identity = await caller(request)
    receipts = Receipts(_pool(request, "Receipts"), request.app[CONFIG], request.app[LEDGER])
    found = await receipts.lookup(request.match_info["id"], identity.user_id)
    if isinstance(found, ApiError):
        api_error(found)
    return reply(found.as_json())


def add_routes(app: web.Application) -> None:
    """Mount the subscriber routes on the proxy ``app``."""
    app.router.add_get("/api/credits", credits_handler)
    app.router.add_get("/api/usage", usage_handler)
    app.router.add_get("/api/usage/{id}", receipt_handler)
    app.router.add_post("/api/billing/checkout", checkout_handler)
    app.router.add_post("/api/billing/portal", portal_handler)
    app.router.add_post("/api/credits/upgrade", upgrade_handler)
