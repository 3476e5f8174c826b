"""The admin JSON API under ``/admin/api``: users, keys, credits, usage and figures.

Every handler calls the account service (:class:`proxy.accounts.Accounts`, which the CLI
uses too) or the read-only report modules; nothing here moves money by itself.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web

from ..http_json import BadRequestError, accounts, body, field, handles_errors, json_error, reply
from ..ledger import AccountStatus, EntryKind
from ..receipts import Receipts
from ..reconcile.store import latest_results
from ..reports import figures, periods, usage_query
from ..state import CONFIG, POOL

DEFAULT_OVERLAP_SECONDS = 3600
MAX_OVERLAP_SECONDS = 30 * 86_400
MAX_CREDITS = 10**9  # $10M in one entry: far beyond any real grant, far inside Redis' 64-bit integers
USER_PAGE = 50


def pool(request: web.Request) -> asyncpg.Pool:
    """The app's Postgres pool (without one the guard answered 503 before any handler)."""
    return request.config_dict[POOL]


def _page(items: list[Any], limit: int, offset: int) -> dict[str, Any]:
    return {
        "items": items[:limit],
        "limit": limit,
        "offset": offset,
        "next_offset": offset + limit if len(items) > limit else None,
    }


# users ------------------------------------------------------------------------------------
@handles_errors
async def list_users(request: web.Request) -> web.Response:
    """``GET /admin/api/users?q=&limit=&offset=``: users, newest first, searched by id or email."""
    limit, offset = usage_query.paging(request.query, USER_PAGE)
    found = await accounts(request).list_users(request.query.get("q", "").strip(), limit + 1, offset)
    return reply(_page(found, limit, offset))


@handles_errors
async def create_user(request: web.Request) -> web.Response:
    """``POST /admin/api/users {email, tier}``: the new user and its first key, shown only now."""
    data = await body(request, "email", "tier")
    user_id, key = await accounts(request).create_user(field(data, "email", str), field(data, "tier", str), source="admin")
    return reply({"user_id": user_id, "key_id": key.key_id, "api_key": key.api_key}, 201)


@handles_errors
async def show_user(request: web.Request) -> web.Response:
    """``GET /admin/api/users/{user}``: the user, the live Redis account, the latest ledger, keys."""
    service = accounts(request)
    statement = await service.show(request.match_info["user"], ledger_rows=100)
    shown = statement.as_json()
    shown["available_micro"] = statement.account.available if statement.account is not None else None
    shown["keys"] = await service.list_keys(statement.user["id"])
    return reply(shown)


@handles_errors
async def change_tier(request: web.Request) -> web.Response:
    """``POST /admin/api/users/{user}/tier {tier}``: move the user to another tier now."""
    tier = field(await body(request, "tier"), "tier", str)
    balance = await accounts(request).change_tier(request.match_info["user"], tier, source="admin")
    return reply({"user": request.match_info["user"], "tier": tier, "balance_micro": balance})


@handles_errors
async def set_status(request: web.Request) -> web.Response:
    """``POST /admin/api/users/{user}/status {status}``: suspend or reactivate."""
    status = field(await body(request, "status"), "status", str)
    if status not in (AccountStatus.ACTIVE, AccountStatus.SUSPENDED):
        raise BadRequestError("status must be active or suspended")
    await accounts(request).set_status(request.match_info["user"], AccountStatus(status))
    return reply({"user": request.match_info["user"], "status": status})


@handles_errors
async def move_credits(request: web.Request) -> web.Response:
    """``POST /admin/api/users/{user}/credits {kind, credits, reason}``: a grant or refund ledger entry."""
    data = await body(request, "kind", "credits", "reason")
    kind = field(data, "kind", str, "grant")
    credits = field(data, "credits", int)
    reason = field(data, "reason", str).strip()
    if kind not in ("grant", "refund"):
        raise BadRequestError("kind must be grant or refund")
    if not 0 < abs(credits) <= MAX_CREDITS or not reason:
        raise BadRequestError(
            f"credits must be between 1 and {MAX_CREDITS:,} (or -1 and -{MAX_CREDITS:,}) and reason must not be empty"
        )
    if kind == "refund" and credits < 0:
        raise BadRequestError("a refund gives credits back: credits must be positive")
    balance = await accounts(request).grant(request.match_info["user"], credits, reason, kind=EntryKind(kind))
    return reply({"user": request.match_info["user"], "kind": kind, "credits": credits, "balance_micro": balance}, 201)


