"""The webhook listener (``costproxy webhooks``): verifies and applies Stripe events."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import orjson
import stripe
from aiohttp import web
from redis.asyncio import Redis

from ..config import ConfigStore
from ..db import connect_pool
from ..ledger import Ledger
from ..mail import Mailer
from ..settings import Settings
from .effects import Effects
from .stripe_api import stripe_client

log = logging.getLogger("costproxy.webhooks")

EFFECTS = web.AppKey("effects", Effects)
MAILER = web.AppKey("mailer", Mailer)
SECRET = web.AppKey("secret", str)
LAPSE_SWEEP_SECONDS = 300.0
_SENDING: set[asyncio.Task[bool]] = set()


async def webhook_handler(request: web.Request) -> web.Response:
    """``POST /stripe/webhook``: 400 for a bad or stale signature, 200 once applied (or a replay)."""
    payload = await request.read()
    try:
        event = stripe.Webhook.construct_event(payload, request.headers.get("Stripe-Signature", ""), request.app[SECRET])
    except (ValueError, stripe.SignatureVerificationError) as exc:
        log.warning("refused webhook: %s", exc)
        return web.json_response({"error": str(exc)}, status=400)
    outcome = await request.app[EFFECTS].apply(orjson.loads(payload))
    for to, subject, body in outcome.mail:  # after the commit; never delays the answer
        task = asyncio.create_task(request.app[MAILER].send(to, subject, body))
        _SENDING.add(task)
        task.add_done_callback(_SENDING.discard)
    log.info("%s %s: %s", event.type, event.id, outcome.status)
    return web.json_response({"received": True, "status": outcome.status})


async def _lapse_loop(effects: Effects) -> None:
    from datetime import datetime, timezone

    while True:
        try:
            lapsed = await effects.lapse_past_due(datetime.now(timezone.utc))
            if lapsed:
                log.info("%d past-due accounts limited to the free tier", lapsed)
        except Exception:  # keep sweeping; the next round retries
            log.exception("past-due sweep failed")
        await asyncio.sleep(LAPSE_SWEEP_SECONDS)


def create_webhook_app(settings: Settings, redis_url: str, database_url: str) -> web.Application:
    """The listener application: ``/stripe/webhook``, ``/healthz``, ``/metrics``."""
    from ..app import health_handler, metrics_handler

    app = web.Application()
    app[SECRET] = settings.stripe_webhook_secret

    async def resources(app: web.Application) -> AsyncIterator[None]:
        redis = Redis.from_url(redis_url)
        pool = await connect_pool(database_url)
        async with stripe_client(settings) as client:
            config = ConfigStore(settings.pricing_file, settings.tiers_file)
            effects = Effects(pool, Ledger(redis, settings.redis_prefix), config, client, settings.past_due_grace_days)
            app[EFFECTS] = effects
            app[MAILER] = Mailer(settings.smtp_url, settings.mail_from)
            tasks = [asyncio.create_task(_lapse_loop(effects)), asyncio.create_task(config.watch(settings.config_reload_seconds))]
            yield
            for task in tasks:
                task.cancel()
        await pool.close()
        await redis.aclose()

    app.cleanup_ctx.append(resources)
    app.router.add_post("/stripe/webhook", webhook_handler)
    app.router.add_get("/healthz", health_handler)
    app.router.add_get("/metrics", metrics_handler)
    return app
