"""The admin side of the tests: the admin token and its header, rows written straight into
Postgres for figures worked out by hand, and a recorder of the queries a report runs."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg

from proxy.rollup import write_usage

#: the ``ADMIN_TOKEN`` of proxies started with ``start_proxy(admin_token=ADMIN_TOKEN)``
ADMIN_TOKEN = "adm-" + uuid.uuid4().hex


def bearer(token: str = ADMIN_TOKEN) -> dict[str, str]:
    """The ``Authorization`` header carrying ``token``."""
    return {"Authorization": f"Bearer {token}"}


# rows written directly ---------------------------------------------------------------------
async def user(conn: asyncpg.Connection, user_id: str, tier: str, at: datetime, email: str | None = None) -> None:
    """A user and its signup tier change at ``at``."""
    await conn.execute(
        "INSERT INTO users (id, email, tier, created_at) VALUES ($1, $2, $3, $4)",
        user_id,
        email or f"{user_id}@example.com",
        tier,
        at,
    )
    await tier_change(conn, user_id, None, tier, "signup", at)


async def tier_change(conn: asyncpg.Connection, user_id: str, old: str | None, new: str, kind: str, at: datetime) -> None:
    """A tier change; the user's current tier follows it."""
    await conn.execute(
        "INSERT INTO tier_changes (user_id, from_tier, to_tier, kind, source, changed_at) VALUES ($1, $2, $3, $4, 'test', $5)",
        user_id,
        old,
        new,
        kind,
        at,
    )
    await conn.execute("UPDATE users SET tier = $2 WHERE id = $1", user_id, new)


async def invoice(
    conn: asyncpg.Connection,
    invoice_id: str,
    user_id: str,
    tier: str,
    reason: str,
    paid: int,
    fee: int,
    at: datetime,
    refunded: int = 0,
    disputed: int = 0,
) -> None:
    """A paid invoice (amounts in cents)."""
    await conn.execute(
        "INSERT INTO invoices (id, user_id, billing_reason, tier, currency, amount_paid, stripe_fee, refunded, disputed, paid_at)"
        " VALUES ($1, $2, $3, $4, 'usd', $5, $6, $7, $8, $9)",
        invoice_id,
        user_id,
        reason,
        tier,
        paid,
        fee,
        refunded,
        disputed,
        at,
    )


async def ledger(
    conn: asyncpg.Connection, entry_id: str, user_id: str, kind: str, amount: int, balance: int, at: datetime
) -> None:
    """One ledger entry (µ$)."""
    await conn.execute(
        "INSERT INTO ledger (id, user_id, kind, amount_micro, balance_micro, reason, created_at)"
        " VALUES ($1, $2, $3, $4, $5, 'test', $6)",
        entry_id,
        user_id,
        kind,
        amount,
        balance,
        at,
    )


async def usage(
    conn: asyncpg.Connection,
    user_id: str,
    tier: str,
    provider: str,
    model: str,
    at: datetime,
    *,
    uncached: int = 0,
    cached: int = 0,
    cache_write: int = 0,
    output: int = 0,
    cost: int,
    key_id: str | None = None,
) -> str:
    """One charged request: its ledger charge and its usage row, through the rollup writer."""
    # a settlement's id, chg_<request id>: a hold id made when the request was admitted
    event_id = f"chg_hold_{int(at.timestamp() * 1000):011x}_{uuid.uuid4().hex[:24]}"
    await ledger(conn, event_id, user_id, "charge", -cost, 0, at)
    await write_usage(
        conn,
        [
            (
                event_id,
                user_id,
                key_id or f"key_{user_id}",
                provider,
                model,
                tier,
                uncached,
                cached,
                cache_write,
                output,
                0,
                cost,
                False,
                False,
                200,
                100,
                at,
                0,
                None,
                None,
            )
        ],
    )
    return event_id


class Recorder:
    """Stands in for an asyncpg connection or pool and remembers every query it runs."""

    def __init__(self, db: Any):
        self.db = db
        self.queries: list[tuple[str, tuple[Any, ...]]] = []

    def _run(self, method: str) -> Callable[..., Awaitable[Any]]:
        async def call(sql: str, *args: Any) -> Any:
            self.queries.append((sql, args))
            return await getattr(self.db, method)(sql, *args)

        return call

    def __getattr__(self, name: str) -> Any:
        if name in ("fetch", "fetchrow", "fetchval", "execute"):
            return self._run(name)
        return getattr(self.db, name)
