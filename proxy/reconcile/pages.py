"""Reading a provider's paginated report: every bucket of every page, amounts as exact decimals."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, time
from decimal import Decimal
from fractions import Fraction
from functools import partial
from typing import Any

import aiohttp

from ..money import MICRO_PER_USD, round_half_up

#: JSON numbers with a fraction are read as Decimal, never float: a cost must stay exact
_loads = partial(json.loads, parse_float=Decimal)


#: more pages than a report of the longest range can have: a report that never ends is broken
MAX_PAGES = 1_000


class ReportError(Exception):
    """A provider's report could not be read (refused, not JSON, or not in the documented shape)."""


async def buckets(
    session: aiohttp.ClientSession, url: str, params: list[tuple[str, str]], headers: dict[str, str]
) -> AsyncIterator[dict[str, Any]]:
    """Every time bucket of the report at ``url``, following ``has_more`` / ``next_page`` (sent back as ``page``);
    a :class:`ReportError` when a page token comes round again or the pages never end."""
    page: str | None = None
    seen: set[str] = set()
    while True:
        query = params + ([("page", page)] if page else [])
        try:
            body = await _page(session, url, query, headers)
            data = body["data"]
        except (KeyError, TypeError) as exc:
            raise ReportError(f"{url}: not a report page ({exc!r})") from None
        for bucket in data:
            yield bucket
        if not body.get("has_more"):
            return
        page = body.get("next_page")
        if not isinstance(page, str) or not page:
            raise ReportError(f"{url}: has_more without a next_page")
        if page in seen or len(seen) >= MAX_PAGES:
            raise ReportError(f"{url}: the pages do not end (next_page {page[:40]!r} after {len(seen)} pages)")
        seen.add(page)


async def _page(session: aiohttp.ClientSession, url: str, query: list[tuple[str, str]], headers: dict[str, str]) -> Any:
    try:
        async with session.get(url, params=query, headers=headers) as response:
            if response.status != 200:
                raise ReportError(f"{url}: HTTP {response.status}: {(await response.text())[:300]}")
            return await response.json(loads=_loads, content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise ReportError(f"{url}: {exc!r}") from None


def midnight(day: date) -> datetime:
    """The start of a UTC day."""
    return datetime.combine(day, time(), UTC)


def count(value: object, name: str) -> int:
    """A token or request count of a report: absent or null is 0, anything but a whole
    number ≥ 0 is a :class:`ReportError` (never a fraction carried into the comparison)."""
    if value is None:
        return 0
    if type(value) is not int or value < 0:
        raise ReportError(f"{name} {value!r} is not a count")
    return value


def amount(value: object, name: str) -> Fraction:
    """A money amount of a report (a JSON number or a decimal string), exactly; a
    :class:`ReportError` for anything else (text, NaN, infinity, an object)."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise ReportError(f"{name} {value!r} is not an amount")
    try:
        exact = Decimal(value)
    except ArithmeticError:  # decimal.InvalidOperation
        raise ReportError(f"{name} {value!r} is not an amount") from None
    if not exact.is_finite():
        raise ReportError(f"{name} {value!r} is not an amount")
    return Fraction(exact)


def to_micro(total: Fraction, micro_per_unit: int = MICRO_PER_USD) -> int:
    """An exact amount (dollars, or cents with ``MICRO_PER_CENT``) in whole micro-dollars;
    providers report fractions of a micro-dollar, half of one rounds up."""
    return int(round_half_up(total * micro_per_unit, 0))
