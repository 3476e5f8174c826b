"""Money units and their one formatter: every amount is an integer until it is shown.

Upstream cost and balances are integer micro-dollars (µ$); Stripe amounts are integer
cents; 1 credit = $0.01 = 10,000 µ$ = 1 cent, so converting between them is exact.
Ratios are computed as exact fractions and rounded half-up once, when formatted.
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

MICRO_PER_USD = 1_000_000
MICRO_PER_CENT = 10_000
MICRO_PER_CREDIT = MICRO_PER_CENT  # 1 credit = $0.01


def _fixed(value: int, unit: int, places: int) -> str:
    sign = "-" if value < 0 else ""
    whole, frac = divmod(abs(value), unit)
    return f"{sign}{whole}.{frac:0{places}d}"


def credits(micro: int) -> str:
    """Micro-dollars as credits with the four decimals that keep them exact: ``345`` → ``"0.0345"``."""
    return _fixed(micro, MICRO_PER_CREDIT, 4)


def cents_usd(cents: int) -> str:
    """Cents as dollars with two decimals: ``1999`` → ``"19.99"``."""
    return _fixed(cents, 100, 2)


def micro_usd(micro: int) -> str:
    """Micro-dollars as dollars with six decimals: ``345`` → ``"0.000345"``."""
    return _fixed(micro, MICRO_PER_USD, 6)


def cents_to_micro(cents: int) -> int:
    """Cents in micro-dollars, exactly."""
    return cents * MICRO_PER_CENT


def round_half_up(value: Fraction, places: int) -> Decimal:
    """An exact fraction rounded half-up (ties away from zero) to ``places`` decimals."""
    scaled = value * 10**places
    whole, rest = divmod(abs(scaled.numerator), scaled.denominator)
    if 2 * rest >= scaled.denominator:
        whole += 1
    return Decimal(-whole if scaled < 0 else whole).scaleb(-places)


def percent(part: int, whole: int, places: int = 2) -> str | None:
    """``part / whole`` in percent, e.g. ``"81.25"``; None when ``whole`` is zero."""
    if whole == 0:
        return None
    return str(round_half_up(Fraction(part * 100, whole), places))


def usd_ratio(micro: int, count: int) -> str | None:
    """``micro / count`` µ$ as dollars with two decimals (e.g. revenue per user); None if no count."""
    if count == 0:
        return None
    return str(round_half_up(Fraction(micro, count * MICRO_PER_USD), 2))
