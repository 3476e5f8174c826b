"""The OpenAPI 3.1 document of the admin API, served at ``/admin/openapi.json``.

Hand-written so that it says what each figure means; a test checks that it lists exactly
the routes registered and that real answers validate against its schemas.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..ledger.ids import HOLD_ID_PATTERN
from ..reports.periods import FIRST_DAY, LAST_DAY, MAX_DAYS
from ..reports.usage_query import DIMENSIONS, MAX_LIMIT, MAX_OFFSET
from .api import MAX_CREDITS, MAX_OVERLAP_SECONDS

Schema = dict[str, Any]

INT: Schema = {"type": "integer"}
STR: Schema = {"type": "string"}
CENTS_USD: Schema = {"type": "string", "pattern": r"^-?\d+\.\d{2}$", "description": "US dollars, 2 decimals"}
MICRO_USD: Schema = {"type": "string", "pattern": r"^-?\d+\.\d{6}$", "description": "US dollars, 6 decimals"}
PCT: Schema = {
    "type": ["string", "null"],
    "pattern": r"^-?\d+\.\d{2}$",
    "description": "percent, 2 decimals; null when undefined",
}
TIME: Schema = {"type": "string", "format": "date-time"}
PER_MILLION: Schema = {"type": "string", "pattern": r"^\d+\.\d{6}$", "description": "US dollars per million tokens"}
#: text that reaches PostgreSQL, which cannot store NUL: the API answers 400 to it
TEXT: Schema = {"type": "string", "pattern": r"^[^\u0000]*$"}
REQUEST_ID: Schema = {
    "type": "string",
    "pattern": f"^{HOLD_ID_PATTERN}$",
    "description": "hold_<admission time, ms since the epoch, 11 hex digits>_<96 random bits, 24 hex digits>",
}


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
    "Tier": {"type": "string", "description": "a tier of tiers.yaml; the served document lists the live ones"},
    "User": obj({"id": STR, "email": STR, "tier": STR, "status": STR, "created_at": TIME}),
    "UserPage": page_of(ref("User")),
    "Key": obj(
        {"id": STR, "user_id": STR, "name": STR, "key_prefix": STR, "created_at": TIME, "revoked_at": nullable(TIME)},
        closed=False,
    ),
    "KeyPage": page_of(ref("Key")),
    "NewKey": obj({"key_id": STR, "api_key": {"type": "string", "description": "shown once, never stored"}}),
    "NewUser": obj({"user_id": STR, "key_id": STR, "api_key": STR}),
    "RotatedKey": obj({"key_id": STR, "api_key": STR, "replaces": STR, "overlap_seconds": INT}),
    "LedgerEntry": obj(
        {
            "id": STR,
            "kind": STR,
            "amount_micro": INT,
            "balance_micro": INT,
            "reason": {"type": ["string", "null"]},
            "created_at": TIME,
        }
    ),
    "UserDetail": obj(
        {
            "user": {"type": "object", "description": "the users row"},
            "account": nullable(
                {
                    "type": "object",
                    "description": "live Redis account: balance, held, open_holds, tokens, requests, cost (µ$),"
                    " cycle_start, cycle_end (ms), tier, status, auto_renew",
                }
            ),
            "available_micro": {"type": ["integer", "null"], "description": "balance − held, µ$; null without an account"},
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
            "day": {"type": "string", "format": "date"},
            "user": STR,
            "key": STR,
            "provider": STR,
            "model": STR,
            "tier": STR,
            "requests": INT,
            "input_tokens": INT,
            "cached_input_tokens": INT,
            "output_tokens": INT,
            "tokens": INT,
            "cost_micro": INT,
            "cost_usd": MICRO_USD,
        },
        "required": ["requests", "input_tokens", "cached_input_tokens", "output_tokens", "tokens", "cost_micro", "cost_usd"],
        "additionalProperties": False,
    },
    "UsagePage": obj(
        {
            "group": {"type": "array", "items": STR},
            "rows": {"type": "array", "items": ref("UsageRow")},
            "limit": INT,
            "offset": INT,
            "next_offset": nullable(INT),
        }
    ),
    "Period": obj(
        {
            "name": STR,
            "from": {"type": "string", "format": "date"},
            "to": {"type": "string", "format": "date"},
            "start": TIME,
            "end": TIME,
        }
    ),
    "Figures": obj(
        {
            "period": ref("Period"),
            "accounts": obj(
                {
                    "signups": INT,
                    "upgrades": INT,
                    "downgrades": INT,
                    "cancellations": {"type": "integer", "description": "users with a cancel or lapse tier change in the period"},
                    "paying_users_start": INT,
                    "paying_users_end": INT,
                }
            ),
            "usage": obj({"requests": INT, "input_tokens": INT, "output_tokens": INT, "tokens": INT}),
            "revenue": obj(
                {
                    "invoices": INT,
                    "gross_cents": INT,
                    "stripe_fee_cents": INT,
                    "refunded_cents": INT,
                    "disputed_cents": INT,
                    "net_cents": {"type": "integer", "description": "gross − Stripe fees − refunded − disputed"},
                    "gross_usd": CENTS_USD,
                    "net_usd": CENTS_USD,
                }
            ),
            "api_cost": obj({"micro": INT, "usd": MICRO_USD, "paid_tiers_micro": INT, "free_tiers_micro": INT}),
            "profit": obj({"micro": {"type": "integer", "description": "net revenue − API cost, µ$"}, "usd": MICRO_USD}),
            "margin": obj({"pct": PCT, "target_pct": PCT, "vs_target_pct": PCT}),
            "arpu": obj({"usd": {"type": ["string", "null"]}, "paying_users": INT}),
            "churn": obj({"cancellations": INT, "paying_users_start": INT, "rate_pct": PCT}),
            "budget": obj(
                {
                    "allocated_micro": INT,
                    "allocated_usd": MICRO_USD,
                    "used_micro": INT,
                    "used_usd": MICRO_USD,
                    "unused_micro": INT,
                    "unused_usd": MICRO_USD,
                    "used_pct": PCT,
                }
            ),
            "margin_model": obj(
                {
                    "net_revenue_micro": INT,
                    "api_budget_micro": INT,
                    "planned_profit_micro": INT,
                    "unused_allowance_micro": INT,
                    "free_tier_cost_micro": INT,
                    "profit_micro": INT,
                    "net_revenue_usd": MICRO_USD,
                    "planned_profit_usd": MICRO_USD,
                    "unused_allowance_usd": MICRO_USD,
                    "free_tier_cost_usd": MICRO_USD,
                    "planned_margin_pct": PCT,
                    "actual_margin_pct": PCT,
                    "target_margin_pct": PCT,
                },
                "profit = planned profit + unused allowance − free-tier cost",
            ),
            "tiers": {
                "type": "array",
                "items": obj(
                    {"tier": STR, "price_usd": {"type": ["string", "null"]}, "paid": {"type": ["boolean", "null"]}, "users": INT}
                ),
            },
            "providers": {
                "type": "array",
                "items": obj(
                    {
                        "provider": STR,
                        "requests": INT,
                        "tokens": INT,
                        "cost_micro": INT,
                        "cost_usd": MICRO_USD,
                        "request_share_pct": PCT,
                        "cost_share_pct": PCT,
                    }
                ),
            },
        },
        'Business figures for one period; definitions in the README\'s "Business figures"',
    ),
    "Change": obj(
        {
            "signups": INT,
            "upgrades": INT,
            "downgrades": INT,
            "requests": INT,
            "tokens": INT,
            "net_revenue_cents": INT,
            "net_revenue_usd": CENTS_USD,
            "api_cost_micro": INT,
            "api_cost_usd": MICRO_USD,
            "profit_micro": INT,
            "profit_usd": MICRO_USD,
            "margin_pct_points": PCT,
        }
    ),
    "FiguresReport": obj({"current": ref("Figures"), "previous": ref("Figures"), "change": ref("Change")}),
    "Reconciliation": obj(
        {
            "ran_at": TIME,
            "tolerance": {"type": "string", "description": "the share a difference may reach"},
            "exceeds": {"type": "boolean", "description": "a difference is beyond the tolerance"},
            "ratios": {
                "type": "object",
                "additionalProperties": {"type": ["string", "null"]},
                "description": "the largest share of each kind (null: a figure the source does not have)",
            },
            "source": STR,
            "from": {"type": "string", "format": "date"},
            "to": {"type": "string", "format": "date"},
            "rows": INT,
            "kinds": {"type": "array", "items": STR},
            "notes": {"type": "array", "items": STR},
            "differences": {
                "type": "array",
                "items": obj(
                    {
                        "day": {"type": ["string", "null"], "format": "date"},
                        "subject": STR,
                        "kind": STR,
                        "ours": INT,
                        "theirs": INT,
                        "difference": INT,
                        "share": {"type": ["string", "null"]},
                    }
                ),
            },
        },
        "a stored reconciliation: the worker's run of one settled day of a provider, or a costproxy reconcile run "
        "of any source and days (README, Reconciliation)",
    ),
    "Reconciliations": {
        "type": "object",
        "additionalProperties": ref("Reconciliation"),
        "description": "the last result of each source (openai, anthropic, stripe), by source",
    },
    "Receipt": obj(
        {
            "id": REQUEST_ID,
            "user_id": STR,
            "time": TIME,
            "outcome": {"enum": ["charged", "voided"]},
            "void_reason": {"type": ["string", "null"], "description": "why a voided hold cost nothing"},
            "provider": {"type": ["string", "null"]},
            "model": {"type": ["string", "null"]},
            "tier": {"type": ["string", "null"], "description": "the account's tier when it was charged"},
            "stream": {"type": ["boolean", "null"]},
            "tokens": nullable(
                obj(
                    {kind: INT for kind in ("input", "cached_input", "cache_write", "cache_write_1h", "output", "reasoning")},
                    "tokens by the price each is charged at; reasoning tokens are part of output",
                )
            ),
            "service_tier": {"type": ["string", "null"]},
            "price_set": {"type": ["string", "null"], "enum": ["standard", "long_context", "flex", "priority", None]},
            "unit_prices_usd_per_1m": nullable(
                obj(
                    {kind: PER_MILLION for kind in ("input", "cached_input", "cache_write", "cache_write_1h", "output")},
                    "the prices applied, from the price version the request was admitted under",
                )
            ),
            "price_version": {"type": ["string", "null"], "pattern": "^[0-9a-f]{16}$"},
            "estimated": {"type": "boolean"},
            "cost_micro_usd": INT,
            "cost_credits": {"type": "string", "pattern": r"^-?\d+\.\d{4}$", "description": "credits, 4 decimals"},
            "cost_usd": MICRO_USD,
            "balance_after_micro_usd": INT,
        },
        "one request's settlement: what it used, the prices applied, what it cost (equal to its ledger entry)",
    ),
}


def _param(name: str, where: str, description: str, schema: Schema = TEXT, required: bool = False) -> Schema:
    return {"name": name, "in": where, "description": description, "required": required or where == "path", "schema": schema}


USER = _param("user", "path", "user id or email")
KEY = _param("key", "path", "key id")
PAGING = [
    _param("limit", "query", f"page size (1-{MAX_LIMIT})", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
    _param("offset", "query", "rows to skip", {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET}),
]
DIMENSION = f"({'|'.join(DIMENSIONS)})"
GROUP: Schema = {"type": "string", "pattern": f"^{DIMENSION}(,{DIMENSION})*$"}
DAY: Schema = {"type": "string", "format": "date", "pattern": "^(19|2[0-9])[0-9]{2}-[0-9]{2}-[0-9]{2}$"}  # FIRST_DAY..LAST_DAY
DATES = [
    _param("from", "query", f"first UTC day, YYYY-MM-DD, {FIRST_DAY} to {LAST_DAY}", DAY),
    _param("to", "query", "last UTC day (inclusive), not before from", DAY),
]


ERRORS = {
    "400": "bad request",
    "401": "missing or wrong admin token",
    "404": "no such user, key or settled request",
    "409": "conflicts with what exists: the email is taken, the key is already revoked or being rotated,"
    " or the user has no live account in Redis",
    "503": "the admin surface is disabled (no ADMIN_TOKEN) or has no database",
}


def _op(
    summary: str,
    response: str | None,
    params: Sequence[Schema] = (),
    body: Schema | None = None,
    status: str = "200",
    errors: Sequence[str] = (),
) -> Schema:
    """An operation answering ``response`` (a schema name; None: a plain object), or an Error
    with 400, 401, 503, 404 when it names a user or key in its path, and ``errors``."""
    answer = ref(response) if response else {"type": "object"}
    found = ["404"] if any(p["in"] == "path" for p in params) else []
    operation: Schema = {
        "summary": summary,
        "parameters": list(params),
        "responses": {
            status: {"description": "OK", "content": {"application/json": {"schema": answer}}},
            **{
                code: {"description": ERRORS[code], "content": {"application/json": {"schema": ref("Error")}}}
                for code in sorted({"400", "401", "503", *found, *errors})
            },
        },
    }
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return operation


def _body(properties: dict[str, Schema], required: list[str]) -> Schema:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


#: a grant adds (or, negative, removes) credits; a refund gives credits back; a reason is needed
CREDITS: Schema = {
    **_body(
        {
            "kind": {"enum": ["grant", "refund"]},
            "credits": {"type": "integer", "minimum": -MAX_CREDITS, "maximum": MAX_CREDITS, "not": {"const": 0}},
            "reason": {"type": "string", "pattern": r"^[^\u0000]*[^\s\u0000][^\u0000]*$", "description": "not blank"},
        },
        ["credits", "reason"],
    ),
    "if": {"properties": {"kind": {"const": "refund"}}, "required": ["kind"]},
    "then": {"properties": {"credits": {"minimum": 1}}},
}

PATHS: dict[str, Schema] = {
    "/admin/api/users": {
        "get": _op(
            "Users, newest first; q searches id and email", "UserPage", [_param("q", "query", "id or part of an email"), *PAGING]
        ),
        "post": _op(
            "Create a user with a first key (the key is shown only here)",
            "NewUser",
            body=_body({"email": TEXT, "tier": ref("Tier")}, ["email", "tier"]),
            status="201",
            errors=["409"],
        ),
    },
    "/admin/api/users/{user}": {
        "get": _op("The user, live balance and holds from Redis, latest ledger, keys", "UserDetail", [USER])
    },
    "/admin/api/users/{user}/tier": {
        "post": _op("Move the user to another tier now", None, [USER], _body({"tier": ref("Tier")}, ["tier"]), errors=["409"])
    },
    "/admin/api/users/{user}/status": {
        "post": _op(
            "Suspend or reactivate",
            None,
            [USER],
            _body({"status": {"enum": ["active", "suspended"]}}, ["status"]),
            errors=["409"],
        )
    },
    "/admin/api/users/{user}/credits": {
        "post": _op(
            "Grant or refund credits (1 credit = $0.01), as a ledger entry with a reason",
            None,
            [USER],
            CREDITS,
            "201",
            errors=["409"],
        )
    },
    "/admin/api/users/{user}/keys": {
        "get": _op("The user's keys", "KeyPage", [USER, *PAGING]),
        "post": _op(
            "Issue a key (shown only here); 409 when the user has 50 live keys",
            "NewKey",
            [USER],
            _body({"name": TEXT}, []),
            "201",
            errors=["409"],
        ),
    },
    "/admin/api/keys": {
        "get": _op("Every key, newest first", "KeyPage", [_param("user", "query", "only this user's"), *PAGING], errors=["404"])
    },
    "/admin/api/keys/{key}/revoke": {"post": _op("Revoke a key", None, [KEY])},
    "/admin/api/keys/{key}/rotate": {
        "post": _op(
            "Issue a replacement; the old key keeps working overlap_seconds (default 3600), then is revoked",
            "RotatedKey",
            [KEY],
            _body({"overlap_seconds": {"type": "integer", "minimum": 0, "maximum": MAX_OVERLAP_SECONDS}}, []),
            "201",
            errors=["409"],
        )
    },
    "/admin/api/usage": {
        "get": _op(
            "Usage from the daily rollup, grouped and filtered",
            "UsagePage",
            [
                _param("group", "query", "comma-separated: day, user, key, provider, model, tier (default day)", GROUP),
                *(_param(name, "query", f"only this {name}") for name in ("user", "key", "provider", "model", "tier")),
                *DATES,
                *PAGING,
            ],
        )
    },
    "/admin/api/usage/{id}": {
        "get": _op(
            "The receipt of any user's request, by its x-costproxy-request-id, once the usage log wrote it",
            "Receipt",
            [_param("id", "path", "the request id (x-costproxy-request-id)", REQUEST_ID)],
        )
    },
    "/admin/api/reconcile": {
        "get": _op("The last stored reconciliation of each source, by the worker or costproxy reconcile", "Reconciliations")
    },
    "/admin/api/figures": {
        "get": _op(
            "Business figures for a period, the period before it, and the change",
            "FiguresReport",
            [
                _param(
                    "period",
                    "query",
                    f"today (default), month, or range: from and to, at most {MAX_DAYS} days",
                    {"enum": ["today", "month", "range"]},
                ),
                *DATES,
            ],
        )
    },
}


def document(tiers: Sequence[str] = ()) -> dict[str, Any]:
    """The whole OpenAPI document; ``tiers``, the configured tiers' names, are the values a
    ``Tier`` may take."""
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
            "schemas": {**SCHEMAS, "Tier": {**SCHEMAS["Tier"], "enum": list(tiers)}} if tiers else SCHEMAS,
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer", "description": "ADMIN_TOKEN"}},
        },
    }
