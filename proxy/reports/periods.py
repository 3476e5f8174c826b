"""Reporting periods: whole UTC days, half-open ``[start, end)``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta


class QueryError(ValueError):
    """A report request that cannot be answered (bad dates or numbers, end before start, too long)."""


MAX_DAYS = 3660
#: the days a report may name: any period within, and the one before it, are valid dates
FIRST_DAY, LAST_DAY = date(1900, 1, 1), date(2999, 12, 31)


@dataclass(frozen=True)
class Period:
    """Days ``start`` (inclusive) to ``end`` (exclusive), in UTC."""

    name: str
    start: date
    end: date

    @property
    def start_at(self) -> datetime:
        """The first instant of the period (UTC)."""
        return datetime.combine(self.start, time(), tzinfo=UTC)

    @property
    def end_at(self) -> datetime:
        """The first instant after the period (UTC)."""
        return datetime.combine(self.end, time(), tzinfo=UTC)

    @property
    def days(self) -> int:
        """How many days the period covers."""
        return (self.end - self.start).days

    def previous(self) -> Period:
        """The period before: yesterday for a day, last month for a month, else as many days before."""
        if self.name == "month":
            return month_of(self.start - timedelta(days=1))
        return Period("previous", self.start - timedelta(days=self.days), self.start)

    def as_json(self) -> dict[str, str]:
        """``from`` and ``to`` are inclusive dates; ``start``/``end`` the half-open instants."""
        return {
            "name": self.name,
            "from": self.start.isoformat(),
            "to": (self.end - timedelta(days=1)).isoformat(),
            "start": self.start_at.isoformat().replace("+00:00", "Z"),
            "end": self.end_at.isoformat().replace("+00:00", "Z"),
        }


def utc_today() -> date:
    """Today's date in UTC."""
    return datetime.now(UTC).date()


def day_of(day: date) -> Period:
    """One UTC day."""
    return Period("today" if day == utc_today() else "day", day, day + timedelta(days=1))


def month_of(day: date) -> Period:
    """The calendar month containing ``day``."""
    first = day.replace(day=1)
    following = (first + timedelta(days=32)).replace(day=1)
    return Period("month", first, following)


def parse_day(raw: str, name: str) -> date:
    """``YYYY-MM-DD`` (:data:`FIRST_DAY` to :data:`LAST_DAY`) as a date, or a QueryError
    naming the parameter ``name``."""
    try:
        day = date.fromisoformat(raw) if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", raw) else None
    except ValueError:
        day = None
    if day is None or not FIRST_DAY <= day <= LAST_DAY:
        raise QueryError(f"{name} must be a date like 2025-01-31, from {FIRST_DAY} to {LAST_DAY}, got {raw!r}")
    return day


def between(first: date, last: date) -> Period:
    """Days ``first`` to ``last``, both inclusive."""
    if last < first:
        raise QueryError("to must not be before from")
    period = Period("range", first, last + timedelta(days=1))
    if period.days > MAX_DAYS:
        raise QueryError(f"a range may cover at most {MAX_DAYS} days")
    return period


def from_query(query: Mapping[str, str], today: date | None = None) -> Period:
    """``period=today|month|range`` (``range`` needs ``from`` and ``to``, inclusive dates)."""
    today = today or utc_today()
    kind = query.get("period") or "today"
    if kind == "today":
        return day_of(today)
    if kind == "month":
        return month_of(today)
    if kind == "range":
        first, last = query.get("from"), query.get("to")
        if not first or not last:
            raise QueryError("period=range needs from and to (YYYY-MM-DD, inclusive)")
        return between(parse_day(first, "from"), parse_day(last, "to"))
    raise QueryError(f"period must be today, month or range, got {kind!r}")
