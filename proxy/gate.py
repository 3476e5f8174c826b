"""Admission: who is calling, may their tier use this provider and model, and is there
credit left.

Provider and model access are decided from the config alone; credits, monthly limits and
the per-minute rate are checked and a hold is placed in one Redis script call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from aiohttp import web
from redis.exceptions import RedisError

from . import metrics
from .config import Config
from .errors import ProxyError
from .keys import Identity, KeyCache
from .ledger import MAX_AMOUNT, Admission, Hold, Ledger, NoAccountError, Refusal, UsageEvent, new_id, now_ms, progress_record
from .ledger.pipeline import NotSentError
from .money import credits
from .pricing import PricedModel, ServiceTier, Usage
from .providers.base import Call, Provider, StreamMeter, estimate_usage
from .tasks import Background
from .tiers import Tier

log = logging.getLogger("costproxy.gate")


@dataclass(frozen=True, slots=True)
class Visit:
    """A request on a provider route once its caller is known: through which provider
    and path, when it started, whose key, and the tier that key's account is on."""

    provider: Provider
    tail: str
    started: float
    identity: Identity
    tier: Tier


@dataclass(slots=True)
class Ticket:
    """An admitted request, from its hold to its settlement: who pays, for what, at which
    prices (``model``: those of the price version admission found, ``model.version``, kept
    whatever reloads follow), and the hold covering its worst case (whose id is the
    request's id: :attr:`request_id`)."""

    visit: Visit
    call: Call
    model: PricedModel
    hold: Hold
    #: the account as admission found it (a stream's own cost is known only at its end)
    admission: Admission
    #: the hold was posted or voided (set by the forwarder)
    settled: bool = False
    #: reads a streamed answer's usage while it is relayed (set by the forwarder)
    meter: StreamMeter | None = None

    @property
    def provider(self) -> Provider:
        return self.visit.provider

    @property
    def identity(self) -> Identity:
        return self.visit.identity

    @property
    def tier(self) -> Tier:
        return self.visit.tier

    @property
    def request_id(self) -> str:
        """The request's id, fixed at admission (the hold's id, its settlement's idempotency
        key): ``x-costproxy-request-id``, and the receipt's id (``GET /api/usage/{id}``)."""
        return self.hold.id

    def bound(self, usage: Usage) -> Usage:
        """``usage`` as it is charged and recorded: estimated output never counts beyond
        what the request could produce (its output limit for every choice), so an estimate
        stays within the hold; tokens the provider reported count whole."""
        if not usage.estimated:
            return usage
        return replace(usage, output_tokens=min(usage.output_tokens, max_output_tokens(self.model, self.call)))

    def cost(self, usage: Usage) -> int:
        """What ``usage`` (as :meth:`bound` gives it) costs at this request's prices, µ$, in
        the service tier the provider served it at when it says (else the one asked for)."""
        return self.model.cost_micro(usage, served_tier(self.call, usage))

    def describe(self, usage: Usage, *, status: int = 0, latency_ms: int = 0) -> UsageEvent:
        """The usage event this request's charge records."""
        return describe(self.visit, self.model, self.call, usage, status=status, latency_ms=latency_ms)

    def progress(self) -> bytes:
        """What the request has cost so far as a heartbeat records it: the prompt estimate
        plus the output relayed (for a stream, what its meter has seen), marked estimated."""
        usage = self.bound(self.meter.estimate() if self.meter is not None else estimate_usage(self.call))
        return progress_record(self.cost(usage), self.describe(usage))


