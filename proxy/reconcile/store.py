"""Reconciliation results in Postgres (``reconcile_runs``): the worker's runs of settled days and
``costproxy reconcile``'s runs; the last of each source for the dashboard."""

from __future__ import annotations

import json
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

import asyncpg

from ..money import round_half_up
from .report import Reconciliation

#: the largest share of each kind, as a decimal string; None: a figure the source does not have
Ratios = dict[str, str | None]


class RanBy(StrEnum):
    """Who stored a run (``reconcile_runs.ran_by``)."""

    WORKER = "worker"  # one settled day of one provider
    CLI = "cli"  # costproxy reconcile: any source, any range of days


def ratios_of(result: Reconciliation) -> Ratios:
    """The largest share of each kind compared, six decimals."""
    return {kind: None if share is None else str(round_half_up(share, 6)) for kind, share in result.largest_shares().items()}


async def store(pool: asyncpg.Pool, result: Reconciliation, tolerance: Decimal, ran_by: RanBy = RanBy.WORKER) -> Ratios:
    """Keep ``result`` judged by ``tolerance``, run by ``ran_by``; returns its ratios."""
    ratios = ratios_of(result)
    await pool.execute(
        "INSERT INTO reconcile_runs (source, ran_by, period_start, period_end, tolerance, exceeds, ratios, report)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb)",
        result.source,
        str(ran_by),
        result.start,
        result.end,
        tolerance,
        result.exceeds(tolerance),
        json.dumps(ratios),
        json.dumps(result.to_json()),
    )
    return ratios


async def has_result(pool: asyncpg.Pool, source: str, day: date) -> bool:
    """Whether the worker stored a run of ``source`` for exactly ``day``. A ``costproxy reconcile``
    run does not count, even of that one day: it may have compared the day before it settled."""
    found: bool = await pool.fetchval(
        "SELECT EXISTS (SELECT 1 FROM reconcile_runs"
        " WHERE source = $1 AND ran_by = $2 AND period_start = $3 AND period_end = $3)",
        source,
        str(RanBy.WORKER),
        day,
    )
    return found


async def worker_runs(pool: asyncpg.Pool) -> dict[str, tuple[datetime, Ratios]]:
    """When the worker last stored a run of each source, and its ratios (what its gauges showed)."""
    rows = await pool.fetch(
        "SELECT DISTINCT ON (source) source, ran_at, ratios FROM reconcile_runs WHERE ran_by = $1"
        " ORDER BY source, ran_at DESC, id DESC",
        str(RanBy.WORKER),
    )
    return {row["source"]: (row["ran_at"], json.loads(row["ratios"])) for row in rows}


async def latest_results(pool: asyncpg.Pool) -> dict[str, dict[str, Any]]:
    """The last stored result of each source, whether the worker or ``costproxy reconcile`` ran
    it, JSON-ready, for the admin dashboard::

    {"openai": {"ran_at": "2026-12-04T00:05:00+00:00", "tolerance": "0.01", "exceeds": false,
                "ratios": {"requests": "0.000000", ...}, "source": "openai", "from": "2026-12-03",
                "to": "2026-12-03", "rows": 4, "kinds": [...], "notes": [...], "differences": [...]}}
    """
    rows = await pool.fetch(
        "SELECT DISTINCT ON (source) source, ran_at, tolerance, exceeds, ratios, report"
        " FROM reconcile_runs ORDER BY source, ran_at DESC, id DESC"
    )
    return {
        row["source"]: {
            "ran_at": row["ran_at"].isoformat(),
            "tolerance": str(row["tolerance"]),
            "exceeds": row["exceeds"],
            "ratios": json.loads(row["ratios"]),
            **json.loads(row["report"]),
        }
        for row in rows
    }
