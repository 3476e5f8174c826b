"""Sign-in links, sessions, the per-user limit on Stripe calls and the CSRF key, in
Postgres (migration ``006_portal.sql``).

A rate limit counts and records in one transaction holding advisory locks on what it
counts, so requests arriving together cannot all pass a check made before any of them is
recorded. The store's clock and limits are attributes a test may replace.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv6Address, ip_address, ip_network
from typing import Any

import asyncpg

from ..db import Connection
from ..keys import hash_key
from .tokens import new_secret

Clock = Callable[[], datetime]
LINK_LIFETIME = timedelta(minutes=15)
SESSION_LIFETIME = timedelta(days=14)


def utc_now() -> datetime:
    """The wall clock, in UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class RateLimits:
    """At most ``per_email`` links to one address and ``per_client`` from one client
    (:func:`client_key`) within ``window``; at most ``stripe_per_user`` Stripe-backed
    calls (checkout, preview, plan change, customer portal) by one user within ``stripe_window``."""

    per_email: int = 5
    per_client: int = 20
    window: timedelta = LINK_LIFETIME
    stripe_per_user: int = 10
    stripe_window: timedelta = timedelta(minutes=1)


def client_key(address: str) -> str:
    """What the per-client limit counts: an IPv6 client by its /64 (one subscriber line
    holds all of it), any other address as it is."""
    try:
        ip = ip_address(address)
    except ValueError:
        return address
    if not isinstance(ip, IPv6Address):
        return str(ip)
    if ip.ipv4_mapped is not None:  # ::ffff:192.0.2.1 is 192.0.2.1
        return str(ip.ipv4_mapped)
    return str(ip_network(f"{ip}/64", strict=False))


async def _lock(conn: Connection, *names: str) -> None:
    """Hold transaction-scoped advisory locks on ``names``, in the order given."""
    for name in names:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", name)


async def csrf_key(pool: asyncpg.Pool) -> bytes:
    """The key CSRF tokens are derived with: drawn at random by the first process to ask
    and kept in Postgres, so every replica (and a restart) uses the same one."""
    await pool.execute("INSERT INTO portal_secret (secret) VALUES ($1) ON CONFLICT DO NOTHING", new_secret())
    secret: str = await pool.fetchval("SELECT secret FROM portal_secret")
    return secret.encode()


async def prune(pool: asyncpg.Pool, now: datetime | None = None, limits: RateLimits = RateLimits()) -> int:
    """Delete the rows past their use as of ``now`` (default the wall clock); returns how
    many went: sign-in links past both their lifetime and the rate-limit window (an
    address's own go when it asks again, others' here), sessions expired or revoked, and
    Stripe-backed calls older than their window. Run by the worker's sweep."""
    now = now or utc_now()
    async with pool.acquire() as conn, conn.transaction():
        links = await conn.execute(
            "DELETE FROM portal_sign_ins WHERE expires_at <= $1 AND created_at <= $2", now, now - limits.window
        )
        sessions = await conn.execute("DELETE FROM portal_sessions WHERE expires_at <= $1 OR revoked_at IS NOT NULL", now)
        calls = await conn.execute("DELETE FROM portal_stripe_calls WHERE created_at <= $1", now - limits.stripe_window)
    return sum(int(status.split()[-1]) for status in (links, sessions, calls))


@dataclass(frozen=True)
class Session:
    """A live session: ``id`` is public, ``secret`` is the cookie's value."""

    id: str
    user_id: str
    secret: str


