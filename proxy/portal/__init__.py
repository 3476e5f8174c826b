"""The subscriber portal at ``/portal/``: sign-in by e-mail link, the account's overview,
keys, plan and sessions. Plain HTML and JavaScript served by the proxy; the data comes from
the portal's JSON API (:mod:`proxy.portal.api`), which works on the signed-in user only.

:func:`setup_portal` mounts it when ``PORTAL_ENABLED``. It needs PostgreSQL (links and
sessions live there, migration ``006_portal.sql``) and SMTP to deliver the links.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from ..admin.pages import STATIC as ADMIN_STATIC
from ..mail import Mailer
from ..state import POOL, SETTINGS
from ..tasks import Background
from . import api, signin
from .guard import STORE, form_page, guard, signed_in
from .pages import render
from .store import PortalStore, csrf_key

__all__ = ["setup_portal"]

STATIC = Path(__file__).parent / "static"
#: the admin dashboard's vendored Chart.js, served here too rather than copied
CHART_JS = ADMIN_STATIC / "chart.umd.min.js"


async def home(request: web.Request) -> web.StreamResponse:
    """``GET /portal/``: the portal for a signed-in browser, else the sign-in form."""
    if signed_in(request) is None:
        raise web.HTTPSeeOther("/portal/sign-in")
    return form_page(request, "portal.html")


async def back_from_stripe(request: web.Request) -> web.Response:
    """``GET /portal/return``: where Stripe sends the browser back; it goes on to the plan
    page by itself, so the session cookie is sent (see :mod:`proxy.portal.guard`)."""
    return render("return.html")


async def to_home(request: web.Request) -> web.StreamResponse:
    """``GET /portal``: the portal lives at ``/portal/``."""
    raise web.HTTPPermanentRedirect("/portal/")


async def chart_js(request: web.Request) -> web.FileResponse:
    """``GET /portal/static/chart.js``: the admin dashboard's vendored copy of Chart.js."""
    return web.FileResponse(CHART_JS)


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """The store (on the app's Postgres pool, when there is one) and the mail sender."""
    if POOL in app:
        app[STORE] = PortalStore(app[POOL], await csrf_key(app[POOL]))
    app[signin.MAILER] = Mailer(app[SETTINGS].smtp_url, app[SETTINGS].mail_from)
    app[signin.SENDING] = Background()
    yield
    await app[signin.SENDING].drain(15)


def setup_portal(app: web.Application) -> None:
    """Add the portal to the proxy ``app`` (after its Postgres pool's cleanup context)."""
    app.cleanup_ctx.append(_resources)
    portal = web.Application(middlewares=[guard()])
    portal.router.add_get("/", home)
    portal.router.add_get("/return", back_from_stripe)
    portal.router.add_get("/sign-in", signin.sign_in_form)
    portal.router.add_post("/sign-in", signin.ask_for_link)
    portal.router.add_get("/link", signin.open_link)
    portal.router.add_post("/link", signin.use_link)
    portal.router.add_post("/sign-out", signin.sign_out)
    for method, path, handler in api.ROUTES:
        portal.router.add_route(method, path, handler)
    portal.router.add_get("/static/chart.js", chart_js)
    portal.router.add_static("/static", STATIC)
    app.router.add_get("/portal", to_home)
    app.add_subapp("/portal", portal)
