"""The admin audit trail: one ``admin_audit`` row per admin call, secrets redacted."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl

import asyncpg
import orjson
from aiohttp import web

log = logging.getLogger("costproxy.admin")

LIMIT = 500
SECRET_FIELDS = frozenset({"token", "api_key", "password", "secret", "admin_token"})


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "***" if k.lower() in SECRET_FIELDS else _redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def summarize(body: bytes, content_type: str) -> str:
    """A short, redacted rendering of a request body for the audit row."""
    if not body:
        return ""
    parsed: Any
    try:
        if content_type == "application/x-www-form-urlencoded":
            parsed = dict(parse_qsl(body.decode()))
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
            actor, request.method, request.path, request.query_string[:LIMIT], summarize(body, request.content_type), status,
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.error("admin audit row not written (%s %s by %s -> %d): %s", request.method, request.path, actor, status, exc)
