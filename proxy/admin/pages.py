"""The dashboard's pages: login form, the single-page dashboard, its static assets, and
the OpenAPI document. The page holds no data: its script reads the admin API."""

from __future__ import annotations

import html
import time
from pathlib import Path

from aiohttp import web

from ..state import CONFIG, SETTINGS
from .auth import clear_session, fingerprint, identify, set_session, token_matches
from .guard import AUDIT_ACTOR
from .openapi import document

HERE = Path(__file__).parent
STATIC = HERE / "static"
PAGES = HERE / "pages"
# The page's scripts and styles are files of this package: nothing inline, nothing remote.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def render(folder: Path, name: str, status: int = 200, **values: str) -> web.Response:
    """The page ``folder/name`` with its ``{{key}}`` placeholders filled in, each value
    HTML-escaped, served with :data:`SECURITY_HEADERS` (the admin's pages and the portal's)."""
    text = (folder / name).read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", html.escape(value))
    return web.Response(text=text, status=status, content_type="text/html", headers=SECURITY_HEADERS)


def _token(request: web.Request) -> str:
    return request.config_dict[SETTINGS].admin_token


async def dashboard(request: web.Request) -> web.StreamResponse:
    """``GET /admin/``: the dashboard for a logged-in browser, else the login form."""
    if not identify(request, _token(request), time.time()).authenticated:
        raise web.HTTPSeeOther("/admin/login")
    return render(PAGES, "dashboard.html")


async def login_form(request: web.Request) -> web.Response:
    """``GET /admin/login``."""
    return render(PAGES, "login.html", message="")


async def login(request: web.Request) -> web.StreamResponse:
    """``POST /admin/login`` (form field ``token``): a session cookie and the dashboard, or 401."""
    presented = str((await request.post()).get("token", ""))
    request[AUDIT_ACTOR] = f"login:{fingerprint(presented)}"
    if not token_matches(presented, _token(request)):
        return render(PAGES, "login.html", 401, message="That is not the admin token.")
    response = web.HTTPSeeOther("/admin/")
    set_session(response, request, _token(request), time.time())
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    """``POST /admin/logout``: end the browser's session."""
    response = web.HTTPSeeOther("/admin/login")
    clear_session(response)
    raise response


async def openapi(request: web.Request) -> web.Response:
    """``GET /admin/openapi.json``, its tiers the live ones."""
    return web.json_response(document(list(request.config_dict[CONFIG].current.tiers.tiers)))


async def to_dashboard(request: web.Request) -> web.StreamResponse:
    """``GET /admin``: the dashboard lives at ``/admin/``."""
    raise web.HTTPPermanentRedirect("/admin/")


def add_routes(admin: web.Application) -> None:
    """Register the pages on the admin sub-application (mounted at ``/admin``)."""
    admin.router.add_get("/", dashboard)
    admin.router.add_get("/login", login_form)
    admin.router.add_post("/login", login)
    admin.router.add_post("/logout", logout)
    admin.router.add_get("/openapi.json", openapi)
    admin.router.add_static("/static", STATIC)