class Gate:
    """Authenticates and admits requests for one proxy process."""

    def __init__(self, keys: KeyCache, ledger: Ledger, hold_ttl_seconds: float):
        self.keys = keys
        self.ledger = ledger
        self.hold_ttl_ms = int(hold_ttl_seconds * 1000)
        self.releases = Background()

    async def identify(self, config: Config, provider: Provider, request: web.Request) -> tuple[Identity, Tier]:
        """The caller behind the request's proxy key (else a 401) and their tier, which must
        include ``provider`` (else a 403; decided without Redis)."""
        key = provider.caller_key(request)
        try:
            identity = await self.keys.lookup(key) if key else None
        except RedisError as exc:
            raise ledger_unavailable() from exc
        if key is None or identity is None:
            raise ProxyError(
                401,
                "invalid_api_key",
                "Missing or unknown API key. Use the key costproxy issued to you"
                + ("." if key else f", sent the way the {provider.name} SDK sends its key."),
            )
        return identity, _tier_of(config, provider, identity)

    async def admit(self, config: Config, visit: Visit, call: Call) -> Ticket:
        """Place the credit hold for ``call``'s worst case, or raise the refusal; follows one
        tier change on the way."""
        for _ in range(2):
            model = _priced(config, visit, call)
            hold = Hold(new_id("hold"), visit.identity.user_id, _worst_case(visit, model, call), placed_at=now_ms())
            prompt_only = estimate_usage(call)
            progress = progress_record(
                model.cost_micro(prompt_only, call.service_tier), describe(visit, model, call, prompt_only)
            )
            try:
                admission = await self.ledger.admit(
                    hold,
                    tier=visit.identity.tier,
                    limits=visit.tier.limits,
                    hold_ttl_ms=self.hold_ttl_ms,
                    renewal=config.tiers.renewal,
                    progress=progress,
                )
            except BaseException as exc:
                # The script may have run and only its reply been lost: release the hold
                # it may have placed rather than leave the credit reserved until it expires
                # (not when no connection opened: then nothing reached Redis).
                if not isinstance(exc, NotSentError):
                    self.releases.spawn(self._release(hold))
                if isinstance(exc, RedisError):
                    raise ledger_unavailable() from exc
                raise
            if admission.admitted:
                return Ticket(visit, call, model, hold, admission)
            if admission.refusal is not Refusal.TIER_CHANGED or admission.actual_tier is None:
                raise _refusal(visit, admission, model=model, call=call, amount=hold.amount)
            identity = self.keys.retier(visit.identity, admission.actual_tier)
            visit = replace(visit, identity=identity, tier=_tier_of(config, visit.provider, identity))
        raise ProxyError(503, "tier_changing", "Your plan is being changed; retry in a moment.", should_retry=True)

    async def _release(self, hold: Hold) -> None:
        """Void a hold whose admission has an unknown outcome."""
        try:
            result = await self.ledger.void(hold, reason="admission_failed")
            if result is None or not result.duplicate:  # None: spooled, voided when Redis is back
                metrics.HOLDS_VOIDED.labels(reason="admission_failed").inc()
        except (RedisError, NoAccountError) as exc:  # the hold, if placed, expires and is posted at its prompt estimate
            log.warning("could not release hold %s after a failed admission: %r", hold.id, exc)


def ledger_unavailable() -> ProxyError:
    """The fail-closed answer while Redis cannot be reached: nothing is forwarded."""
    return ProxyError(
        503,
        "ledger_unavailable",
        "The gateway cannot reach its credit ledger right now; nothing was charged. Retry in a moment.",
        should_retry=True,
    )


def max_output_tokens(model: PricedModel, call: Call) -> int:
    """The most output ``call`` can produce: its output limit (the model's cap when none is
    given, never above it) for every choice."""
    limit = model.max_output_tokens if call.max_output_tokens is None else call.max_output_tokens
    return min(limit, model.max_output_tokens) * call.choices


def served_tier(call: Call, usage: Usage) -> ServiceTier | None:
    """The service tier a request is charged at: the one the provider reports serving,
    else the one it asked for."""
    return call.service_tier if usage.service_tier is None else usage.service_tier


