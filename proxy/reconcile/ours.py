"""Our side of a reconciliation: the usage log (``usage_events``) per UTC day and model."""

from __future__ import annotations

from datetime import date, timedelta

import asyncpg

from .compare import Books, Figures
from .pages import midnight

# sum(bigint) is numeric in Postgres: cast back so every figure arrives as an int
_SQL = """
SELECT (created_at AT TIME ZONE 'UTC')::date AS day, model, count(*) AS requests,
       sum(input_tokens)::bigint AS input_tokens, sum(cached_input_tokens)::bigint AS cached_input_tokens,
       sum(cache_write_tokens)::bigint AS cache_write_tokens, sum(output_tokens)::bigint AS output_tokens,
       sum(cost_micro)::bigint AS cost_micro
FROM usage_events
WHERE provider = $1 AND created_at >= $2 AND created_at < $3
GROUP BY 1, 2
"""


async def our_books(pool: asyncpg.Pool, provider: str, start: date, end: date) -> Books:
    """Requests, tokens by kind and cost in µ$ the gateway charged for ``provider``, days ``start``..``end``."""
    books = Books()
    for row in await pool.fetch(_SQL, provider, midnight(start), midnight(end + timedelta(days=1))):
        figures = Figures(
            requests=row["requests"],
            input_tokens=row["input_tokens"],
            cached_input_tokens=row["cached_input_tokens"],
            cache_write_tokens=row["cache_write_tokens"],
            output_tokens=row["output_tokens"],
        )
        books.add_usage(row["day"], row["model"], figures)
        books.add_cost(row["day"], row["model"], row["cost_micro"])
    return books
