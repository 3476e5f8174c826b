"""Exact money and ratio formatting for the admin figures.

Stripe amounts are integer cents, upstream cost is integer micro-dollars (µ$); both stay
integers until they are shown. 1 cent = 10,000 µ$, so converting cents to µ$ is exact.
Ratios are computed as exact fractions and rounded half-up once, when formatted.
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

from ..tiers import MICRO_PER_USD

MICRO_PER_CENT = MICRO_PER_USD // 100


def _fixed(value: int, unit: int, places: int) -> str:
    sign = "-" if value < 0 else ""
    whole, frac = divmod(abs(value), unit)
    return f"{sign}{whole}.{frac:0{places}d}"


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