# keys -------------------------------------------------------------------------------------
@handles_errors
async def list_keys(request: web.Request) -> web.Response:
    """``GET /admin/api/keys?user=&limit=&offset=`` and ``GET /admin/api/users/{user}/keys``."""
    service = accounts(request)
    await service.revoke_due_keys()  # rotations whose overlap ended show as revoked
    limit, offset = usage_query.paging(request.query, usage_query.DEFAULT_LIMIT)
    found = await service.list_keys(request.match_info.get("user") or request.query.get("user") or None)
    return reply(_page(found[offset:], limit, offset))


@handles_errors
async def create_key(request: web.Request) -> web.Response:
    """``POST /admin/api/users/{user}/keys {name}``: a new key, shown only now."""
    name = field(await body(request, "name"), "name", str, "")
    key = await accounts(request).create_key(request.match_info["user"], name)
    return reply({"key_id": key.key_id, "api_key": key.api_key}, 201)


@handles_errors
async def revoke_key(request: web.Request) -> web.Response:
    """``POST /admin/api/keys/{key}/revoke``: the key stops working within KEY_CACHE_SECONDS."""
    await accounts(request).revoke_key(request.match_info["key"])
    return reply({"key_id": request.match_info["key"], "revoked": True})


@handles_errors
async def rotate_key(request: web.Request) -> web.Response:
    """``POST /admin/api/keys/{key}/rotate {overlap_seconds}``: a replacement key; the old one
    keeps working for the overlap, then is revoked."""
    overlap = field(await body(request, "overlap_seconds"), "overlap_seconds", int, DEFAULT_OVERLAP_SECONDS)
    if not 0 <= overlap <= MAX_OVERLAP_SECONDS:
        raise BadRequestError(f"overlap_seconds must be between 0 and {MAX_OVERLAP_SECONDS}")
    key = await accounts(request).rotate_key(request.match_info["key"], overlap)
    return reply(
        {"key_id": key.key_id, "api_key": key.api_key, "replaces": request.match_info["key"], "overlap_seconds": overlap}, 201
    )


# reports ----------------------------------------------------------------------------------
@handles_errors
async def usage(request: web.Request) -> web.Response:
    """``GET /admin/api/usage?group=&user=&key=&provider=&model=&tier=&from=&to=&limit=&offset=``."""
    return reply(await usage_query.run(pool(request), usage_query.parse(request.query)))


@handles_errors
async def receipt(request: web.Request) -> web.Response:
    """``GET /admin/api/usage/{id}``: the receipt of any user's request, by its request id,
    once the usage log has written it to Postgres (the user page links its ledger to them)."""
    _, found = await Receipts(pool(request), request.config_dict[CONFIG]).find(request.match_info["id"], None)
    if found is None:
        return json_error(404, "no settled request has this id")
    return reply(found.as_json())


@handles_errors
async def reconciliations(request: web.Request) -> web.Response:
    """``GET /admin/api/reconcile``: the last stored reconciliation of each source."""
    return reply(await latest_results(pool(request)))


@handles_errors
async def business_figures(request: web.Request) -> web.Response:
    """``GET /admin/api/figures?period=today|month|range&from=&to=``: figures, the period before, the change."""
    period = periods.from_query(request.query)
    async with pool(request).acquire() as conn:
        return reply(await figures.report(conn, period, request.config_dict[CONFIG].current.tiers))


ROUTES = [
    ("GET", "/api/users", list_users),
    ("POST", "/api/users", create_user),
    ("GET", "/api/users/{user}", show_user),
    ("POST", "/api/users/{user}/tier", change_tier),
    ("POST", "/api/users/{user}/status", set_status),
    ("POST", "/api/users/{user}/credits", move_credits),
    ("GET", "/api/users/{user}/keys", list_keys),
    ("POST", "/api/users/{user}/keys", create_key),
    ("GET", "/api/keys", list_keys),
    ("POST", "/api/keys/{key}/revoke", revoke_key),
    ("POST", "/api/keys/{key}/rotate", rotate_key),
    ("GET", "/api/usage", usage),
    ("GET", "/api/usage/{id}", receipt),
    ("GET", "/api/reconcile", reconciliations),
    ("GET", "/api/figures", business_figures),
]


def add_routes(admin: web.Application) -> None:
    """Register the API on the admin sub-application (mounted at ``/admin``)."""
    for method, path, handler in ROUTES:
        admin.router.add_route(method, path, handler)
