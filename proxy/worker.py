"""The worker process: usage log to Postgres, expired holds posted, key mirror kept, portal tables pruned, providers
reconciled daily."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import asyncpg
from aiohttp import web
from redis.exceptions import RedisError

from . import metrics
from .accounts import Accounts, sync_key_mirror
from .config import ConfigStore
from .db import POSTGRES_UNAVAILABLE, connect_pool
from .keys import KeyMirror
from .ledger import Ledger, NoAccountError, now_ms
from .mail import Mailer
from .notices import UsageWarnings
from .portal.store import prune as prune_portal
from .probes import add_probes
from .reconcile.daily import run_daily
from .recovery import check
from .redis_url import parse_redis_url
from .redis_url import redis_client as connect_redis
from .reports.gauges import export_margin
from .resources import running
from .settings import Settings
from .usage import UsageLog

log = logging.getLogger("costproxy.worker")


async def expire_holds(ledger: Ledger) -> int:
    """Post every hold whose proxy stopped renewing it (it crashed or lost Redis for longer
    than ``HOLD_TTL_SECONDS``) at its last recorded progress; returns how many."""
    expired = 0
    for holds_key in ledger.keys.holds_sets():
        for hold in await ledger.expired_holds(holds_key, now_ms()):
            try:
                result = await ledger.expire(hold)
            except NoAccountError:
                log.warning("dropped expired hold %s: account %s no longer exists", hold.id, hold.account)
                continue
            if result is not None:
                expired += 1
                metrics.HOLDS_EXPIRED.labels(outcome="posted" if result.posted else "voided").inc()
    return expired


async def _sweep(ledger: Ledger, accounts: Accounts, stop: asyncio.Event, every: float) -> None:
    """Post expired holds and revoke rotated keys whose overlap ended, every few seconds,
    and delete the portal's rows past their use (links, sessions, Stripe-call counts)."""
    while not stop.is_set():
        try:
            count = await expire_holds(ledger)
            if count:
                log.info("posted %d expired holds at their last recorded progress", count)
            await accounts.revoke_due_keys()
            await prune_portal(accounts.pool)
        except (RedisError, *POSTGRES_UNAVAILABLE) as exc:
            log.warning("sweep failed, retrying in %.0f s: %s", every, exc)
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


async def _check_ledger(ledger: Ledger, pool: asyncpg.Pool, stop: asyncio.Event, every: float) -> None:
    """Run ``costproxy ledger check`` every ``every`` seconds (0: never) and export its result."""
    if every <= 0:
        return
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
            return
        except TimeoutError:
            pass
        try:
            report = await check(ledger, pool, wait=min(60.0, every))
        except (RedisError, *POSTGRES_UNAVAILABLE) as exc:
            log.warning("scheduled ledger check failed, retrying in %.0f s: %s", every, exc)
            continue
        metrics.LEDGER_CHECK_DIFFERENCES.set(len(report.differences))
        metrics.LEDGER_CHECK_ACCOUNTS.set(report.accounts)
        metrics.LEDGER_CHECK_TIME.set(time.time())
        for difference in report.differences:
            log.error("ledger check: %s", difference.line())


async def run_worker(settings: Settings, redis_url: str, database_url: str, port: int) -> None:
    """Run until SIGTERM or SIGINT; serves ``/healthz``, ``/readyz`` and ``/metrics`` on
    ``port``. A stop lets the usage log finish the batch it is writing: only what reached
    Postgres is acknowledged, the rest is read again by the next worker."""
    redis = connect_redis(parse_redis_url(redis_url))
    pool = await connect_pool(database_url)
    ledger = Ledger(redis, settings.redis_prefix)
    mirror = KeyMirror(redis, settings.redis_prefix)
    config = ConfigStore(settings.pricing_file, settings.tiers_file)
    accounts = Accounts(pool, ledger, mirror, config.current)
    await accounts.revoke_due_keys()
    synced = await sync_key_mirror(pool, mirror)
    log.info("key mirror holds %d active keys", synced)
    app = web.Application()
    add_probes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, config.reload))
    try:
        warnings = UsageWarnings(Mailer(settings.smtp_url, settings.mail_from))
        claim_idle_ms = int(settings.worker_claim_idle_seconds * 1000)
        usage_log = UsageLog(redis, ledger, pool, settings.worker_batch, warnings, claim_idle_ms)
        async with running(config.watch(settings.config_reload_seconds)):
            await asyncio.gather(
                usage_log.run(stop),
                _sweep(ledger, accounts, stop, settings.worker_sweep_seconds),
                export_margin(pool, lambda: config.current.tiers, stop),
                _check_ledger(ledger, pool, stop, settings.ledger_check_seconds),
                run_daily(settings, pool, lambda: config.current.prices, stop),
            )
        log.info("worker stopped")
    finally:
        stop.set()
        await runner.cleanup()
        await pool.close()
        await redis.aclose()
