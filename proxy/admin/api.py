"""The admin JSON API under ``/admin/api``: users, keys, credits, usage and figures.

Every handler calls the account service (:class:`proxy.accounts.Accounts`, which the CLI
uses too) or the read-only report modules; nothing here moves money by itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from ..accounts import AccountError, Accounts
from ..keys import KeyMirror
from ..state import CONFIG, LEDGER, POOL, REDIS, SETTINGS
from . import figures, periods, usage_query
from .guard import json_error
from .periods import QueryError

DEFAULT_OVERLAP_SECONDS = 3600
MAX_OVERLAP_SECONDS = 30 * 86_400
MAX_CREDITS = 10**9  # $10M in one entry: far beyond any real grant, far inside Redis' 64-bit integers
USER_PAGE = 50


def reply(data: Any, status: int = 200) -> web.Response:
    """A JSON response (datetimes as ISO 8601), never cached."""
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers={"Cache-Control": "no-store"}
    )


def accounts(request: web.Request) -> Accounts:
    """The account service over this app's Postgres pool, Redis ledger and live config."""
    app = request.config_dict
    return Accounts(app[POOL], app[LEDGER], KeyMirror(app[REDIS], app[SETTINGS].redis_prefix), app[CONFIG].current)


def _status_of(error: AccountError) -> int:
    message = str(error)
    if message.startswith("no "):
        return 404
    return 409 if "already" in message else 400


class BadRequest(ValueError):
    """A request body that does not say what the endpoint needs."""


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def handles_errors(handler: Handler) -> Handler:
    """Turn service and query errors into the admin API's JSON error answers."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except AccountError as exc:
            return json_error(_status_of(exc), str(exc))
        except (QueryError, BadRequest) as exc:
            return json_error(400, str(exc))

    wrapped.__doc__ = handler.__doc__
    return wrapped


async def body(request: web.Request) -> dict[str, Any]:
    """The JSON object sent, or a BadRequest."""
    raw = await request.read()
    try:
        data = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise BadRequest("the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


def field(data: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    """``data[name]`` of type ``kind`` (``bool`` is never taken for ``int``), or ``default``."""
    value = data.get(name, default)
    if value is ...:
        raise BadRequest(f"{name} is required")
    if value is not default and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise BadRequest(f"{name} must be of type {kind.__name__}")
    return value


def _page(items: list[Any], limit: int, offset: int) -> dict[str, Any]:
    return {"items": items[:limit], "limit": limit, "offset": offset, "next_offset": offset + limit if len(items) > limit else None}


def _account_numbers(account: dict[str, str] | None) -> dict[str, Any] | None:
    if account is None:
        return None
    return {k: int(v) if v.lstrip("-").isdigit() else v for k, v in account.items()}


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
    data = await body(request)
    user_id, key = await accounts(request).create_user(field(data, "email", str), field(data, "tier", str), source="admin")
    return reply({"user_id": user_id, "key_id": key.key_id, "api_key": key.api_key}, 201)


@handles_errors
async def show_user(request: web.Request) -> web.Response:
    """``GET /admin/api/users/{user}``: the user, the live Redis account, the latest ledger, keys."""
    service = accounts(request)
    shown = await service.show(request.match_info["user"], ledger_rows=100)
    account = _account_numbers(shown["account"])
    shown["account"] = account
    if account is not None:
        shown["available_micro"] = account.get("balance", 0) - account.get("held", 0)
    shown["keys"] = await service.list_keys(shown["user"]["id"])
    return reply(shown)


@handles_errors
async def change_tier(request: web.Request) -> web.Response:
    """``POST /admin/api/users/{user}/tier {tier}``: move the user to another tier now."""
    tier = field(await body(request), "tier", str)
    balance = await accounts(request).change_tier(request.match_info["user"], tier, source="admin")
    return reply({"user": request.match_info["user"], "tier": tier, "balance_micro": balance})


@handles_errors
async def set_status(request: web.Request) -> web.Response:
    """``POST /admin/api/users/{user}/status {status}``: suspend or reactivate."""
    status = field(await body(request), "status", str)
    if status not in ("active", "suspended"):
        raise BadRequest("status must be active or suspended")
    await accounts(request).set_status(request.match_info["user"], status)
    return reply({"user": request.match_info["user"], "status": status})


@handles_errors
async def move_credits(request: web.Request) -> web.Response:
    """``POST /admin/api/users/{user}/credits {kind, credits, reason}``: a grant or refund ledger entry."""
    data = await body(request)
    kind = field(data, "kind", str, "grant")
    credits = field(data, "credits", int)
    reason = field(data, "reason", str).strip()
    if kind not in ("grant", "refund"):
        raise BadRequest("kind must be grant or refund")
    if not 0 < abs(credits) <= MAX_CREDITS or not reason:
        raise BadRequest(f"credits must be between 1 and {MAX_CREDITS:,} (or -1 and -{MAX_CREDITS:,}) and reason must not be empty")
    if kind == "refund" and credits < 0:
        raise BadRequest("a refund gives credits back: credits must be positive")
    balance = await accounts(request).grant(request.match_info["user"], credits, reason, kind=kind)
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
    name = field(await body(request), "name", str, "")
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
    overlap = field(await body(request), "overlap_seconds", int, DEFAULT_OVERLAP_SECONDS)
    if not 0 <= overlap <= MAX_OVERLAP_SECONDS:
        raise BadRequest(f"overlap_seconds must be between 0 and {MAX_OVERLAP_SECONDS}")
    key = await accounts(request).rotate_key(request.match_info["key"], overlap)
    return reply({"key_id": key.key_id, "api_key": key.api_key, "replaces": request.match_info["key"], "overlap_seconds": overlap}, 201)


# reports ----------------------------------------------------------------------------------
@handles_errors
async def usage(request: web.Request) -> web.Response:
    """``GET /admin/api/usage?group=&user=&key=&provider=&model=&tier=&from=&to=&limit=&offset=``."""
    return reply(await usage_query.run(request.config_dict[POOL], usage_query.parse(request.query)))


@handles_errors
async def business_figures(request: web.Request) -> web.Response:
    """``GET /admin/api/figures?period=today|month|range&from=&to=``: figures, the period before, the change."""
    period = periods.from_query(request.query)
    async with request.config_dict[POOL].acquire() as conn:
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
    ("GET", "/api/figures", business_figures),
]


def add_routes(admin: web.Application) -> None:
    """Register the API on the admin sub-application (mounted at ``/admin``)."""
    for method, path, handler in ROUTES:
        admin.router.add_route(method, path, handler)
