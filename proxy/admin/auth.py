"""Who may use the admin surface: ``ADMIN_TOKEN`` as a bearer token, or a session cookie.

The token is compared in constant time (``hmac.compare_digest`` over SHA-256 digests, so
its length does not leak either). A session cookie never holds the token: it holds an
expiry and a nonce signed with HMAC-SHA256 keyed by the token, so changing ``ADMIN_TOKEN``
ends every session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from aiohttp import web

from ..bearer import bearer_token

COOKIE = "costproxy_admin"
SESSION_SECONDS = 12 * 3600


@dataclass(frozen=True)
class Caller:
    """Who is calling: ``actor`` is what the audit log records."""

    authenticated: bool
    actor: str


def fingerprint(token: str) -> str:
    """A short, non-reversible name for a token (first 12 hex digits of its SHA-256)."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def token_matches(presented: str, admin_token: str) -> bool:
    """Constant-time comparison of a presented token with ``ADMIN_TOKEN``."""
    return hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), hashlib.sha256(admin_token.encode()).digest())


def _signature(admin_token: str, payload: str) -> str:
    return hmac.new(admin_token.encode(), payload.encode(), hashlib.sha256).hexdigest()


def new_session(admin_token: str, now: float) -> str:
    """A cookie value ``<expiry>.<nonce>.<hmac>`` valid for :data:`SESSION_SECONDS`."""
    payload = f"{int(now) + SESSION_SECONDS}.{secrets.token_urlsafe(12)}"
    return f"{payload}.{_signature(admin_token, payload)}"


def session_valid(admin_token: str, value: str, now: float) -> bool:
    """Whether a cookie value was signed with ``admin_token`` and has not expired."""
    payload, _, signature = value.rpartition(".")
    expiry = payload.partition(".")[0]
    if not expiry.isdigit():
        return False
    return hmac.compare_digest(signature.encode(), _signature(admin_token, payload).encode()) and int(expiry) > now


def identify(request: web.Request, admin_token: str, now: float) -> Caller:
    """The caller of an admin request, from its bearer token or its session cookie."""
    presented = bearer_token(request.headers.get("Authorization"))
    if presented is not None:
        if token_matches(presented, admin_token):
            return Caller(True, f"token:{fingerprint(presented)}")
        return Caller(False, f"bad-token:{fingerprint(presented)}")
    cookie = request.cookies.get(COOKIE)
    if cookie is not None:
        if request.method not in ("GET", "HEAD"):
            # The dashboard only reads. A cookie that could also move credits would be one
            # form post away from a cross-site request forgery: changes need the token.
            return Caller(False, "session-write")
        if session_valid(admin_token, cookie, now):
            return Caller(True, f"session:{fingerprint(admin_token)}")
        return Caller(False, "bad-session")
    return Caller(False, "anonymous")


def set_session(response: web.StreamResponse, request: web.Request, admin_token: str, now: float) -> None:
    """Log the browser in: an HttpOnly, SameSite=Strict cookie scoped to ``/admin``."""
    response.set_cookie(
        COOKIE,
        new_session(admin_token, now),
        max_age=SESSION_SECONDS,
        path="/admin",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )


def clear_session(response: web.StreamResponse) -> None:
    """Log the browser out."""
    response.del_cookie(COOKIE, path="/admin")