def _worst_case(visit: Visit, model: PricedModel, call: Call) -> int:
    """The hold: the prompt's upper bound and, for every choice the request can produce, its
    output limit (the model's cap when none is given, never above it), priced at the
    dearest rates that can apply; a 400 if that is beyond what the ledger keeps exact, a
    403 if it is beyond the tier's ``max_request_credits``."""
    amount = model.worst_case_micro(call.prompt_upper_bound, max_output_tokens(model, call), call.service_tier)
    if amount > MAX_AMOUNT:
        raise ProxyError(400, "request_too_large", "This request's worst-case cost is beyond what this gateway can hold.")
    cap = visit.tier.max_request_micro
    if cap is not None and amount > cap:
        raise _too_expensive(visit, model, call, amount, cap)
    return amount


def _too_expensive(visit: Visit, model: PricedModel, call: Call, amount: int, cap: int) -> ProxyError:
    """The 403 for a request over the tier's cap per request, naming the output limit that fits."""
    return ProxyError(
        403,
        "request_too_expensive",
        f"This request may cost up to {credits(amount)} credits; your {visit.identity.tier} plan allows "
        f"{credits(cap)} credits per request. {_fit_advice(model, call, cap)}.",
    )


def _fit_advice(model: PricedModel, call: Call, budget: int) -> str:
    """How to make the request's worst case fit ``budget`` µ$: the largest output limit
    that does (found by bisection: the worst case grows with the limit), or, if the prompt
    alone is too dear, to shorten it."""
    # Setting the limit lengthens the body, and with it the prompt's bound: leave room for
    # the field's name, quotes, digits and separators (and an object per nesting level).
    prompt = call.prompt_upper_bound + len(call.limit_field) + 16 + 6 * call.limit_field.count(".")

    def worst(limit: int) -> int:
        return model.worst_case_micro(prompt, limit * call.choices, call.service_tier)

    low, high = 0, max_output_tokens(model, call) // call.choices  # worst(low) may fit, worst(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if worst(middle) <= budget else (low, middle)
    if low and worst(low) <= budget:
        return f"Set {call.limit_field} to {low:,} or less" + (f" ({call.choices} answers)" if call.choices > 1 else "")
    return "Shorten the prompt: on its own it may cost more than that"


def describe(visit: Visit, model: PricedModel, call: Call, usage: Usage, *, status: int = 0, latency_ms: int = 0) -> UsageEvent:
    """The usage event of a request: its usage row's fields."""
    return UsageEvent(
        key_id=visit.identity.key_id,
        provider=visit.provider.name,
        model=model.name,
        tier=visit.identity.tier,
        input_tokens=usage.input_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_tokens + usage.cache_write_1h_tokens,
        output_tokens=usage.output_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        estimated=usage.estimated,
        stream=call.stream,
        status=status,
        latency_ms=latency_ms,
        cache_write_1h_tokens=usage.cache_write_1h_tokens,
        service_tier=served_tier(call, usage),
        price_version=model.version,
    )


def _tier_of(config: Config, provider: Provider, identity: Identity) -> Tier:
    """The caller's tier, or a 403 if it does not include this provider."""
    tier = config.tiers.tiers.get(identity.tier)
    if tier is None:
        raise ProxyError(403, "unknown_tier", f"Your account's tier {identity.tier!r} is no longer offered; contact support.")
    if not tier.allows_provider(provider.name):
        raise ProxyError(
            403,
            "provider_not_in_tier",
            f"Your {identity.tier} plan does not include {provider.name}. "
            f"Upgrade your plan (POST /api/credits/upgrade) to use it.",
        )
    return tier


