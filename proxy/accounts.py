"""Users, keys and credit grants: the service layer the CLI (and admin API) call.

Postgres records users and keys; Redis holds the live balance (via :class:`Ledger`) and
the key mirror the proxy reads.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from .config import Config
from .db import Connection
from .keys import KeyMirror, generate_key, hash_key
from .ledger import Account, AccountStatus, Cycle, EntryKind, Ledger, NoAccountError, now_ms
from .money import MICRO_PER_CREDIT
from .tiers import TierChange

#: live (unrevoked) keys one user may hold; a rotation's replacement does not count against it
MAX_LIVE_KEYS = 50


class AccountError(Exception):
    """A request the service cannot honour; ``status`` is the HTTP status it answers with."""

    status = 400


class NotFoundError(AccountError):
    """No such user or key."""

    status = 404


class NoLiveAccountError(AccountError):
    """The user exists but Redis holds no account for them (lost with Redis's data)."""

    status = 409

    def __init__(self, user_id: str):
        super().__init__(
            f"user {user_id!r} has no account in Redis (was Redis's data lost?): "
            f"`costproxy ledger rebuild --user {user_id}` restores it from the Postgres ledger"
        )


class ConflictError(AccountError):
    """The request contradicts what exists (an email taken, a key already revoked)."""

    status = 409


@dataclass(frozen=True)
class NewKey:
    """A key just issued: ``api_key`` is shown once and never stored."""

    key_id: str
    api_key: str


@dataclass(frozen=True)
class Statement:
    """A user, their live account in Redis (None if Redis has none), the sum of their
    Postgres ledger and its latest entries."""

    user: dict[str, Any]
    account: Account | None
    ledger_sum_micro: int
    ledger: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "account": self.account.as_json() if self.account else None,
            "ledger_sum_micro": self.ledger_sum_micro,
            "ledger": self.ledger,
        }


