"""Reporting periods: whole UTC days, half-open ``[start, end)``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone


class QueryError(ValueError):
    """A report request that cannot be answered (bad dates or numbers, end before start, too long)."""


MAX_DAYS = 3660


@dataclass(frozen=True)
class Period:
    """Days ``start`` (inclusive) to ``end`` (exclusive), in UTC."""

    name: str
    start: date
    end: date

    @property
    def start_at(self) -> datetime:
        """The first instant of the period (UTC)."""
        return datetime.combine(self.start, time(), tzinfo=timezone.utc)

    @property
    def end_at(self) -> datetime:
        """The first instant after the period (UTC)."""
        return datetime.combine(self.end, time(), tzinfo=timezone.utc)

    @property
    def days(self) -> int:
        """How many days the period covers."""
        return (self.end - self.start).days

    def previous(self) -> "Period":
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
    return datetime.now(timezone.utc).date()


def day_of(day: date) -> Period:
    """One UTC day."""
    return Period("today" if day == utc_today() else "day", day, day + timedelta(days=1))


def month_of(day: date) -> Period:
    """The calendar month containing ``day``."""
    first = day.replace(day=1)
    following = (first + timedelta(days=32)).replace(day=1)
    return Period("month", first, following)


def parse_day(raw: str, name: str) -> date:
    """``YYYY-MM-DD`` as a date, or a QueryError naming the parameter ``name``."""
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise QueryError(f"{name} must be a date like 2025-01-31, got {raw!r}") from None


def between(first: date, last: date) -> Period:
    """Days ``first`` to ``last``, both inclusive."""
    if last < first:
        raise QueryError("to must not be before from")
    period = Period("range", first, last + timedelta(days=1))
    if period.days > MAX_DAYS:
        raise QueryError(f"a range may cover at most {MAX_DAYS} days")
    return period


def from_query(query: dict[str, str] | object, today: date | None = None) -> Period:
    """``period=today|month|range`` (``range`` needs ``from`` and ``to``, inclusive dates)."""
    get = query.get  # type: ignore[attr-defined]
    today = today or utc_today()
    kind = get("period") or "today"
    if kind == "today":
        return day_of(today)
    if kind == "month":
        return month_of(today)
    if kind == "range":
        if not get("from") or not get("to"):
            raise QueryError("period=range needs from and to (YYYY-MM-DD, inclusive)")
        return between(parse_day(get("from"), "from"), parse_day(get("to"), "to"))
    raise QueryError(f"period must be today, month or range, got {kind!r}")
