"""The portal's middleware and cookies: who is signed in, and a CSRF check on every change.

Two cookies, both HttpOnly, SameSite=Strict, scoped to ``/portal`` and Secure when the
portal is served over TLS (the request came over TLS, or ``PORTAL_BASE_URL`` is https):
``costproxy_portal`` holds a session's secret; ``costproxy_portal_pre`` is a random value a
browser gets before it signs in. Every POST must carry a CSRF token
(:func:`proxy.portal.tokens.csrf_token`, an HMAC under the server's key): in the
``X-CSRF-Token`` header, or the ``csrf`` field of a form. A signed-in browser's token is
its session's; the pre-session cookie's token is accepted on the two sign-in POSTs only
(``/portal/sign-in``, ``/portal/link``: a sign-in link opened from a webmail page arrives
without the Strict session cookie, so its page is given a pre-session cookie), so a
pre-session cookie planted in a browser authorises nothing once it is signed in. A POST
whose ``Origin`` names another site is refused, and so is a body over
:data:`MAX_BODY_BYTES` (or of no stated length), before it is read.

The cookies are not ``__Host-`` cookies: that prefix requires ``Path=/`` (the cookies
would go with every proxy and admin request) and ``Secure`` (no portal over plain http
for development). A planted cookie cannot do harm: the session cookie's value is looked up
by digest (an unknown one is ignored, and sign-in replaces it) and a planted pre-session
cookie's token works only for signing in, which SameSite=Strict keeps to the portal's pages.

Strict cookies are not sent when another site sends the browser here (Stripe's Checkout
and customer portal do), so Stripe returns it to ``/portal/return``, a page that asks
nothing and moves on to ``/portal/#plan`` by itself: a navigation the portal starts, which
carries the cookie.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from yarl import URL

from .. import forwarded
from ..http_json import json_error, raise_json_error
from ..state import POOL, SETTINGS
from .pages import render
from .store import SESSION_LIFETIME, PortalStore, Session
from .tokens import csrf_matches, csrf_token, new_secret

COOKIE = "costproxy_portal"
PRE_COOKIE = "costproxy_portal_pre"
PATH = "/portal"
STATIC_PREFIX = "/portal/static/"  # files: no session lookup
STORE = web.AppKey("portal_store", PortalStore)
SESSION = web.RequestKey("portal_session", Session)
#: the POSTs a browser may make with its pre-session cookie's CSRF token
PRE_SESSION_PATHS = frozenset({"/portal/sign-in", "/portal/link"})
#: the largest body a portal POST may send (its forms and JSON bodies are a few fields)
MAX_BODY_BYTES = 64 * 1024
NO_DATABASE = "The portal needs PostgreSQL: this proxy was started without a database."
SIGN_IN_FIRST = "Sign in first."
FORBIDDEN = "Missing or wrong CSRF token: reload the page and try again."
OTHER_ORIGIN = "This request came from another site."
TOO_LARGE = f"Send at most {MAX_BODY_BYTES} bytes, with a Content-Length."


def store(request: web.Request) -> PortalStore:
    """The portal's store of links and sessions."""
    return request.config_dict[STORE]


def client_address(request: web.Request) -> str:
    """The requesting client's address (behind ``TRUSTED_PROXIES``, the one they report)."""
    return forwarded.client_address(request, request.config_dict[SETTINGS].trusted_proxies)


def _secure(request: web.Request) -> bool:
    return request.secure or request.config_dict[SETTINGS].portal_base_url.startswith("https://")


def _set_cookie(response: web.StreamResponse, request: web.Request, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(name, value, max_age=max_age, path=PATH, httponly=True, samesite="Strict", secure=_secure(request))


def set_session_cookie(response: web.StreamResponse, request: web.Request, session: Session) -> None:
    """Sign the browser in with ``session`` (and drop its pre-session cookie)."""
    _set_cookie(response, request, COOKIE, session.secret, int(SESSION_LIFETIME.total_seconds()))
    response.del_cookie(PRE_COOKIE, path=PATH)


def clear_session_cookie(response: web.StreamResponse) -> None:
    """Sign the browser out."""
    response.del_cookie(COOKIE, path=PATH)


def _csrf_basis(request: web.Request) -> str | None:
    session = signed_in(request)
    return session.secret if session else request.cookies.get(PRE_COOKIE)


def form_page(request: web.Request, name: str, status: int = 200, **values: str) -> web.Response:
    """A page whose forms and scripts send back the browser's CSRF token (its ``{{csrf}}``):
    its session's, else its pre-session cookie's (a fresh one for a browser without)."""
    basis = _csrf_basis(request)
    fresh = basis is None
    if basis is None:
        basis = new_secret()
    page = render(name, status, csrf=csrf_token(store(request).csrf_key, basis), **values)
    if fresh:
        _set_cookie(page, request, PRE_COOKIE, basis, None)
    return page


def signed_in(request: web.Request) -> Session | None:
    """The request's live session, if it has one."""
    return request.get(SESSION)


def require_session(request: web.Request) -> Session:
    """The request's live session, or a 401."""
    session = signed_in(request)
    if session is None:
        raise_json_error(401, SIGN_IN_FIRST)
    return session


def _origin_allowed(request: web.Request) -> bool:
    """No ``Origin`` (or ``null``: what a browser sends for the portal's own forms, whose
    pages have ``Referrer-Policy: no-referrer``), or the portal's own: ``PORTAL_BASE_URL``'s,
    or the one the request was sent to (a browser names the page's origin, which another
    site cannot make ours). The CSRF token is the defence against senders that hide it."""
    origin = request.headers.get("Origin")
    if origin in (None, "null"):
        return True
    own = URL(request.config_dict[SETTINGS].portal_base_url).origin()
    return origin in (str(own), str(request.url.origin()))


def _csrf_bases(request: web.Request) -> list[str]:
    """The cookies whose CSRF token this POST may carry."""
    session = signed_in(request)
    bases = [session.secret] if session else []
    pre = request.cookies.get(PRE_COOKIE)
    if pre and request.path in PRE_SESSION_PATHS:
        bases.append(pre)
    return bases


async def _presented_csrf(request: web.Request) -> str:
    header = request.headers.get("X-CSRF-Token")
    if header is not None:
        return header
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return str((await request.post()).get("csrf", ""))
    return ""


def guard() -> Middleware:
    """The portal's middleware: 503 without Postgres; for a POST the size and origin
    checks; the session; for a POST the CSRF check."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.config_dict.get(POOL) is None:
            return web.Response(status=503, text=NO_DATABASE)
        changes, length = request.method not in ("GET", "HEAD", "OPTIONS"), request.content_length
        if changes and request.body_exists and (length is None or length > MAX_BODY_BYTES):
            return json_error(413, TOO_LARGE)
        if changes and not _origin_allowed(request):
            return json_error(403, OTHER_ORIGIN)
        cookie = request.cookies.get(COOKIE)
        if cookie and not request.path.startswith(STATIC_PREFIX):
            session = await store(request).session(cookie)
            if session is not None:
                request[SESSION] = session
        if changes:
            presented, key = await _presented_csrf(request), store(request).csrf_key
            if not any(csrf_matches(key, basis, presented) for basis in _csrf_bases(request)):
                return json_error(403, FORBIDDEN)
        return await handler(request)

    return middleware
