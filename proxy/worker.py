"""The worker process: usage log to Postgres, expired holds voided, key mirror kept."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import metrics
from .accounts import Accounts, sync_key_mirror
from .admin.gauges import export_margin
from .app import health_handler, metrics_handler
from .config import ConfigStore
from .db import connect_pool
from .keys import KeyMirror
from .ledger import Ledger, now_ms
from .mail import Mailer
from .notices import UsageWarnings
from .settings import Settings
from .usage import UsageLog

log = logging.getLogger("costproxy.worker")

EXPIRY_SWEEP_SECONDS = 5.0


async def void_expired_holds(ledger: Ledger) -> int:
    """Void every hold whose request never settled (its proxy crashed); return how many."""
    voided = 0
    for holds_key in ledger.holds_keys():
        for hold in await ledger.expired_holds(holds_key, now_ms()):
            try:
                result = await ledger.void_pending(hold, reason="expired")
            except KeyError:
                log.warning("dropped expired hold %s: account %s no longer exists", hold.hold_id, hold.user_id)
                continue
            if not result.duplicate:
                voided += 1
                metrics.HOLDS_VOIDED.labels(reason="expired").inc()
    return voided


async def _sweep(ledger: Ledger, accounts: Accounts, stop: asyncio.Event) -> None:
    """Void expired holds and revoke rotated keys whose overlap ended, every few seconds."""
    while not stop.is_set():
        try:
            count = await void_expired_holds(ledger)
            if count:
                log.info("voided %d expired holds", count)
            await accounts.revoke_due_keys()
        except (OSError, RedisError, asyncpg.PostgresError) as exc:
            log.warning("sweep failed, retrying in %.0f s: %s", EXPIRY_SWEEP_SECONDS, exc)
        try:
            await asyncio.wait_for(stop.wait(), EXPIRY_SWEEP_SECONDS)
        except asyncio.TimeoutError:
            pass


async def run_worker(settings: Settings, redis_url: str, database_url: str, port: int) -> None:
    """Run until interrupted; serves ``/healthz`` and ``/metrics`` on ``port``."""
    redis = Redis.from_url(redis_url)
    pool = await connect_pool(database_url)
    ledger = Ledger(redis, settings.redis_prefix)
    mirror = KeyMirror(redis, settings.redis_prefix)
    config = ConfigStore(settings.pricing_file, settings.tiers_file)
    accounts = Accounts(pool, ledger, mirror, config.current)
    await accounts.revoke_due_keys()
    synced = await sync_key_mirror(pool, mirror)
    log.info("key mirror holds %d active keys", synced)
    app = web.Application()
    app.router.add_get("/healthz", health_handler)
    app.router.add_get("/metrics", metrics_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    stop = asyncio.Event()
    try:
        warnings = UsageWarnings(Mailer(settings.smtp_url, settings.mail_from))
        usage_log = UsageLog(redis, ledger, pool, settings.worker_batch, warnings)
        await asyncio.gather(
            usage_log.run(stop), _sweep(ledger, accounts, stop),
            export_margin(pool, lambda: config.current.tiers, stop), config.watch(settings.config_reload_seconds),
        )
    finally:
        stop.set()
        await runner.cleanup()
        await pool.close()
        await redis.aclose()
