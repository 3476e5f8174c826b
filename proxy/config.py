"""Loading, validating and hot-reloading ``pricing.yaml`` and ``tiers.yaml``."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from . import metrics
from .pricing import PriceBook, PricingFile
from .providers import registry
from .tiers import TiersFile, model_matches

if TYPE_CHECKING:
    from .providers.base import Provider

log = logging.getLogger("costproxy.config")
#: libyaml when PyYAML was built with it (22 ms instead of 118 ms for the shipped files), else pure Python
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """A configuration file is unreadable or invalid; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Config:
    """A validated pair of pricing and tiers, swapped as a whole on reload, with the
    provider instances built for that pricing (empty where no process needs them)."""

    prices: PriceBook
    tiers: TiersFile
    providers: Mapping[str, Provider] = field(default_factory=dict)


#: builds the provider instances of a price book (see :func:`proxy.providers.registry.build_providers`)
ProviderFactory = Callable[[PriceBook], Mapping[str, "Provider"]]


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None


def _parse(path: Path, raw: bytes, model: type[M]) -> M:
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=_SAFE_LOADER)
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            value = f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict) else ""
            problems.append(f"{path}: {_dotted(err['loc'])}: {err['msg']}{value}")
        raise ConfigError(problems) from None


def parse_price_book(source: bytes, origin: str) -> PriceBook:
    """``pricing.yaml`` content as a validated price book (its version that of ``source``);
    :class:`ConfigError` naming ``origin`` if it is not valid."""
    return PriceBook(_parse(Path(origin), source, PricingFile), source)


def _cross_check(pricing_path: Path, tiers_path: Path, prices: PriceBook, tiers: TiersFile) -> list[str]:
    problems = []
    for provider, entry in prices.providers.items():
        wire = entry.wire or provider
        if wire not in registry.WIRES:
            problems.append(
                f"{pricing_path}: providers.{provider}: no built-in provider of that name; "
                f"set wire: to one of {', '.join(sorted(registry.WIRES))}"
            )
        elif provider not in registry.BUILTIN_URLS and not entry.base_url:
            problems.append(f"{pricing_path}: providers.{provider}.base_url: required for a provider that is not built in")
    for name, tier in tiers.tiers.items():
        for i, provider in enumerate(tier.providers):
            if provider not in prices.providers:
                problems.append(
                    f"{tiers_path}: tiers.{name}.providers.{i}: {provider!r} is not a provider in "
                    f"{pricing_path} ({', '.join(prices.providers)})"
                )
        for i, pattern in enumerate(tier.models or []):
            if not any(model_matches(pattern, p, m) for p in tier.providers for m in prices.model_names(p)):
                problems.append(
                    f"{tiers_path}: tiers.{name}.models.{i}: {pattern!r} matches no model of the tier's "
                    f"providers in {pricing_path}"
                )
    return problems


def load_config(pricing_path: Path, tiers_path: Path) -> Config:
    """Read and validate both files; raise :class:`ConfigError` listing every problem. The
    price book is versioned by the pricing file's bytes as read (:attr:`PriceBook.version`)."""
    problems: list[str] = []
    parsed: dict[str, Any] = {}
    raw: dict[str, bytes] = {}
    for key, path, model in (("pricing", pricing_path, PricingFile), ("tiers", tiers_path, TiersFile)):
        try:
            raw[key] = _read(path)
            parsed[key] = _parse(path, raw[key], model)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    prices = PriceBook(parsed["pricing"], raw["pricing"])
    problems = _cross_check(pricing_path, tiers_path, prices, parsed["tiers"])
    if problems:
        raise ConfigError(problems)
    return Config(prices=prices, tiers=parsed["tiers"])


class ConfigStore:
    """Holds the running config and swaps in edits that validate; keeps the last good one.

    With ``providers``, every config it loads carries the provider instances built for it.
    ``price_loads`` has every price version it has loaded, with the book and when it was
    last loaded (what :func:`proxy.price_versions.record_versions` stores in Postgres).
    """

    def __init__(self, pricing_path: Path, tiers_path: Path, providers: ProviderFactory | None = None):
        self.pricing_path = pricing_path
        self.tiers_path = tiers_path
        self._providers = providers
        self.price_loads: dict[str, tuple[PriceBook, datetime]] = {}
        self._stamp = self._read_stamp()
        self.current = self._load()
        metrics.CONFIG_RELOAD_OK.set(1)

    def _load(self) -> Config:
        config = load_config(self.pricing_path, self.tiers_path)
        if self._providers:
            config = replace(config, providers=self._providers(config.prices))
        # One assignment: the event loop may read the dict while a reload runs in a thread.
        self.price_loads[config.prices.version] = (config.prices, datetime.now(UTC))
        return config

    def _read_stamp(self) -> tuple[tuple[int, int], ...]:
        stamps = []
        for path in (self.pricing_path, self.tiers_path):
            try:
                st = os.stat(path)
                stamps.append((st.st_mtime_ns, st.st_size))
            except OSError:
                stamps.append((0, 0))
        return tuple(stamps)

    def reload_if_changed(self) -> bool:
        """Reload when either file changed on disk; return True if a new config is live."""
        if self._read_stamp() == self._stamp:
            return False
        return self.reload()

    def reload(self) -> bool:
        """Read both files now (SIGHUP); True if a new config is live, False if an edit was rejected."""
        self._stamp = self._read_stamp()
        try:
            self.current = self._load()
        except ConfigError as exc:
            metrics.CONFIG_RELOAD_OK.set(0)
            metrics.CONFIG_RELOADS.labels(result="error").inc()
            log.error("config edit rejected, still running the last good config:\n%s", exc)
            return False
        metrics.CONFIG_RELOAD_OK.set(1)
        metrics.CONFIG_RELOADS.labels(result="ok").inc()
        log.info("config reloaded from %s and %s", self.pricing_path, self.tiers_path)
        return True

    async def watch(self, interval: float) -> None:
        """Poll both files every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            # Parsing and validating take tens of ms: off the event loop, so streams never stall.
            await asyncio.to_thread(self.reload_if_changed)
