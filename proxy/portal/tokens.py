"""The portal's secrets: link tokens, session ids and the CSRF tokens derived from them.

Only digests are stored (:func:`proxy.keys.hash_key`, the SHA-256 proxy keys are stored
by), so a copy of the database signs nobody in. Rows are looked up by digest (the database
never sees a secret, and an index lookup by digest tells an attacker nothing about the
secret); the one comparison of two secrets, the CSRF check, is constant-time.
A CSRF token is an HMAC under a server key (:func:`proxy.portal.store.csrf_key`): whoever
chooses or learns a browser's cookie still cannot compute its token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets


def new_secret() -> str:
    """A fresh 256-bit secret, URL-safe."""
    return secrets.token_urlsafe(32)


def csrf_token(key: bytes, cookie: str) -> str:
    """The CSRF token of the browser holding ``cookie``, under the server's ``key``: a
    one-way derivation, so a page may show it without showing the cookie."""
    return hmac.new(key, b"csrf:" + cookie.encode(), hashlib.sha256).hexdigest()


def csrf_matches(key: bytes, cookie: str, presented: str) -> bool:
    """Whether ``presented`` is the CSRF token of ``cookie`` under ``key`` (constant-time)."""
    return hmac.compare_digest(csrf_token(key, cookie).encode(), presented.encode())
