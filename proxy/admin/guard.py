"""The admin sub-application's middleware: disabled without ``ADMIN_TOKEN``, authenticated
API calls, and an audit row for every API call and login attempt."""

from __future__ import annotations

import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..http_json import json_error
from ..state import POOL
from . import audit
from .auth import identify

API_PREFIX = "/admin/api/"
AUDITED_PAGES = frozenset({"/admin/login", "/admin/logout"})
AUDIT_ACTOR = web.RequestKey("admin_audit_actor", str)  # a handler naming the actor itself (login)

DISABLED = "The admin surface is disabled: set ADMIN_TOKEN in the proxy's environment to enable it."
NO_DATABASE = "The admin surface needs PostgreSQL: this proxy was started without a database."


def guard(admin_token: str) -> Middleware:
    """The middleware for an admin app guarded by ``admin_token`` (empty: disabled)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        api = request.path.startswith(API_PREFIX)
        if not admin_token:
            return json_error(503, DISABLED) if api else web.Response(status=503, text=DISABLED)
        if request.config_dict.get(POOL) is None:
            return json_error(503, NO_DATABASE) if api else web.Response(status=503, text=NO_DATABASE)
        if not api and request.path not in AUDITED_PAGES:
            return await handler(request)
        caller = identify(request, admin_token, time.time())
        status = 500
        response: web.StreamResponse
        try:
            if api and not caller.authenticated:
                status = 401
                response = json_error(401, "Missing or wrong admin token: send Authorization: Bearer <ADMIN_TOKEN>.")
                response.headers["WWW-Authenticate"] = 'Bearer realm="costproxy-admin"'
                return response
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            await audit.record(request.config_dict[POOL], request, request.get(AUDIT_ACTOR, caller.actor), status)

    return middleware