class Accounts:
    """Creates users and keys and moves credits outside requests."""

    def __init__(self, pool: asyncpg.Pool, ledger: Ledger, mirror: KeyMirror, config: Config):
        self.pool = pool
        self.ledger = ledger
        self.mirror = mirror
        self.config = config

    async def create_user(self, email: str, tier: str, source: str = "cli") -> tuple[str, NewKey]:
        """Create a user on ``tier``, open the first cycle with its allowance, issue a key;
        all of it or nothing (the Redis account and key are written inside the Postgres
        transaction, which a Redis failure rolls back), so a failed call is safe to retry.
        An address already taken, whatever its case, is a ConflictError."""
        tiers = self.config.tiers
        if tier not in tiers.tiers:
            raise AccountError(f"unknown tier {tier!r}; tiers are {', '.join(tiers.tiers)}")
        user_id = "usr_" + uuid.uuid4().hex[:20]
        start = now_ms()
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute("INSERT INTO users (id, email, tier) VALUES ($1, $2, $3)", user_id, email, tier)
                await record_tier_change(conn, user_id, None, tier, TierChange.SIGNUP, source)
                key = await self._issue_key(conn, user_id, "")
                await self.ledger.open_account(
                    user_id,
                    tier=tier,
                    allowance=tiers.tiers[tier].allowance_micro,
                    cycle=Cycle(start, tiers.cycle_end(start), auto_renew=True),
                )
        except asyncpg.UniqueViolationError:
            raise ConflictError(f"a user with email {email!r} (in any case) already exists") from None
        return user_id, key

    async def _require_user(self, user_id: str) -> asyncpg.Record:
        row = await self.pool.fetchrow("SELECT * FROM users WHERE id = $1 OR lower(email) = lower($1)", user_id)
        if row is None:
            raise NotFoundError(f"no user {user_id!r}")
        return row

    async def user_for_email(self, email: str) -> str | None:
        """The id of the user with address ``email`` (case ignored), if there is one."""
        found: str | None = await self.pool.fetchval("SELECT id FROM users WHERE lower(email) = lower($1)", email)
        return found

    async def create_key(self, user_id: str, name: str = "") -> NewKey:
        """Issue a key for a user; the key itself is returned here and never again. A user
        holding :data:`MAX_LIVE_KEYS` live keys already is a ConflictError."""
        user = await self._require_user(user_id)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user["id"])  # one count at a time
            live = await conn.fetchval(
                "SELECT count(*) FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL"
                " AND (revoke_after IS NULL OR revoke_after > now())",
                user["id"],
            )
            if live >= MAX_LIVE_KEYS:
                raise ConflictError(f"user {user['id']!r} has {live} live keys, the most allowed: revoke one first")
            return await self._issue_key(conn, user["id"], name)

    async def _issue_key(self, conn: Connection, user_id: str, name: str) -> NewKey:
        """Record a new key in the caller's transaction and mirror it to Redis before it commits."""
        key = generate_key()
        key_id = "key_" + uuid.uuid4().hex[:20]
        digest = hash_key(key)
        await conn.execute(
            "INSERT INTO api_keys (id, user_id, name, key_hash, key_prefix) VALUES ($1, $2, $3, $4, $5)",
            key_id,
            user_id,
            name,
            digest,
            key[:10],
        )
        await self.mirror.put(digest, user_id, key_id)
        return NewKey(key_id=key_id, api_key=key)

    async def list_keys(self, user_id: str | None = None) -> list[dict[str, Any]]:
        """Keys (never their secrets), newest first; all users' when ``user_id`` is None."""
        if user_id is not None:
            user_id = (await self._require_user(user_id))["id"]
        rows = await self.pool.fetch(
            "SELECT id, user_id, name, key_prefix, created_at, revoked_at, revoke_after FROM api_keys"
            " WHERE $1::text IS NULL OR user_id = $1 ORDER BY created_at DESC",
            user_id,
        )
        return [dict(r) for r in rows]

    async def revoke_key(self, key_id: str, owner: str | None = None) -> None:
        """Revoke a key (only if it belongs to ``owner``, when given): it stops working on
        every proxy within ``KEY_CACHE_SECONDS``."""
        row = await self.pool.fetchrow(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())"
            " WHERE id = $1 AND ($2::text IS NULL OR user_id = $2) RETURNING key_hash",
            key_id,
            owner,
        )
        if row is None:
            raise NotFoundError(f"no key {key_id!r}")
        await self.mirror.remove(row["key_hash"])

    async def grant(self, user_id: str, credits: int, reason: str, kind: EntryKind = EntryKind.GRANT) -> int:
        """Add ``credits`` (negative to remove) as a ledger entry of ``kind`` (grant, refund);
        returns the new balance in µ$."""
        user = await self._require_user(user_id)
        try:
            balance = await self.ledger.credit(user["id"], amount=credits * MICRO_PER_CREDIT, kind=kind, reason=reason)
        except NoAccountError:
            raise NoLiveAccountError(user["id"]) from None
        assert balance is not None  # a fresh event id is never a duplicate
        return balance

    async def set_status(self, user_id: str, status: AccountStatus) -> None:
        """Suspend or reactivate a user; takes effect on the next request."""
        user = await self._require_user(user_id)
        try:
            await self.ledger.set_status(user["id"], status)
        except NoAccountError:
            raise NoLiveAccountError(user["id"]) from None
        await self.pool.execute("UPDATE users SET status = $2 WHERE id = $1", user["id"], status.value)

    async def change_tier(
        self, user_id: str, tier: str, source: str, grant_micro: int = 0, event_id: str | None = None
    ) -> int | None:
        """Move a user to ``tier`` now, adding ``grant_micro`` (e.g. a prorated allowance
        difference) in the same ledger entry; once per ``event_id``. The new balance, or None
        if ``event_id`` was already applied."""
        tiers = self.config.tiers.tiers
        if tier not in tiers:
            raise AccountError(f"unknown tier {tier!r}; tiers are {', '.join(tiers)}")
        user = await self._require_user(user_id)
        try:
            balance = await self.ledger.credit(
                user["id"],
                amount=grant_micro,
                kind=EntryKind.GRANT,
                reason=f"tier {user['tier']} -> {tier}",
                event_id=event_id,
                tier=tier,
            )
        except NoAccountError:
            raise NoLiveAccountError(user["id"]) from None
        if balance is not None and tier != user["tier"]:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute("UPDATE users SET tier = $2 WHERE id = $1", user["id"], tier)
                kind = self.config.tiers.change(user["tier"], tier)
                await record_tier_change(conn, user["id"], user["tier"], tier, kind, source)
        return balance

    async def show(self, user_id: str, ledger_rows: int = 50) -> Statement:
        """The user, the live Redis account and the latest Postgres ledger entries."""
        user = await self._require_user(user_id)
        account = await self.ledger.account(user["id"])
        rows = await self.pool.fetch(
            "SELECT id, kind, amount_micro, balance_micro, reason, created_at FROM ledger"
            " WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
            user["id"],
            ledger_rows,
        )
        total = await self.pool.fetchval("SELECT coalesce(sum(amount_micro), 0) FROM ledger WHERE user_id = $1", user["id"])
        return Statement(dict(user), account, int(total), [dict(r) for r in rows])

    # admin additions ------------------------------------------------------------------
    async def list_users(self, search: str = "", limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        """Users newest first; with ``search``, those whose id is it or whose email contains it."""
        rows = await self.pool.fetch(
            "SELECT id, email, tier, status, created_at FROM users"
            " WHERE $1 = '' OR id = $1 OR strpos(lower(email), lower($1)) > 0"
            " ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3",
            search,
            limit,
            offset,
        )
        return [dict(r) for r in rows]

    async def rotate_key(self, key_id: str, overlap_seconds: int) -> NewKey:
        """Issue a replacement for ``key_id`` (same user and name). The old key keeps working
        for ``overlap_seconds`` (0: revoked now): its Redis mirror entry expires then, and
        :meth:`revoke_due_keys` records the revocation in Postgres."""
        if overlap_seconds < 0:
            raise AccountError("overlap_seconds must not be negative")
        old = await self.pool.fetchrow(
            "SELECT user_id, name, key_hash, revoked_at, revoke_after FROM api_keys WHERE id = $1", key_id
        )
        if old is None:
            raise NotFoundError(f"no key {key_id!r}")
        if old["revoked_at"] is not None or old["revoke_after"] is not None:
            raise ConflictError(f"key {key_id!r} is already revoked or being rotated")
        async with self.pool.acquire() as conn, conn.transaction():
            new = await self._issue_key(conn, old["user_id"], old["name"])
        if overlap_seconds == 0:
            await self.revoke_key(key_id)
        else:
            await self.pool.execute(
                "UPDATE api_keys SET revoke_after = now() + make_interval(secs => $2) WHERE id = $1", key_id, overlap_seconds
            )
            await self.mirror.expire(old["key_hash"], overlap_seconds * 1000)
        return new

    async def revoke_due_keys(self) -> int:
        """Revoke every key whose rotation overlap has ended; returns how many."""
        rows = await self.pool.fetch(
            "UPDATE api_keys SET revoked_at = revoke_after WHERE revoked_at IS NULL AND revoke_after <= now() RETURNING key_hash"
        )
        await self.mirror.remove(*(row["key_hash"] for row in rows))
        return len(rows)


async def sync_key_mirror(pool: asyncpg.Pool, mirror: KeyMirror) -> int:
    """Rewrite the Redis key mirror from Postgres (e.g. after a Redis loss, or a revocation
    whose Redis step failed); returns keys written."""
    revoked = await pool.fetch("SELECT key_hash FROM api_keys WHERE revoked_at IS NOT NULL OR revoke_after <= now()")
    for start in range(0, len(revoked), 1000):
        await mirror.remove(*(row["key_hash"] for row in revoked[start : start + 1000]))
    rows = await pool.fetch(
        "SELECT id, user_id, key_hash, revoke_after - now() AS remaining FROM api_keys"
        " WHERE revoked_at IS NULL AND (revoke_after IS NULL OR revoke_after > now())"
    )
    for row in rows:
        await mirror.put(row["key_hash"], row["user_id"], row["id"])
        if row["remaining"] is not None:  # a rotated key in its overlap window
            await mirror.expire(row["key_hash"], int(row["remaining"].total_seconds() * 1000))
    return len(rows)


async def record_tier_change(
    conn: Connection, user_id: str, from_tier: str | None, to_tier: str, kind: TierChange, source: str
) -> None:
    """Log a signup, upgrade, downgrade, cancellation or lapse for the business figures."""
    await conn.execute(
        "INSERT INTO tier_changes (user_id, from_tier, to_tier, kind, source) VALUES ($1, $2, $3, $4, $5)",
        user_id,
        from_tier,
        to_tier,
        kind.value,
        source,
    )
