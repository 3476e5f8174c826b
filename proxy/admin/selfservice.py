"""``GET /api/usage``: a developer's own usage by day, provider and model, with their proxy key."""

from __future__ import annotations

from dataclasses import replace

from aiohttp import web

from ..state import POOL, caller
from . import usage_query
from .periods import QueryError

GROUP = ("day", "provider", "model")


async def usage_handler(request: web.Request) -> web.Response:
    """The caller's usage from the daily rollup, newest day first; filters ``provider``,
    ``model``, ``from``, ``to`` (inclusive dates), paginated by ``limit`` and ``offset``.
    The user filter is always the key's owner: nobody sees another user's usage."""
    identity = await caller(request)
    if request.app[POOL] is None:
        return web.json_response({"error": {"message": "Usage history needs PostgreSQL; none is configured.", "code": "unavailable"}}, status=503)
    try:
        query = usage_query.parse(request.query, filters=("provider", "model"), group=GROUP)
    except QueryError as exc:
        return web.json_response({"error": {"message": str(exc), "code": "invalid_request"}}, status=400)
    query = replace(query, filters={**query.filters, "user": identity.user_id})
    page = await usage_query.run(request.app[POOL], query)
    return web.json_response({"user_id": identity.user_id, **page})
