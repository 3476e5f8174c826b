"""``usage_daily``: the per-day rollup of ``usage_events`` that the figures and usage queries read.

Two ways to keep it right:

* :func:`write_usage` inserts a batch of usage rows and adds exactly the rows that were
  new (a replayed event is skipped by ``ON CONFLICT DO NOTHING`` and so is not counted
  twice) to the rollup, in one statement: call it inside the usage writer's transaction.
* :func:`refresh_rollup` rebuilds the rollup from ``usage_events`` for the days from
  ``since`` on (a backfill, or a repair after rows were written some other way).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, time
from typing import Any

from .db import Connection

USAGE_COLUMNS = (
    "id",
    "user_id",
    "key_id",
    "provider",
    "model",
    "tier",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_micro",
    "estimated",
    "stream",
    "status",
    "latency_ms",
    "created_at",
    "cache_write_1h_tokens",
    "service_tier",
    "price_version",
)
_TYPES = ("text",) * 6 + ("bigint",) * 6 + ("boolean",) * 2 + ("integer",) * 2 + ("timestamptz", "bigint", "text", "text")

_ADD_TO_ROLLUP = """
INSERT INTO usage_daily AS d (day, user_id, key_id, provider, model, tier, requests, input_tokens,
    cached_input_tokens, output_tokens, cost_micro)
SELECT (created_at AT TIME ZONE 'UTC')::date, user_id, key_id, provider, model, tier, count(*),
       sum(input_tokens + cached_input_tokens + cache_write_tokens), sum(cached_input_tokens),
       sum(output_tokens), sum(cost_micro)
FROM {source} GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
"""
_ON_CONFLICT_ADD = """
ON CONFLICT (day, user_id, key_id, provider, model, tier) DO UPDATE SET
    requests = d.requests + excluded.requests,
    input_tokens = d.input_tokens + excluded.input_tokens,
    cached_input_tokens = d.cached_input_tokens + excluded.cached_input_tokens,
    output_tokens = d.output_tokens + excluded.output_tokens,
    cost_micro = d.cost_micro + excluded.cost_micro
"""
WRITE_USAGE_SQL = (
    "WITH inserted AS (\n"
    f"    INSERT INTO usage_events ({', '.join(USAGE_COLUMNS)})\n"
    f"    SELECT * FROM unnest({', '.join(f'${n}::{t}[]' for n, t in enumerate(_TYPES, 1))})\n"
    "    ON CONFLICT (id) DO NOTHING RETURNING *\n"
    ")" + _ADD_TO_ROLLUP.format(source="inserted") + _ON_CONFLICT_ADD
)
_REBUILD_SQL = _ADD_TO_ROLLUP.format(source="usage_events WHERE created_at >= $1")


async def write_usage(conn: Connection, rows: Sequence[Sequence[Any]]) -> None:
    """Insert usage rows (tuples in :data:`USAGE_COLUMNS` order) and add the new ones to the
    rollup, in one statement; run it in the same transaction as their ledger rows."""
    if rows:
        await conn.execute(WRITE_USAGE_SQL, *(list(column) for column in zip(*rows, strict=True)))


async def refresh_rollup(conn: Connection, since: date) -> int:
    """Recompute ``usage_daily`` from ``usage_events`` for every UTC day from ``since`` on;
    returns the rollup rows written. Concurrent writers wait for it (table lock)."""
    async with conn.transaction():
        await conn.execute("LOCK TABLE usage_daily IN SHARE ROW EXCLUSIVE MODE")
        await conn.execute("DELETE FROM usage_daily WHERE day >= $1", since)
        status = await conn.execute(_REBUILD_SQL, datetime.combine(since, time(), tzinfo=UTC))
    return int(status.rsplit(" ", 1)[1])
