"""Business gauges for Prometheus (the margin alert): this month's figures, refreshed by a loop.

Run :func:`export_margin` in one process that serves ``/metrics`` (the worker): every
``every`` seconds it computes this month's figures and sets the gauges below.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from decimal import Decimal

import asyncpg
from prometheus_client import Gauge

from ..db import POSTGRES_UNAVAILABLE
from ..tiers import TiersFile
from . import figures, periods

log = logging.getLogger("costproxy.admin")

MARGIN = Gauge(
    "costproxy_margin_ratio",
    "This month's actual margin: (net revenue − API cost) / net revenue; NaN while there is no revenue.",
)
MARGIN_TARGET = Gauge("costproxy_margin_target_ratio", "The margin the tiers are priced for (0.80 by default).")
NET_REVENUE = Gauge("costproxy_net_revenue_micro_usd", "This month's revenue net of Stripe fees, refunds and disputes, µ$.")
API_COST = Gauge("costproxy_month_api_cost_micro_usd", "This month's upstream API cost, µ$.")


async def refresh(pool: asyncpg.Pool, tiers: TiersFile) -> dict[str, object]:
    """Compute this month's figures once and set the gauges; returns the figures."""
    async with pool.acquire() as conn:
        month = await figures.compute(conn, periods.month_of(periods.utc_today()), tiers)
    pct = month["margin"]["pct"]
    MARGIN.set(float(Decimal(pct) / 100) if pct is not None else float("nan"))
    MARGIN_TARGET.set(float(figures.TARGET_MARGIN_PCT / 100))
    NET_REVENUE.set(month["margin_model"]["net_revenue_micro"])
    API_COST.set(month["api_cost"]["micro"])
    return month


async def export_margin(pool: asyncpg.Pool, tiers: Callable[[], TiersFile], stop: asyncio.Event, every: float = 60.0) -> None:
    """Refresh the gauges every ``every`` seconds until ``stop`` is set (errors are logged)."""
    while not stop.is_set():
        try:
            await refresh(pool, tiers())
        except POSTGRES_UNAVAILABLE as exc:
            log.warning("business gauges not refreshed: %s", exc)
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass
