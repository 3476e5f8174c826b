"""The worker's reconciliation of settled days: for every provider with an admin key, each UTC
day of the last ``LOOKBACK_DAYS`` settled ones that it has not stored yet, stored and exported
as ``costproxy_reconcile_difference_ratio{provider,kind}``.

Providers finalise a day's report about a day later, so a day is compared only once it is
settled: ``RECONCILE_SETTLE_HOURS`` (24 by default) after its end. A day the worker stored is
not run again; one whose run failed (a report could not be read) stores nothing and is retried
every round while it is within the lookback. ``costproxy reconcile`` runs are stored too but do
not count as the worker's: one may have compared the day before it settled. Of several workers,
one runs a provider at a time (a Postgres advisory lock per provider).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import asyncpg

from .. import metrics
from ..db import POSTGRES_UNAVAILABLE
from ..pricing import PriceBook
from ..settings import Settings
from .access import ReportAccess, ReportProvider, report_access
from .pages import ReportError
from .providers import reconcile_provider
from .report import Reconciliation
from .store import RanBy, Ratios, has_result, store, worker_runs

log = logging.getLogger("costproxy.reconcile")
#: Postgres being away or refusing: the round is retried later, the worker goes on
_POSTGRES = POSTGRES_UNAVAILABLE

#: how many of the newest settled days the worker looks back over for one not stored yet
LOOKBACK_DAYS = 7


def export_ratios(provider: str, ratios: Ratios) -> None:
    """Set the gauge of each kind; a figure the provider does not have at all is +Inf."""
    for kind, share in ratios.items():
        metrics.RECONCILE_RATIO.labels(provider=provider, kind=kind).set(math.inf if share is None else float(share))


async def reconcile_day(access: ReportAccess, pool: asyncpg.Pool, day: date, settings: Settings) -> Reconciliation:
    """Reconcile ``day`` with ``access.provider``'s reports, store the result and export its ratios."""
    result = await reconcile_provider(access, pool, day, day)
    export_ratios(result.source, await store(pool, result, settings.reconcile_tolerance, RanBy.WORKER))
    metrics.RECONCILE_LAST_RUN.labels(provider=result.source).set_to_current_time()
    if result.exceeds(settings.reconcile_tolerance):
        log.error("%s", result.render())
    else:
        log.info("%s %s: %d rows agree within %s", result.source, day, result.rows, settings.reconcile_tolerance)
    return result


def settled_days(now: datetime, settle: timedelta, lookback: int = LOOKBACK_DAYS) -> list[date]:
    """The ``lookback`` newest UTC days that ended at least ``settle`` before ``now``, oldest first.

    Day D is settled once ``now >= D + 1 day (its end, 00:00 UTC) + settle``.
    """
    newest = (now - settle).astimezone(UTC).date() - timedelta(days=1)
    return [newest - timedelta(days=back) for back in reversed(range(lookback))]


async def _reconcile_due(access: ReportAccess, pool: asyncpg.Pool, days: list[date], settings: Settings) -> None:
    """Reconcile each of ``days`` (oldest first) that the worker has not stored, unless another
    worker is reconciling this provider now. A day that fails is logged and left for the next round."""
    lock = f"costproxy:reconcile:{access.provider}"
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", lock):
            return
        try:
            for day in days:
                if await has_result(pool, access.provider.value, day):
                    continue
                try:
                    await reconcile_day(access, pool, day, settings)
                except (ReportError, *_POSTGRES) as exc:
                    log.warning("reconciliation of %s for %s failed, retried next round: %s", access.provider, day, exc)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", lock)


def _utcnow() -> datetime:
    return datetime.now(UTC)


async def run_daily(
    settings: Settings,
    pool: asyncpg.Pool,
    prices: Callable[[], PriceBook],
    stop: asyncio.Event,
    every: float = 3600.0,
    now: Callable[[], datetime] = _utcnow,
    lookback: int = LOOKBACK_DAYS,
) -> None:
    """Until ``stop``: every ``every`` seconds, for each provider with an admin key, reconcile each
    of the ``lookback`` newest settled days (``RECONCILE_SETTLE_HOURS`` after their end) that the
    worker has not stored. Returns at once when no admin key is set."""
    if not any(report_access(settings, prices(), provider) for provider in ReportProvider):
        return
    metrics.RECONCILE_TOLERANCE.set(float(settings.reconcile_tolerance))
    try:
        for source, (ran_at, ratios) in (await worker_runs(pool)).items():
            if source in {provider.value for provider in ReportProvider}:
                export_ratios(source, ratios)
                metrics.RECONCILE_LAST_RUN.labels(provider=source).set(ran_at.timestamp())
    except _POSTGRES as exc:
        log.warning("could not read the last reconciliations: %s", exc)
    settle = timedelta(hours=settings.reconcile_settle_hours)
    while not stop.is_set():
        days = settled_days(now(), settle, lookback)
        for provider in ReportProvider:
            access = report_access(settings, prices(), provider)
            if access is None:
                continue
            try:
                await _reconcile_due(access, pool, days, settings)
            except _POSTGRES as exc:
                log.warning("reconciliation of %s failed, retrying in %.0f s: %s", provider, every, exc)
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass
