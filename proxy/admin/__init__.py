"""The operator's admin surface, added to the proxy app.

:func:`setup_admin` mounts everything: the admin API (``/admin/api/...``), the dashboard
(``/admin/``), its static assets and the OpenAPI document (``/admin/openapi.json``). They
read Postgres through the app's lazily connecting pool (``state.POOL``); the proxy's hot
path never touches it.
"""

from __future__ import annotations

from aiohttp import web

from ..state import SETTINGS
from . import api, pages
from .guard import guard

__all__ = ["setup_admin"]


def setup_admin(app: web.Application) -> None:
    """Add the admin surface to the proxy ``app`` (before it starts)."""
    admin = web.Application(middlewares=[guard(app[SETTINGS].admin_token)])
    api.add_routes(admin)
    pages.add_routes(admin)
    app.router.add_get("/admin", pages.to_dashboard)
    app.add_subapp("/admin", admin)
