"""The admin audit trail: one ``admin_audit`` row per admin call, secrets redacted.

Redacted before anything is stored: the value of every parameter or body field whose name
says it is a secret (:func:`secret_name`), and anything that looks like a proxy key
(``cpk-...``) or a bearer token wherever it appears (path, query, body, names and values).
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlencode

import asyncpg
import orjson
from aiohttp import web

from ..db import POSTGRES_UNAVAILABLE
from ..keys import KEY_PREFIX

log = logging.getLogger("costproxy.admin")

LIMIT = 500
REDACTED = "***"
#: secret names, compared lowercased without separators (``X-Api-Key`` is ``xapikey``)
SECRET_NAMES = frozenset({"key", "password", "passwd", "authorization", "auth", "credentials"})
SECRET_SUFFIXES = ("token", "secret", "password", "apikey")  # access_token, client_secret, x-api-key, ...
SECRET_VALUES = re.compile(rf"{re.escape(KEY_PREFIX)}[A-Za-z0-9_-]+|\bbearer\s+[A-Za-z0-9._~+/-]+=*", re.IGNORECASE)
QUERY_SAFE = "*,:/@"  # left unescaped in the stored query, for reading


def secret_name(name: str) -> bool:
    """Whether a parameter or field called ``name`` holds a secret (case and separators ignored)."""
    plain = re.sub(r"[^a-z0-9]", "", name.lower())
    return plain in SECRET_NAMES or plain.endswith(SECRET_SUFFIXES)


def redact_text(text: str) -> str:
    """``text`` with every proxy key and bearer token in it replaced by ``***``."""
    return SECRET_VALUES.sub(REDACTED, text)


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {redact_text(str(k)): REDACTED if secret_name(str(k)) else _redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_query(raw: str) -> str:
    """A raw query string, redacted and re-encoded, at most :data:`LIMIT` characters."""
    pairs = [
        (redact_text(name), REDACTED if secret_name(name) else redact_text(value))
        for name, value in parse_qsl(raw, keep_blank_values=True)
    ]
    return urlencode(pairs, safe=QUERY_SAFE, quote_via=quote_plus)[:LIMIT]


def summarize(body: bytes, content_type: str) -> str:
    """A short, redacted rendering of a request body for the audit row."""
    if not body:
        return ""
    parsed: Any
    try:
        if content_type == "application/x-www-form-urlencoded":
            parsed = dict(parse_qsl(body.decode(), keep_blank_values=True))
        else:
            parsed = orjson.loads(body)
    except (ValueError, UnicodeDecodeError):
        return f"<{len(body)} bytes {content_type or 'unknown type'}>"
    return orjson.dumps(_redact(parsed)).decode()[:LIMIT]


async def record(pool: asyncpg.Pool, request: web.Request, actor: str, status: int) -> None:
    """Write the audit row for ``request``; a failure is logged, never raised to the caller."""
    body = await request.read() if request.body_exists else b""
    try:
        await pool.execute(
            "INSERT INTO admin_audit (actor, method, path, query, body, status) VALUES ($1, $2, $3, $4, $5, $6)",
            actor,
            request.method,
            redact_text(request.path).replace("\x00", "%00"),  # Postgres text holds no NUL
            redact_query(request.rel_url.raw_query_string),
            summarize(body, request.content_type),
            status,
        )
    except POSTGRES_UNAVAILABLE as exc:
        log.error("admin audit row not written (%s %s by %s -> %d): %s", request.method, request.path, actor, status, exc)
