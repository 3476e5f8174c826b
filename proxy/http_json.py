"""JSON over HTTP for the proxy's own APIs: the admin API, the portal's API and the
subscriber routes (``/api/...``).

Two error shapes are rendered here, one per audience, from the same :class:`ApiError`:

- the subscriber API's, ``{"error": {"code": ..., "message": ...}}`` (:func:`api_error`);
- the admin and portal APIs', ``{"error": {"status": ..., "message": ...}}``, with a
  ``code`` too where the error has one (:func:`json_error`).

Request bodies are read strictly (:func:`body`, :func:`field`: a misspelt field is a 400,
not a default), and :func:`handles_errors` turns the account service's and the report
queries' errors into JSON answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, NoReturn

import orjson
from aiohttp import web

from .accounts import AccountError, Accounts
from .keys import KeyMirror
from .reports.periods import QueryError
from .state import CONFIG, LEDGER, POOL, REDIS, SETTINGS

NUL = "\x00"
NO_NUL = "text must not contain NUL (U+0000): PostgreSQL cannot store it"
#: no answer of these APIs may be kept by a cache: each is one account's, or the operator's
NO_STORE = {"Cache-Control": "no-store"}


@dataclass(frozen=True, slots=True)
class ApiError:
    """An error answer before it is given a shape: each API renders it in its own."""

    status: int
    code: str
    message: str
    headers: Mapping[str, str] = dataclass_field(default_factory=dict)


#: Redis, which holds the credit ledger, cannot be reached
LEDGER_UNAVAILABLE = ApiError(
    503, "ledger_unavailable", "The gateway cannot reach its credit ledger right now; retry in a moment."
)


def reply(data: Any, status: int = 200) -> web.Response:
    """A JSON response (datetimes as ISO 8601), never cached."""
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=NO_STORE)


def api_error(error: ApiError) -> NoReturn:
    """Answer ``error`` in the subscriber API's shape, ``{"error": {"code", "message"}}``
    (raised as an HTTP exception), never cached."""
    exc = web.HTTPException(
        text=orjson.dumps({"error": {"code": error.code, "message": error.message}}).decode(),
        content_type="application/json",
        headers={**NO_STORE, **error.headers},
    )
    exc.set_status(error.status)
    raise exc


def json_error(status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None) -> web.Response:
    """The admin and portal APIs' error shape: ``{"error": {"status", "message"}}``, and
    ``code`` when given; never cached, as every answer of these APIs."""
    error: dict[str, Any] = {"status": status, "message": message}
    if code is not None:
        error["code"] = code
    return web.json_response({"error": error}, status=status, headers={**NO_STORE, **(headers or {})})


def raise_json_error(status: int, message: str, code: str | None = None) -> NoReturn:
    """:func:`json_error`'s answer raised as an HTTP exception, for code a handler calls."""
    answer = json_error(status, message, code)
    exc = web.HTTPException(text=answer.text, content_type="application/json", headers=NO_STORE)
    exc.set_status(status)
    raise exc


def shaped_error(error: ApiError) -> web.Response:
    """``error`` in the admin and portal APIs' shape (:func:`json_error`), with its code."""
    return json_error(error.status, error.message, error.code, error.headers)


def accounts(request: web.Request) -> Accounts:
    """The account service over the app's Postgres pool, Redis ledger and live config."""
    app = request.config_dict
    return Accounts(app[POOL], app[LEDGER], KeyMirror(app[REDIS], app[SETTINGS].redis_prefix), app[CONFIG].current)


class BadRequestError(ValueError):
    """A request body that does not say what the endpoint needs."""


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def handles_errors(handler: Handler) -> Handler:
    """Turn service and query errors into JSON error answers (:func:`json_error`'s shape);
    a NUL in the path or query is a 400 before the handler runs."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        if any(NUL in value for value in (*request.match_info.values(), *request.query.values())):
            return json_error(400, NO_NUL)
        try:
            return await handler(request)
        except AccountError as exc:
            return json_error(exc.status, str(exc))
        except (QueryError, BadRequestError) as exc:
            return json_error(400, str(exc))

    wrapped.__doc__ = handler.__doc__
    return wrapped


async def body(request: web.Request, *fields: str) -> dict[str, Any]:
    """The JSON object sent, with no field but ``fields``, or a BadRequestError (a misspelt
    optional field would otherwise be ignored for its default)."""
    raw = await request.read()
    try:
        data = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise BadRequestError("the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise BadRequestError("the body must be a JSON object")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise BadRequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; this call takes {', '.join(fields)}")
    return data


def field(data: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    """``data[name]`` of type ``kind`` (``bool`` is never taken for ``int``; ``2.0`` is, as in
    JSON Schema), or ``default``."""
    value = data.get(name, default)
    if value is ...:
        raise BadRequestError(f"{name} is required")
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if value is not default and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise BadRequestError(f"{name} must be of type {kind.__name__}")
    if isinstance(value, str) and NUL in value:
        raise BadRequestError(f"{name}: {NO_NUL}")
    return value