def _priced(config: Config, visit: Visit, call: Call) -> PricedModel:
    """The model's prices, or a 404/403 if it is not priced or not in the caller's tier, or a
    400 if it asks for priority processing the model has no prices for."""
    provider = visit.provider.name
    model = config.prices.find(provider, call.model)
    if model is None:
        raise ProxyError(
            404, "model_not_found", f"The model {call.model!r} is not available through this gateway for {provider}."
        )
    if not visit.tier.allows_model(provider, call.model):
        raise ProxyError(
            403,
            "model_not_in_tier",
            f"Your {visit.identity.tier} plan does not include the model {call.model!r}. "
            f"Upgrade your plan (POST /api/credits/upgrade) or pick another model.",
        )
    if call.service_tier is ServiceTier.PRIORITY and ServiceTier.PRIORITY not in model.service_tiers:
        # The provider bills priority above its standard prices: without them it cannot be charged.
        raise ProxyError(
            400,
            "unsupported_option",
            f"Priority processing (asked for, or the gateway's default for requests naming no tier) is not priced "
            f'for the model {call.model!r} on this gateway; send "service_tier": "default" for the standard tier.',
        )
    return model


def _refusal(visit: Visit, result: Admission, *, model: PricedModel, call: Call, amount: int) -> ProxyError:
    """The error a refused admission of ``call`` (worst case ``amount`` µ$) answers with."""
    tier, name, reason = visit.tier, visit.identity.tier, result.refusal
    available = result.balance - result.held
    if reason is Refusal.CREDITS and available > 0:
        # strict: credits are left, the request is too big for them; a smaller one is admitted
        return ProxyError(
            403,
            "insufficient_credits",
            f"This request may cost up to {credits(amount)} credits; {credits(available)} are available "
            f"of this cycle's {credits(tier.allowance_micro)}. {_fit_advice(model, call, available)}, "
            f"or top up or upgrade your plan (POST /api/credits/upgrade).",
        )
    if reason is Refusal.CREDITS:
        return ProxyError(
            403,
            "insufficient_credits",
            f"Your credits are used up: {credits(available)} available of this cycle's "
            f"{credits(tier.allowance_micro)}. Top up or upgrade your plan (POST /api/credits/upgrade), "
            f"or {_renewal(result)}.",
            quota_spent=True,
            headers=_come_back(result),
        )
    if reason in (Refusal.TOKENS, Refusal.REQUESTS):
        limit = tier.monthly_tokens if reason is Refusal.TOKENS else tier.monthly_requests
        return ProxyError(
            429,
            f"monthly_{reason.value[:-1]}_limit",
            f"Your {name} plan's monthly limit of {limit:,} {reason.value} is reached. Upgrade your plan "
            f"(POST /api/credits/upgrade) or {_renewal(result)}.",
            quota_spent=True,
            headers=_come_back(result),
        )
    if reason is Refusal.RATE:
        seconds = max(1, -(-result.retry_after_ms // 1000))
        return ProxyError(
            429,
            "rate_limit_exceeded",
            f"Your {name} plan allows {tier.rpm} requests per minute; retry in {seconds} s.",
            should_retry=True,
            headers={"retry-after": str(seconds)},
        )
    if reason is Refusal.SUSPENDED:
        return ProxyError(403, "account_suspended", "Your account is suspended; contact support.")
    return ProxyError(401, "invalid_api_key", "This key's account does not exist any more.")


def _come_back(result: Admission) -> dict[str, str]:
    """``retry-after``: the seconds until the cycle renews, for clients that honour the
    header (the official SDKs retry nothing: ``x-should-retry: false``); none once the
    cycle has ended (a paid cycle renews with its next payment, not at a time)."""
    seconds = -(-(result.cycle_end_ms - now_ms()) // 1000)
    return {"retry-after": str(seconds)} if seconds > 0 else {}


def _renewal(result: Admission) -> str:
    """When the refused quota comes back, as the end of a sentence."""
    if result.cycle_end_ms <= now_ms():
        return "wait for your next payment to renew your cycle"
    end = datetime.fromtimestamp(result.cycle_end_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"wait for your cycle to renew ({end})"


def count_refusal(provider: str, error: ProxyError) -> None:
    """Count a refusal in ``costproxy_refusals_total``."""
    metrics.REFUSALS.labels(provider=provider, reason=error.reason).inc()
