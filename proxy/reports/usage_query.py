"""Usage reports from the daily rollup: grouped by day, user, key, provider, model or tier,
filtered by the same, over a range of UTC days, paginated by limit and offset."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from ..money import micro_usd
from .figures import Queryable
from .periods import QueryError, parse_day

# API name -> usage_daily column. Only these ever reach the SQL text.
DIMENSIONS = {"day": "day", "user": "user_id", "key": "key_id", "provider": "provider", "model": "model", "tier": "tier"}
MAX_LIMIT = 1000
MAX_OFFSET = 10**9
DEFAULT_LIMIT = 100


@dataclass(frozen=True)
class UsageQuery:
    """What to report: ``group`` dimensions, equality ``filters``, days ``first``..``last`` inclusive."""

    group: tuple[str, ...] = ("day",)
    filters: Mapping[str, str] = field(default_factory=dict)
    first: date | None = None
    last: date | None = None
    limit: int = DEFAULT_LIMIT
    offset: int = 0


def _int(raw: str | None, name: str, default: int, low: int, high: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise QueryError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise QueryError(f"{name} must be between {low} and {high}")
    return value


def paging(query: Mapping[str, str], default_limit: int = DEFAULT_LIMIT) -> tuple[int, int]:
    """``limit`` (1..MAX_LIMIT) and ``offset`` from a query string."""
    return (
        _int(query.get("limit"), "limit", default_limit, 1, MAX_LIMIT),
        _int(query.get("offset"), "offset", 0, 0, MAX_OFFSET),
    )


def parse(
    query: Mapping[str, str], filters: tuple[str, ...] = tuple(DIMENSIONS), group: tuple[str, ...] | None = None
) -> UsageQuery:
    """Read ``group``, the filters allowed, ``from``/``to``, ``limit`` and ``offset`` from a query
    string; ``group`` given here is fixed and the query's is ignored. Raises QueryError."""
    if group is None:
        group = tuple(g for g in (query.get("group") or "day").split(",") if g)
        unknown = [g for g in group if g not in DIMENSIONS]
        if unknown or not group:
            raise QueryError(f"group must be a comma-separated list of {', '.join(DIMENSIONS)}")
    first = parse_day(query["from"], "from") if query.get("from") else None
    last = parse_day(query["to"], "to") if query.get("to") else None
    if first and last and last < first:
        raise QueryError("to must not be before from")
    limit, offset = paging(query)
    return UsageQuery(
        group=tuple(dict.fromkeys(group)),
        filters={name: query[name] for name in filters if query.get(name)},
        first=first,
        last=last,
        limit=limit,
        offset=offset,
    )


def to_sql(q: UsageQuery) -> tuple[str, list[Any]]:
    """The SELECT over ``usage_daily`` for ``q`` and its arguments (limit + 1 rows, to see if more follow)."""
    args: list[Any] = []
    where = []
    for name, value in q.filters.items():
        args.append(value)
        where.append(f"{DIMENSIONS[name]} = ${len(args)}")
    if q.first is not None:
        args.append(q.first)
        where.append(f"day >= ${len(args)}")
    if q.last is not None:
        args.append(q.last + timedelta(days=1))
        where.append(f"day < ${len(args)}")
    columns = [f"{DIMENSIONS[g]} AS {g}" for g in q.group]
    order = [f"{DIMENSIONS[g]} DESC" if g == "day" else DIMENSIONS[g] for g in q.group]
    args += [q.limit + 1, q.offset]
    sql = (
        f"SELECT {', '.join(columns)}, sum(requests)::bigint AS requests, sum(input_tokens)::bigint AS input_tokens,"
        " sum(cached_input_tokens)::bigint AS cached_input_tokens, sum(output_tokens)::bigint AS output_tokens,"
        " sum(cost_micro)::bigint AS cost_micro FROM usage_daily"
        + (f" WHERE {' AND '.join(where)}" if where else "")
        + f" GROUP BY {', '.join(DIMENSIONS[g] for g in q.group)} ORDER BY {', '.join(order)}"
        + f" LIMIT ${len(args) - 1} OFFSET ${len(args)}"
    )
    return sql, args


async def run(db: Queryable, q: UsageQuery) -> dict[str, Any]:
    """One page of the report: ``rows`` (each with ``tokens`` and ``cost_usd``) and ``next_offset``."""
    sql, args = to_sql(q)
    found = await db.fetch(sql, *args)
    rows = []
    for record in found[: q.limit]:
        row = dict(record)
        if "day" in row:
            row["day"] = row["day"].isoformat()
        row["tokens"] = row["input_tokens"] + row["output_tokens"]
        row["cost_usd"] = micro_usd(row["cost_micro"])
        rows.append(row)
    return {
        "group": list(q.group),
        "rows": rows,
        "limit": q.limit,
        "offset": q.offset,
        "next_offset": q.offset + q.limit if len(found) > q.limit else None,
    }
