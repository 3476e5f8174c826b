"""The OpenAPI 3.1 document of the admin API, served at ``/admin/openapi.json``.

Hand-written so that it says what each figure means; a test checks that it lists exactly
the routes registered and that real answers validate against its schemas.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

INT: Schema = {"type": "integer"}
STR: Schema = {"type": "string"}
BOOL: Schema = {"type": "boolean"}
CENTS_USD: Schema = {"type": "string", "pattern": r"^-?\d+\.\d{2}$", "description": "US dollars, 2 decimals"}
MICRO_USD: Schema = {"type": "string", "pattern": r"^-?\d+\.\d{6}$", "description": "US dollars, 6 decimals"}
PCT: Schema = {"type": ["string", "null"], "pattern": r"^-?\d+\.\d{2}$", "description": "percent, 2 decimals; null when undefined"}
TIME: Schema = {"type": "string", "format": "date-time"}


def ref(name: str) -> Schema:
    """A reference to a component schema."""
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    """``schema`` or null."""
    return {"oneOf": [schema, {"type": "null"}]}


def obj(properties: dict[str, Schema], description: str = "", closed: bool = True) -> Schema:
    """An object schema whose listed properties are all required."""
    schema: Schema = {"type": "object", "properties": properties, "required": list(properties)}
    if closed:
        schema["additionalProperties"] = False
    if description:
        schema["description"] = description
    return schema


def page_of(item: Schema) -> Schema:
    """A page of ``item``s with limit/offset paging."""
    return obj({"items": {"type": "array", "items": item}, "limit": INT, "offset": INT, "next_offset": nullable(INT)})


SCHEMAS: dict[str, Schema] = {
    "Error": obj({"error": obj({"status": INT, "message": STR})}),
    "User": obj({"id": STR, "email": STR, "tier": STR, "status": STR, "created_at": TIME}),
    "UserPage": page_of(ref("User")),
    "Key": obj({"id": STR, "user_id": STR, "name": STR, "key_prefix": STR, "created_at": TIME, "revoked_at": nullable(TIME)}, closed=False),
    "KeyPage": page_of(ref("Key")),
    "NewKey": obj({"key_id": STR, "api_key": {"type": "string", "description": "shown once, never stored"}}),
    "NewUser": obj({"user_id": STR, "key_id": STR, "api_key": STR}),
    "RotatedKey": obj({"key_id": STR, "api_key": STR, "replaces": STR, "overlap_seconds": INT}),
    "LedgerEntry": obj({"id": STR, "kind": STR, "amount_micro": INT, "balance_micro": INT, "reason": {"type": ["string", "null"]}, "created_at": TIME}),
    "UserDetail": obj(
        {
            "user": {"type": "object", "description": "the users row"},
            "account": nullable({"type": "object", "description": "live Redis account: balance, held, open_holds, tokens, requests, cost (µ$), cycle_start, cycle_end (ms), tier, status"}),
            "available_micro": INT,
            "ledger_sum_micro": INT,
            "ledger": {"type": "array", "items": ref("LedgerEntry")},
            "keys": {"type": "array", "items": ref("Key")},
        },
        closed=False,
    ),
    "UsageRow": {
        "type": "object",
        "description": "one group; only the grouped dimensions appear",
        "properties": {
            "day": {"type": "string", "format": "date"}, "user": STR, "key": STR, "provider": STR, "model": STR, "tier": STR,
            "requests": INT, "input_tokens": INT, "cached_input_tokens": INT, "output_tokens": INT, "tokens": INT,
            "cost_micro": INT, "cost_usd": MICRO_USD,
        },
        "required": ["requests", "input_tokens", "cached_input_tokens", "output_tokens", "tokens", "cost_micro", "cost_usd"],
        "additionalProperties": False,
    },
    "UsagePage": obj({"group": {"type": "array", "items": STR}, "rows": {"type": "array", "items": ref("UsageRow")}, "limit": INT, "offset": INT, "next_offset": nullable(INT)}),
    "Period": obj({"name": STR, "from": {"type": "string", "format": "date"}, "to": {"type": "string", "format": "date"}, "start": TIME, "end": TIME}),
    "Figures": obj(
        {
            "period": ref("Period"),
            "accounts": obj({
                "signups": INT, "upgrades": INT, "downgrades": INT,
                "cancellations": {"type": "integer", "description": "users with a cancel or lapse tier change in the period"},
                "paying_users_start": INT, "paying_users_end": INT,
            }),
            "usage": obj({"requests": INT, "input_tokens": INT, "output_tokens": INT, "tokens": INT}),
            "revenue": obj({
                "invoices": INT, "gross_cents": INT, "stripe_fee_cents": INT, "refunded_cents": INT, "disputed_cents": INT,
                "net_cents": {"type": "integer", "description": "gross − Stripe fees − refunded − disputed"},
                "gross_usd": CENTS_USD, "net_usd": CENTS_USD,
            }),
            "api_cost": obj({"micro": INT, "usd": MICRO_USD, "paid_tiers_micro": INT, "free_tiers_micro": INT}),
            "profit": obj({"micro": {"type": "integer", "description": "net revenue − API cost, µ$"}, "usd": MICRO_USD}),
            "margin": obj({"pct": PCT, "target_pct": PCT, "vs_target_pct": PCT}),
            "arpu": obj({"usd": {"type": ["string", "null"]}, "paying_users": INT}),
            "churn": obj({"cancellations": INT, "paying_users_start": INT, "rate_pct": PCT}),
            "budget": obj({
                "allocated_micro": INT, "allocated_usd": MICRO_USD, "used_micro": INT, "used_usd": MICRO_USD,
                "unused_micro": INT, "unused_usd": MICRO_USD, "used_pct": PCT,
            }),
            "margin_model": obj({
                "net_revenue_micro": INT, "api_budget_micro": INT, "planned_profit_micro": INT, "unused_allowance_micro": INT,
                "free_tier_cost_micro": INT, "profit_micro": INT, "net_revenue_usd": MICRO_USD, "planned_profit_usd": MICRO_USD,
                "unused_allowance_usd": MICRO_USD, "free_tier_cost_usd": MICRO_USD, "planned_margin_pct": PCT,
                "actual_margin_pct": PCT, "target_margin_pct": PCT,
            }, "profit = planned profit + unused allowance − free-tier cost"),
            "tiers": {"type": "array", "items": obj({"tier": STR, "price_usd": {"type": ["string", "null"]}, "paid": {"type": ["boolean", "null"]}, "users": INT})},
            "providers": {"type": "array", "items": obj({
                "provider": STR, "requests": INT, "tokens": INT, "cost_micro": INT, "cost_usd": MICRO_USD,
                "request_share_pct": PCT, "cost_share_pct": PCT,
            })},
        },
        "Business figures for one period; definitions in the README's \"Business figures\"",
    ),
    "Change": obj({
        "signups": INT, "upgrades": INT, "downgrades": INT, "requests": INT, "tokens": INT,
        "net_revenue_cents": INT, "net_revenue_usd": CENTS_USD, "api_cost_micro": INT, "api_cost_usd": MICRO_USD,
        "profit_micro": INT, "profit_usd": MICRO_USD, "margin_pct_points": PCT,
    }),
    "FiguresReport": obj({"current": ref("Figures"), "previous": ref("Figures"), "change": ref("Change")}),
}


def _param(name: str, where: str, description: str, schema: Schema = STR, required: bool = False) -> Schema:
    return {"name": name, "in": where, "description": description, "required": required or where == "path", "schema": schema}


USER = _param("user", "path", "user id or email")
KEY = _param("key", "path", "key id")
PAGING = [_param("limit", "query", "page size (1-1000)", INT), _param("offset", "query", "rows to skip", INT)]
DATES = [_param("from", "query", "first UTC day, YYYY-MM-DD", {"type": "string", "format": "date"}),
         _param("to", "query", "last UTC day (inclusive)", {"type": "string", "format": "date"})]


def _op(summary: str, response: str | None, params: list[Schema] = (), body: Schema | None = None, status: str = "200") -> Schema:  # type: ignore[assignment]
    """An operation answering ``response`` (a schema name; None: a plain object)."""
    answer = ref(response) if response else {"type": "object"}
    operation: Schema = {
        "summary": summary,
        "parameters": list(params),
        "responses": {
            status: {"description": "OK", "content": {"application/json": {"schema": answer}}},
            "400": {"description": "bad request", "content": {"application/json": {"schema": ref("Error")}}},
            "401": {"description": "missing or wrong admin token", "content": {"application/json": {"schema": ref("Error")}}},
        },
    }
    if any(p["in"] == "path" for p in params):
        operation["responses"]["404"] = {"description": "no such user or key", "content": {"application/json": {"schema": ref("Error")}}}
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return operation


def _body(properties: dict[str, Schema], required: list[str]) -> Schema:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


PATHS: dict[str, Schema] = {
    "/admin/api/users": {
        "get": _op("Users, newest first; q searches id and email", "UserPage", [_param("q", "query", "id or part of an email"), *PAGING]),
        "post": _op("Create a user with a first key (the key is shown only here)", "NewUser",
                    body=_body({"email": STR, "tier": STR}, ["email", "tier"]), status="201"),
    },
    "/admin/api/users/{user}": {"get": _op("The user, live balance and holds from Redis, latest ledger, keys", "UserDetail", [USER])},
    "/admin/api/users/{user}/tier": {"post": _op("Move the user to another tier now", None, [USER], _body({"tier": STR}, ["tier"]))},
    "/admin/api/users/{user}/status": {
        "post": _op("Suspend or reactivate", None, [USER], _body({"status": {"enum": ["active", "suspended"]}}, ["status"]))
    },
    "/admin/api/users/{user}/credits": {
        "post": _op("Grant or refund credits (1 credit = $0.01), as a ledger entry with a reason", None, [USER],
                    _body({"kind": {"enum": ["grant", "refund"]}, "credits": INT, "reason": STR}, ["credits", "reason"]), "201")
    },
    "/admin/api/users/{user}/keys": {
        "get": _op("The user's keys", "KeyPage", [USER, *PAGING]),
        "post": _op("Issue a key (shown only here)", "NewKey", [USER], _body({"name": STR}, []), "201"),
    },
    "/admin/api/keys": {"get": _op("Every key, newest first", "KeyPage", [_param("user", "query", "only this user's"), *PAGING])},
    "/admin/api/keys/{key}/revoke": {"post": _op("Revoke a key", None, [KEY])},
    "/admin/api/keys/{key}/rotate": {
        "post": _op("Issue a replacement; the old key keeps working overlap_seconds (default 3600), then is revoked",
                    "RotatedKey", [KEY], _body({"overlap_seconds": INT}, []), "201")
    },
    "/admin/api/usage": {
        "get": _op("Usage from the daily rollup, grouped and filtered", "UsagePage", [
            _param("group", "query", "comma-separated: day, user, key, provider, model, tier (default day)"),
            *(_param(name, "query", f"only this {name}") for name in ("user", "key", "provider", "model", "tier")),
            *DATES, *PAGING,
        ])
    },
    "/admin/api/figures": {
        "get": _op("Business figures for a period, the period before it, and the change", "FiguresReport", [
            _param("period", "query", "today (default), month, or range", {"enum": ["today", "month", "range"]}), *DATES,
        ])
    },
}

def document() -> dict[str, Any]:
    """The whole OpenAPI document."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "costproxy admin API",
            "version": "1",
            "description": "Users, keys, credits, usage and business figures. Every call needs "
            "Authorization: Bearer <ADMIN_TOKEN> (or the dashboard's session cookie) and is audited.",
        },
        "servers": [{"url": "/"}],
        "security": [{"adminToken": []}],
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer", "description": "ADMIN_TOKEN"}},
        },
    }
