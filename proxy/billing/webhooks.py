"""The webhook listener (``costproxy webhooks``): verifies and applies Stripe events."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC

import asyncpg
import orjson
import stripe
from aiohttp import web

from ..config import ConfigStore
from ..ledger import Ledger
from ..mail import Mailer
from ..probes import add_probes
from ..redis_url import RedisClient
from ..resources import config_store, postgres_pool, redis_client, running
from ..settings import Settings
from ..tasks import Background
from .effects import Effects
from .stripe_api import stripe_client

log = logging.getLogger("costproxy.webhooks")

EFFECTS = web.AppKey("effects", Effects)
MAILER = web.AppKey("mailer", Mailer)
SETTINGS = web.AppKey("settings", Settings)
SECRET = web.AppKey("secret", str)
SENDING = web.AppKey("sending", Background)
LAPSE_SWEEP_SECONDS = 300.0


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
        request.app[SENDING].spawn(request.app[MAILER].send(to, subject, body))
    log.info("%s %s: %s", event.type, event.id, outcome.status)
    return web.json_response({"received": True, "status": outcome.status})


async def _lapse_loop(effects: Effects) -> None:
    from datetime import datetime

    while True:
        try:
            lapsed = await effects.lapse_past_due(datetime.now(UTC))
            if lapsed:
                log.info("%d past-due accounts limited to the free tier", lapsed)
        except Exception:  # keep sweeping; the next round retries
            log.exception("past-due sweep failed")
        await asyncio.sleep(LAPSE_SWEEP_SECONDS)


_REDIS: web.AppKey[RedisClient] = web.AppKey("redis")
_POOL = web.AppKey("pool", asyncpg.Pool)
CONFIG = web.AppKey("config", ConfigStore)


async def _effects(app: web.Application) -> AsyncIterator[None]:
    settings, pool = app[SETTINGS], app[_POOL]
    async with stripe_client(settings) as client:
        app[EFFECTS] = Effects(
            pool, Ledger(app[_REDIS], settings.redis_prefix), app[CONFIG], client, settings.past_due_grace_days
        )
        async with running(_lapse_loop(app[EFFECTS])):
            yield


async def _mail(app: web.Application) -> AsyncIterator[None]:
    app[SENDING] = Background()
    yield
    await app[SENDING].drain(15)


def create_webhook_app(settings: Settings, redis_url: str, database_url: str) -> web.Application:
    """The listener application: ``/stripe/webhook``, ``/healthz``, ``/readyz``, ``/metrics``."""
    app = web.Application()
    app[SETTINGS] = settings
    app[SECRET] = settings.stripe_webhook_secret
    app[MAILER] = Mailer(settings.smtp_url, settings.mail_from)
    app.cleanup_ctx.extend(
        [
            redis_client(_REDIS, redis_url),
            postgres_pool(_POOL, database_url),
            config_store(CONFIG, settings),
            _effects,
            _mail,
        ]
    )
    app.router.add_post("/stripe/webhook", webhook_handler)
    add_probes(app)
    return app
