"""``pricing.yaml``: per-model prices and the exact micro-dollar cost of a request.

Prices are written in US dollars per million tokens. A dollar per million tokens is a
micro-dollar per token, so a price with at most six decimals is an integer number of
pico-dollars (10^-12 $) per token; every cost is summed exactly in pico-dollars and rounded
up to the next micro-dollar once.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

PICO_PER_MICRO = 1_000_000

_SNAPSHOT_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")


def _at_most_six_decimals(value: Decimal) -> Decimal:
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -6:
        raise ValueError(f"{value} has more than 6 decimals; prices are exact to 1e-6 $ per 1M tokens")
    return value


Price = Annotated[Decimal, Field(ge=0), AfterValidator(_at_most_six_decimals)]


def _pico(per_million: Decimal | None, unset: int = 0) -> int:
    """Dollars per million tokens as integer pico-dollars per token (``unset`` if None)."""
    return unset if per_million is None else int(per_million * PICO_PER_MICRO)


class PriceSetName(StrEnum):
    """Which of a model's price sets a request pays."""

    STANDARD = "standard"
    LONG_CONTEXT = "long_context"
    FLEX = "flex"
    PRIORITY = "priority"


class ServiceTier(StrEnum):
    """A provider's processing tier, as requests name it and answers report it."""

    DEFAULT = "default"  # the standard prices
    FLEX = "flex"
    PRIORITY = "priority"

    @property
    def priced_apart(self) -> bool:
        """Whether a model may have prices of its own for this tier (``service_tiers``)."""
        return self is not ServiceTier.DEFAULT


def known_service_tier(value: object) -> ServiceTier | None:
    """The tier ``value`` names (case and a ``service_tier_`` prefix ignored); None for
    anything else, so only known names are ever recorded."""
    if not isinstance(value, str):
        return None
    try:
        return ServiceTier(value.lower().removeprefix("service_tier_"))
    except ValueError:
        return None


def priced_service_tier(value: object) -> ServiceTier | None:
    """The tier ``value`` names if a model may price it apart (flex, priority); None for
    the standard tier and for anything unknown, which pay the standard prices."""
    tier = known_service_tier(value)
    return tier if tier is not None and tier.priced_apart else None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PriceSet(_Strict):
    """Dollar prices per million tokens for each kind of token."""

    input_per_1m: Price
    output_per_1m: Price
    cached_input_per_1m: Price | None = None
    cache_write_per_1m: Price | None = None
    cache_write_1h_per_1m: Price | None = None

    def pico(self, name: PriceSetName) -> PicoPrices:
        """The same prices as integer pico-dollars per token, as the price set ``name``;
        unset kinds cost input price."""
        inp = _pico(self.input_per_1m)
        return PicoPrices(
            input=inp,
            output=_pico(self.output_per_1m),
            cached_input=_pico(self.cached_input_per_1m, inp),
            cache_write=_pico(self.cache_write_per_1m, inp),
            cache_write_1h=_pico(self.cache_write_1h_per_1m, inp),
            name=name,
        )


class LongContext(PriceSet):
    """Prices that apply to the whole request once its prompt exceeds a size."""

    above_input_tokens: int = Field(gt=0)


class ModelPrice(PriceSet):
    """One model's prices and output cap."""

    max_output_tokens: int | None = Field(default=None, gt=0)
    long_context: LongContext | None = None
    service_tiers: dict[Literal["flex", "priority"], PriceSet] = Field(default_factory=dict)


class ProviderPricing(_Strict):
    """A provider's models; ``wire``/``base_url``/``api_key_env`` describe compatible ones."""

    wire: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    #: ``ask``: streamed chat requests get ``stream_options.include_usage`` added so the
    #: stream reports usage; ``always``: the provider reports usage in every stream and
    #: rejects that field (Mistral), so requests go upstream unchanged.
    stream_usage: Literal["ask", "always"] = "ask"
    #: the tier a request that names none (or ``auto``) is served at: the operator's
    #: project default (OpenAI lets a project default to priority processing)
    default_service_tier: ServiceTier = ServiceTier.DEFAULT
    default_max_output_tokens: int = Field(default=4096, gt=0)
    models: dict[str, ModelPrice]

    @model_validator(mode="after")
    def _has_models(self) -> ProviderPricing:
        if not self.models:
            raise ValueError("lists no models")
        return self


