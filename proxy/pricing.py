"""``pricing.yaml``: per-model prices and the exact micro-dollar cost of a request.

Prices are written in US dollars per million tokens. A dollar per million tokens is a
micro-dollar per token, so a price with at most six decimals is an integer number of
pico-dollars (10^-12 $) per token; every cost is summed exactly in pico-dollars and rounded
up to the next micro-dollar once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

PICO_PER_MICRO = 1_000_000

_SNAPSHOT_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")


def _at_most_six_decimals(value: Decimal) -> Decimal:
    if value.as_tuple().exponent < -6:  # type: ignore[operator]
        raise ValueError(f"{value} has more than 6 decimals; prices are exact to 1e-6 $ per 1M tokens")
    return value


Price = Annotated[Decimal, Field(ge=0), AfterValidator(_at_most_six_decimals)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PriceSet(_Strict):
    """Dollar prices per million tokens for each kind of token."""

    input_per_1m: Price
    output_per_1m: Price
    cached_input_per_1m: Price | None = None
    cache_write_per_1m: Price | None = None
    cache_write_1h_per_1m: Price | None = None

    def pico(self) -> "PicoPrices":
        """The same prices as integer pico-dollars per token; unset kinds cost input price."""
        to_pico = lambda d: int(d * PICO_PER_MICRO)  # noqa: E731
        inp = to_pico(self.input_per_1m)
        opt = lambda d: inp if d is None else to_pico(d)  # noqa: E731
        return PicoPrices(
            input=inp,
            output=to_pico(self.output_per_1m),
            cached_input=opt(self.cached_input_per_1m),
            cache_write=opt(self.cache_write_per_1m),
            cache_write_1h=opt(self.cache_write_1h_per_1m),
        )


class LongContext(PriceSet):
    """Prices that apply to the whole request once its prompt exceeds a size."""

    above_input_tokens: int = Field(gt=0)


class ModelPrice(PriceSet):
    """One model's prices and output cap."""

    max_output_tokens: int | None = Field(default=None, gt=0)
    long_context: LongContext | None = None
    service_tiers: dict[Literal["flex", "priority"], PriceSet] = Field(default_factory=dict)
    batch_discount: Annotated[Decimal, Field(gt=0, le=1)] | None = None


class ProviderPricing(_Strict):
    """A provider's models; ``wire``/``base_url``/``api_key_env`` describe compatible ones."""

    wire: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    #: ``ask``: streamed chat requests get ``stream_options.include_usage`` added so the
    #: stream reports usage; ``always``: the provider reports usage in every stream and
    #: rejects that field (Mistral), so requests go upstream unchanged.
    stream_usage: Literal["ask", "always"] = "ask"
    default_max_output_tokens: int = Field(default=4096, gt=0)
    models: dict[str, ModelPrice]

    @model_validator(mode="after")
    def _has_models(self) -> "ProviderPricing":
        if not self.models:
            raise ValueError("lists no models")
        return self


class PricingFile(_Strict):
    """The whole of ``pricing.yaml``."""

    providers: dict[str, ProviderPricing]


@dataclass(frozen=True, slots=True)
class PicoPrices:
    input: int
    output: int
    cached_input: int
    cache_write: int
    cache_write_1h: int


@dataclass(slots=True)
class Usage:
    """Tokens of one request, split by how they are billed.

    ``input_tokens`` are the uncached prompt tokens only; ``output_tokens`` include
    reasoning/thinking tokens, which every provider bills as output.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cached_input_tokens + self.cache_write_tokens + self.cache_write_1h_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class PricedModel:
    """A model's prices compiled to integers, ready for the hot path."""

    provider: str
    name: str
    max_output_tokens: int
    base: PicoPrices
    long_context_above: int | None
    long_context: PicoPrices | None
    service_tiers: dict[str, PicoPrices]
    batch_discount: Fraction | None

    def prices_for(self, prompt_tokens: int, service_tier: str | None) -> PicoPrices:
        """The price set a request pays: service tier, else long context, else base."""
        if service_tier in self.service_tiers:
            return self.service_tiers[service_tier]
        if self.long_context is not None and prompt_tokens > self.long_context_above:  # type: ignore[operator]
            return self.long_context
        return self.base

    def cost_micro(self, usage: Usage, service_tier: str | None = None, batch: bool = False) -> int:
        """Exact cost in micro-dollars, rounded up once."""
        p = self.prices_for(usage.prompt_tokens, service_tier)
        pico = (
            usage.input_tokens * p.input
            + usage.cached_input_tokens * p.cached_input
            + usage.cache_write_tokens * p.cache_write
            + usage.cache_write_1h_tokens * p.cache_write_1h
            + usage.output_tokens * p.output
        )
        if batch and self.batch_discount is not None:
            return math.ceil(Fraction(pico) * self.batch_discount / PICO_PER_MICRO)
        return -(-pico // PICO_PER_MICRO)

    def worst_case_micro(self, prompt_upper_bound: int, max_output: int, service_tier: str | None = None) -> int:
        """Largest cost a request with at most these tokens can have (the credit hold)."""
        p = self.prices_for(prompt_upper_bound, service_tier)
        dearest_input = max(p.input, p.cached_input, p.cache_write, p.cache_write_1h)
        pico = prompt_upper_bound * dearest_input + max_output * p.output
        return -(-pico // PICO_PER_MICRO)


class PriceBook:
    """Compiled prices of every provider, looked up by provider and model id."""

    def __init__(self, parsed: PricingFile):
        self.file = parsed
        self._models: dict[tuple[str, str], PricedModel] = {}
        for provider, entry in parsed.providers.items():
            for name, m in entry.models.items():
                self._models[(provider, name)] = PricedModel(
                    provider=provider,
                    name=name,
                    max_output_tokens=m.max_output_tokens or entry.default_max_output_tokens,
                    base=m.pico(),
                    long_context_above=m.long_context.above_input_tokens if m.long_context else None,
                    long_context=m.long_context.pico() if m.long_context else None,
                    service_tiers={k: v.pico() for k, v in m.service_tiers.items()},
                    batch_discount=Fraction(m.batch_discount) if m.batch_discount is not None else None,
                )

    @property
    def providers(self) -> dict[str, ProviderPricing]:
        return self.file.providers

    def model_names(self, provider: str) -> list[str]:
        entry = self.file.providers.get(provider)
        return sorted(entry.models) if entry else []

    def find(self, provider: str, model: str) -> PricedModel | None:
        """The model's prices; a dated snapshot (``name-YYYY-MM-DD``) falls back to ``name``."""
        found = self._models.get((provider, model))
        if found is None:
            base = _SNAPSHOT_SUFFIX.sub("", model)
            if base != model:
                found = self._models.get((provider, base))
        return found
