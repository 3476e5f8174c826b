"""``tiers.yaml``: what each subscription tier may use and how much."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .ledger.values import CycleLimits, Policy, Renewal
from .money import MICRO_PER_CREDIT, MICRO_PER_USD

DAY_MS = 86_400_000


def _month_start(ms: int, months_ahead: int = 0) -> int:
    at = datetime.fromtimestamp(ms / 1000, tz=UTC)
    index = at.year * 12 + at.month - 1 + months_ahead
    return int(datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC).timestamp() * 1000)


class TierChange(StrEnum):
    """A move between tiers, as ``tier_changes`` records it and the figures count it."""

    SIGNUP = "signup"
    UPGRADE = "upgrade"
    DOWNGRADE = "downgrade"
    #: the subscription was deleted: back to the default tier
    CANCEL = "cancel"
    #: past due beyond the grace period: limited to the default tier
    LAPSE = "lapse"


def model_matches(pattern: str, provider: str, model: str) -> bool:
    """Match a tier's model glob; a pattern with ``/`` is matched against ``provider/model``."""
    return fnmatchcase(f"{provider}/{model}" if "/" in pattern else model, pattern)


class Tier(BaseModel):
    """One tier. ``None`` limits mean unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    price_usd: Annotated[Decimal, Field(ge=0, decimal_places=2)]
    api_budget_ratio: Annotated[Decimal, Field(gt=0, le=1)] = Decimal("0.20")
    monthly_credits: Annotated[int, Field(ge=0)] | None = None
    monthly_tokens: Annotated[int, Field(ge=0)] | None = None
    monthly_requests: Annotated[int, Field(ge=0)] | None = None
    rpm: Annotated[int, Field(gt=0)] | None = None
    max_request_credits: Annotated[Decimal, Field(gt=0, decimal_places=4)] | None = None
    providers: list[str] = Field(min_length=1)
    models: list[str] | None = None
    admission: Literal["strict", "lenient"] = "lenient"
    stripe_price_id: str | None = None
    rollover: bool = False
    warning_threshold: Annotated[Decimal, Field(gt=0, le=1, decimal_places=3)] = Decimal("0.8")

    @model_validator(mode="after")
    def _allowance_is_whole(self) -> Tier:
        if self.monthly_credits is None:
            micro = self.price_usd * self.api_budget_ratio * MICRO_PER_USD
            if micro != micro.to_integral_value():
                raise ValueError(
                    f"price_usd × api_budget_ratio = {micro / MICRO_PER_USD} $ is not a whole "
                    "micro-dollar; set monthly_credits explicitly"
                )
        return self

    @cached_property
    def allowance_micro(self) -> int:
        """Upstream-cost budget per cycle in micro-dollars (1 credit = 10,000 µ$)."""
        if self.monthly_credits is not None:
            return self.monthly_credits * MICRO_PER_CREDIT
        return int(self.price_usd * self.api_budget_ratio * MICRO_PER_USD)

    @cached_property
    def max_request_micro(self) -> int | None:
        """The most one request's worst case may cost, µ$ (None: no cap)."""
        return None if self.max_request_credits is None else int(self.max_request_credits * MICRO_PER_CREDIT)

    @cached_property
    def limits(self) -> CycleLimits:
        """The cycle's limits as the ledger scripts take them."""
        return CycleLimits(
            allowance=self.allowance_micro,
            monthly_tokens=self.monthly_tokens,
            monthly_requests=self.monthly_requests,
            rpm=self.rpm,
            policy=Policy(self.admission),
            warning_permille=int(self.warning_threshold * 1000),
        )

    def usage_warnings(self, balance_micro: int, tokens: int, requests: int) -> list[str]:
        """``metric=NN%`` for each of credits, tokens and requests at or over the warning
        threshold of this cycle's allowance or limit."""
        used = (
            ("credits", self.allowance_micro - balance_micro, self.allowance_micro),
            ("tokens", tokens, self.monthly_tokens),
            ("requests", requests, self.monthly_requests),
        )
        return [
            f"{metric}={min(999, amount * 100 // limit)}%"
            for metric, amount, limit in used
            if limit and amount >= limit * self.warning_threshold
        ]

    def allows_provider(self, provider: str) -> bool:
        return provider in self.providers

    def allows_model(self, provider: str, model: str) -> bool:
        """Whether the tier's ``models`` globs (``gpt-4o*`` or ``openai/gpt-4o*``) admit it."""
        return self.models is None or any(model_matches(pat, provider, model) for pat in self.models)


class TiersFile(BaseModel):
    """The whole of ``tiers.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cycle: Annotated[int, Field(gt=0, le=366)] | Literal["calendar_month"] = 30
    default_tier: str = "free"
    tiers: dict[str, Tier] = Field(min_length=1)

    @model_validator(mode="after")
    def _default_exists(self) -> TiersFile:
        if self.default_tier not in self.tiers:
            raise ValueError(f"default_tier {self.default_tier!r} is not one of the tiers ({', '.join(self.tiers)})")
        return self

    @model_validator(mode="after")
    def _prices_unique(self) -> TiersFile:
        seen: dict[str, str] = {}
        for name, tier in self.tiers.items():
            if tier.stripe_price_id in seen:
                raise ValueError(f"tiers {seen[tier.stripe_price_id]} and {name} share stripe_price_id {tier.stripe_price_id!r}")
            if tier.stripe_price_id:
                seen[tier.stripe_price_id] = name
        return self

    def cycle_end(self, start_ms: int) -> int:
        """End of a self-renewing cycle starting at ``start_ms``: ``cycle`` days later, or the
        first instant of the next calendar month (UTC)."""
        if self.cycle != "calendar_month":
            return start_ms + self.cycle * DAY_MS
        return _month_start(start_ms, months_ahead=1)

    def renewal(self, now_ms: int) -> Renewal:
        """What the admission script needs to renew a lapsed cycle at ``now_ms``: the cycle
        length, or the bounds of the calendar month containing ``now_ms``."""
        if self.cycle != "calendar_month":
            return Renewal(self.cycle * DAY_MS)
        return Renewal(0, _month_start(now_ms), _month_start(now_ms, months_ahead=1))

    def change(self, from_tier: str | None, to_tier: str) -> TierChange:
        """Whether moving ``from_tier`` → ``to_tier`` is an upgrade (a higher price, or from
        no tier or one no longer offered) or a downgrade."""
        old = self.tiers.get(from_tier) if from_tier else None
        if old is None or self.tiers[to_tier].price_usd > old.price_usd:
            return TierChange.UPGRADE
        return TierChange.DOWNGRADE

    def tier_for_price(self, price_id: str | None) -> str | None:
        """The tier sold under a Stripe price id."""
        return next((name for name, t in self.tiers.items() if price_id and t.stripe_price_id == price_id), None)