class PricingFile(_Strict):
    """The whole of ``pricing.yaml``."""

    providers: dict[str, ProviderPricing]


def price_version(content: bytes) -> str:
    """The price version of a ``pricing.yaml`` content: the first 16 hex digits of its
    SHA-256 (``sha256sum pricing.yaml | cut -c1-16``)."""
    return hashlib.sha256(content).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class PicoPrices:
    input: int
    output: int
    cached_input: int
    cache_write: int
    cache_write_1h: int
    #: which of its model's price sets these are
    name: PriceSetName = PriceSetName.STANDARD

    def per_million_usd(self) -> dict[str, str]:
        """Each price as ``pricing.yaml`` writes it: exact US dollars per million tokens, as
        decimal strings with six decimals (``"0.150000"``)."""
        return {
            "input": _per_million(self.input),
            "cached_input": _per_million(self.cached_input),
            "cache_write": _per_million(self.cache_write),
            "cache_write_1h": _per_million(self.cache_write_1h),
            "output": _per_million(self.output),
        }


def _per_million(pico: int) -> str:
    """Pico-dollars per token as dollars per million tokens (1 pico-dollar per token is
    $0.000001 per million): exact, six decimals."""
    whole, frac = divmod(pico, PICO_PER_MICRO)
    return f"{whole}.{frac:06d}"


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
    #: the service tier the provider reports it served, which it bills; None when it
    #: reports none
    service_tier: ServiceTier | None = None

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
    #: (prompt tokens above which they apply, the prices), if the model has long-context prices
    long_context: tuple[int, PicoPrices] | None
    service_tiers: dict[str, PicoPrices]
    #: the price version (:attr:`PriceBook.version`) these prices come from
    version: str = ""

    def prices_for(self, prompt_tokens: int, service_tier: ServiceTier | None) -> PicoPrices:
        """The price set a request pays: service tier, else long context, else base."""
        if service_tier in self.service_tiers:
            return self.service_tiers[service_tier]
        if self.long_context is not None and prompt_tokens > self.long_context[0]:
            return self.long_context[1]
        return self.base

    def cost_micro(self, usage: Usage, service_tier: ServiceTier | None = None) -> int:
        """Exact cost in micro-dollars, rounded up once."""
        p = self.prices_for(usage.prompt_tokens, service_tier)
        pico = (
            usage.input_tokens * p.input
            + usage.cached_input_tokens * p.cached_input
            + usage.cache_write_tokens * p.cache_write
            + usage.cache_write_1h_tokens * p.cache_write_1h
            + usage.output_tokens * p.output
        )
        return -(-pico // PICO_PER_MICRO)

    def worst_case_micro(self, prompt_upper_bound: int, max_output: int, service_tier: ServiceTier | None = None) -> int:
        """Largest cost a request with at most these tokens can have (the credit hold)."""
        p = self.prices_for(prompt_upper_bound, service_tier)
        dearest_input = max(p.input, p.cached_input, p.cache_write, p.cache_write_1h)
        pico = prompt_upper_bound * dearest_input + max_output * p.output
        return -(-pico // PICO_PER_MICRO)


class PriceBook:
    """Compiled prices of every provider, looked up by provider and model id. ``source`` is
    the ``pricing.yaml`` content they were parsed from and ``version`` its price version
    (:func:`price_version`): every :class:`PricedModel` found here carries it."""

    def __init__(self, parsed: PricingFile, source: bytes):
        self.file = parsed
        self.source = source
        self.version = version = price_version(source)
        self._models: dict[tuple[str, str], PricedModel] = {}
        for provider, entry in parsed.providers.items():
            for name, m in entry.models.items():
                self._models[(provider, name)] = PricedModel(
                    provider=provider,
                    name=name,
                    max_output_tokens=m.max_output_tokens or entry.default_max_output_tokens,
                    base=m.pico(PriceSetName.STANDARD),
                    long_context=(m.long_context.above_input_tokens, m.long_context.pico(PriceSetName.LONG_CONTEXT))
                    if m.long_context
                    else None,
                    service_tiers={k: v.pico(PriceSetName(k)) for k, v in m.service_tiers.items()},
                    version=version,
                )

    @property
    def providers(self) -> dict[str, ProviderPricing]:
        return self.file.providers

    @property
    def model_count(self) -> int:
        """How many models the book prices, over every provider."""
        return len(self._models)

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