class PortalStore:
    """Creates and consumes sign-in links; opens, finds, lists and revokes sessions; counts
    Stripe-backed calls. ``csrf_key`` is :func:`csrf_key`'s. (:func:`prune` deletes the
    rows past their use.)"""

    def __init__(self, pool: asyncpg.Pool, csrf_key: bytes):
        self.pool = pool
        self.csrf_key = csrf_key
        #: the time (tests move it ahead instead of sleeping)
        self.clock: Clock = utc_now
        #: the rate limits (tests lower or lift them)
        self.limits = RateLimits()

    async def new_link(self, email: str, client: str) -> str | None:
        """A single-use sign-in token for ``email``, valid for :data:`LINK_LIFETIME`, asked
        for by the client at address ``client``; None past the rate limits. The address's
        links that are past both their lifetime and the rate-limit window go."""
        token, now, counted = new_secret(), self.clock(), client_key(client)
        since = now - self.limits.window
        async with self.pool.acquire() as conn, conn.transaction():
            await _lock(conn, f"portal-email:{email}", f"portal-client:{counted}")  # always in this order
            row = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE email = $1) AS by_email, count(*) FILTER (WHERE client = $2) AS by_client"
                " FROM portal_sign_ins WHERE (email = $1 OR client = $2) AND created_at > $3",
                email,
                counted,
                since,
            )
            assert row is not None  # an aggregate always has a row
            if row["by_email"] >= self.limits.per_email or row["by_client"] >= self.limits.per_client:
                return None
            await conn.execute(
                "DELETE FROM portal_sign_ins WHERE email = $1 AND expires_at <= $2 AND created_at <= $3", email, now, since
            )
            await conn.execute(
                "INSERT INTO portal_sign_ins (token_hash, email, client, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
                hash_key(token),
                email,
                counted,
                now,
                now + LINK_LIFETIME,
            )
        return token

    async def link_email(self, token: str) -> str | None:
        """The address an unused, unexpired token was sent to, leaving it unused."""
        email: str | None = await self.pool.fetchval(
            "SELECT email FROM portal_sign_ins WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2",
            hash_key(token),
            self.clock(),
        )
        return email

    async def use_link(self, token: str) -> str | None:
        """The address a token was sent to, if it is unused and unexpired; it is used now."""
        now = self.clock()
        email: str | None = await self.pool.fetchval(
            "UPDATE portal_sign_ins SET used_at = $2 WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2"
            " RETURNING email",
            hash_key(token),
            now,
        )
        return email

    async def open_session(self, user_id: str, user_agent: str, client: str) -> Session:
        """A new session for ``user_id``, valid for :data:`SESSION_LIFETIME`."""
        session = Session("ses_" + uuid.uuid4().hex[:20], user_id, new_secret())
        now = self.clock()
        await self.pool.execute(
            "INSERT INTO portal_sessions (id, secret_hash, user_id, user_agent, client, created_at, last_seen_at, expires_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $6, $7)",
            session.id,
            hash_key(session.secret),
            user_id,
            user_agent[:200],
            client,
            now,
            now + SESSION_LIFETIME,
        )
        return session

    async def session(self, secret: str) -> Session | None:
        """The live session whose cookie is ``secret`` (and note that it was seen now)."""
        row = await self.pool.fetchrow(
            "UPDATE portal_sessions SET last_seen_at = $2 WHERE secret_hash = $1 AND revoked_at IS NULL AND expires_at > $2"
            " RETURNING id, user_id",
            hash_key(secret),
            self.clock(),
        )
        return Session(row["id"], row["user_id"], secret) if row else None

    async def email_of(self, user_id: str) -> str | None:
        """The address of the user ``user_id``."""
        email: str | None = await self.pool.fetchval("SELECT email FROM users WHERE id = $1", user_id)
        return email

    async def stripe_call_allowed(self, user_id: str) -> bool:
        """Whether ``user_id`` may make another Stripe-backed call now; if so it is counted.
        Their calls older than the window go."""
        now = self.clock()
        since = now - self.limits.stripe_window
        async with self.pool.acquire() as conn, conn.transaction():
            await _lock(conn, f"portal-stripe:{user_id}")
            await conn.execute("DELETE FROM portal_stripe_calls WHERE user_id = $1 AND created_at <= $2", user_id, since)
            made = await conn.fetchval("SELECT count(*) FROM portal_stripe_calls WHERE user_id = $1", user_id)
            if made >= self.limits.stripe_per_user:
                return False
            await conn.execute("INSERT INTO portal_stripe_calls (user_id, created_at) VALUES ($1, $2)", user_id, now)
        return True

    async def sessions(self, user_id: str) -> list[dict[str, Any]]:
        """The user's live sessions, newest first."""
        rows = await self.pool.fetch(
            "SELECT id, user_agent, client, created_at, last_seen_at FROM portal_sessions"
            " WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2 ORDER BY created_at DESC",
            user_id,
            self.clock(),
        )
        return [dict(r) for r in rows]

    async def revoke(self, user_id: str, session_id: str) -> bool:
        """End one of the user's sessions; False if they have no such live session."""
        done = await self.pool.fetchval(
            "UPDATE portal_sessions SET revoked_at = $3 WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL RETURNING true",
            session_id,
            user_id,
            self.clock(),
        )
        return bool(done)
