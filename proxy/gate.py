"""Admission: who is calling, may their tier use this model, and is there credit left.

Provider and model access are decided from the config alone; credits, monthly limits and
the per-minute rate are checked and a hold is placed in one Redis script call.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timezone

from redis.exceptions import RedisError

from . import metrics
from .config import Config
from .keys import Identity, KeyCache
from .ledger import Admission, Ledger, new_id
from .pricing import PricedModel
from .providers.base import Call, Provider, ProxyError
from .tiers import MICRO_PER_CREDIT, Tier

log = logging.getLogger("costproxy.gate")


@dataclass(slots=True)
class Ticket:
    """An admitted request: who pays, at which prices, and the hold covering it."""

    identity: Identity
    tier: Tier
    model: PricedModel
    call: Call
    hold_id: str
    hold_micro: int
    admission: Admission
    #: the hold was posted or voided (set by the forwarder)
    settled: bool = False


def credits(micro: int) -> str:
    """Micro-dollars as credits with the four decimals that keep them exact."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO_PER_CREDIT)
    return f"{sign}{whole}.{frac:04d}"


class Gate:
    """Authenticates and admits requests for one proxy process."""

    def __init__(self, keys: KeyCache, ledger: Ledger, hold_ttl_seconds: int):
        self.keys = keys
        self.ledger = ledger
        self.hold_ttl_ms = hold_ttl_seconds * 1000
        self._releases: set[asyncio.Task[None]] = set()

    async def identify(self, provider: Provider, key: str | None) -> Identity:
        """The caller behind a proxy key, or a 401."""
        identity = await self.keys.lookup(key) if key else None
        if identity is None:
            raise ProxyError(
                401, "invalid_api_key",
                "Missing or unknown API key. Use the key costproxy issued to you"
                + ("." if key else f", sent the way the {provider.name} SDK sends its key."),
            )
        return identity

    def tier_for(self, config: Config, provider: Provider, identity: Identity) -> Tier:
        """The caller's tier, or a 403 if it does not include this provider (no Redis needed)."""
        tier = config.tiers.tiers.get(identity.tier)
        if tier is None:
            raise ProxyError(403, "unknown_tier", f"Your account's tier {identity.tier!r} is no longer offered; contact support.")
        if not tier.allows_provider(provider.name):
            raise ProxyError(
                403, "provider_not_in_tier",
                f"Your {identity.tier} plan does not include {provider.name}. "
                f"Upgrade your plan (POST /api/credits/upgrade) to use it.",
            )
        return tier

    def price(self, config: Config, provider: Provider, identity: Identity, call: Call) -> tuple[Tier, PricedModel]:
        """The caller's tier and the model's prices, or a 404/403 if either rules it out."""
        model = config.prices.find(provider.name, call.model)
        if model is None:
            raise ProxyError(
                404, "model_not_found",
                f"The model {call.model!r} is not available through this gateway for {provider.name}.",
            )
        tier = self.tier_for(config, provider, identity)
        if not tier.allows_model(provider.name, call.model):
            raise ProxyError(
                403, "model_not_in_tier",
                f"Your {identity.tier} plan does not include the model {call.model!r}. "
                f"Upgrade your plan (POST /api/credits/upgrade) or pick another model.",
            )
        return tier, model

    async def admit(self, config: Config, provider: Provider, key: str, identity: Identity, call: Call) -> Ticket:
        """Place the credit hold, or raise the refusal; follows one tier change on the way."""
        for _ in range(2):
            tier, model = self.price(config, provider, identity, call)
            max_out = call.max_output_tokens if call.max_output_tokens is not None else model.max_output_tokens
            hold = model.worst_case_micro(call.prompt_upper_bound, max_out, call.service_tier)
            hold_id = new_id("hold")
            try:
                result = await self.ledger.admit(
                    user_id=identity.user_id,
                    tier=identity.tier,
                    hold_id=hold_id,
                    hold_micro=hold,
                    strict=tier.admission == "strict",
                    monthly_tokens=tier.monthly_tokens,
                    monthly_requests=tier.monthly_requests,
                    rpm=tier.rpm,
                    hold_ttl_ms=self.hold_ttl_ms,
                    allowance_micro=tier.allowance_micro,
                    renewal=config.tiers.renewal,
                )
            except BaseException as exc:
                # The script may have run and only its reply been lost: release the hold
                # it may have placed rather than leave the credit reserved until it expires.
                self._release(identity.user_id, hold_id, hold)
                if isinstance(exc, RedisError):
                    raise ProxyError(
                        503, "ledger_unavailable",
                        "The gateway cannot reach its credit ledger right now; nothing was charged. Retry in a moment.",
                        should_retry=True,
                    ) from exc
                raise
            if result.reason == "ok":
                return Ticket(identity, tier, model, call, hold_id, hold, result)
            if result.reason != "tier" or result.actual_tier is None:
                raise self._refusal(identity, tier, hold, result)
            identity = self.keys.retier(key, identity, result.actual_tier)
        raise ProxyError(503, "tier_changing", "Your plan is being changed; retry in a moment.", should_retry=True)

    def _release(self, user_id: str, hold_id: str, hold: int) -> None:
        """Void a hold whose admission has an unknown outcome, in the background."""

        async def release() -> None:
            try:
                result = await self.ledger.void(user_id=user_id, hold_id=hold_id, hold_micro=hold, reason="admission_failed")
                if not result.duplicate:
                    metrics.HOLDS_VOIDED.labels(reason="admission_failed").inc()
            except (RedisError, KeyError) as exc:  # the hold, if placed, expires and is voided by the worker
                log.warning("could not release hold %s after a failed admission: %r", hold_id, exc)

        task = asyncio.create_task(release())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    @staticmethod
    def _refusal(identity: Identity, tier: Tier, hold: int, result: Admission) -> ProxyError:
        reason = result.reason
        if reason == "credits":
            available = result.balance - result.held
            need = f" This request may cost up to {credits(hold)} credits." if tier.admission == "strict" else ""
            return ProxyError(
                403, "insufficient_credits",
                f"Your credits are used up: {credits(available)} available of this cycle's "
                f"{credits(tier.allowance_micro)}.{need} Top up or upgrade your plan "
                f"(POST /api/credits/upgrade), or wait for your cycle to renew ({_renewal(result)}).",
            )
        if reason in ("tokens", "requests"):
            limit = tier.monthly_tokens if reason == "tokens" else tier.monthly_requests
            return ProxyError(
                429, f"monthly_{reason[:-1]}_limit",
                f"Your {identity.tier} plan's monthly limit of {limit:,} {reason} is reached. Upgrade your plan "
                f"(POST /api/credits/upgrade) or wait for your cycle to renew ({_renewal(result)}).",
            )
        if reason == "rpm":
            seconds = max(1, -(-result.retry_after_ms // 1000))
            return ProxyError(
                429, "rate_limit_exceeded",
                f"Your {identity.tier} plan allows {tier.rpm} requests per minute; retry in {seconds} s.",
                should_retry=True, headers={"retry-after": str(seconds)},
            )
        if reason == "suspended":
            return ProxyError(403, "account_suspended", "Your account is suspended; contact support.")
        return ProxyError(401, "invalid_api_key", "This key's account does not exist any more.")

def _renewal(result: Admission) -> str:
    return datetime.fromtimestamp(result.cycle_end_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def count_refusal(provider: str, error: ProxyError) -> None:
    metrics.REFUSALS.labels(provider=provider, reason=error.reason).inc()
