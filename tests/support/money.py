"""Money as the tests expect it: tier allowances read from the repository's tiers.yaml
through proxy's own model (never written out by hand), exact costs from per-token prices,
and credits as the response headers show them.

Every amount is an integer number of micro-dollars (µ$); 1 credit = 10,000 µ$.
"""

from __future__ import annotations

import math
from decimal import Decimal

from proxy.config import load_config
from proxy.tiers import TiersFile

from . import ROOT

#: the repository's tiers.yaml, as the proxy reads it
TIERS: TiersFile = load_config(ROOT / "pricing.yaml", ROOT / "tiers.yaml").tiers


def allowances(tiers: TiersFile) -> dict[str, int]:
    """Each tier's allowance per cycle in µ$ (``price_usd × api_budget_ratio`` or ``monthly_credits``)."""
    return {name: tier.allowance_micro for name, tier in tiers.tiers.items()}


#: tier name -> allowance per cycle in µ$, e.g. ``ALLOWANCE["starter"]``
ALLOWANCE: dict[str, int] = allowances(TIERS)


def micro(*priced: tuple[int, str]) -> int:
    """Exact cost in µ$ of (tokens, "$ per 1M tokens") pairs, rounded up once."""
    return math.ceil(sum(tokens * Decimal(price) for tokens, price in priced))


def credits_text(micro_usd: int) -> str:
    """µ$ as credits with four decimals, as ``x-credits-remaining`` and the CLI show them
    (worked out here independently of :func:`proxy.money.credits`)."""
    return f"{Decimal(micro_usd) / 10_000:.4f}"
