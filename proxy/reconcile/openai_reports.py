"""OpenAI's organization Usage API (completions, which counts Responses traffic, and
embeddings) and Costs API, read into per day and model figures.

Documented shapes: ``GET /v1/organization/usage/{completions,embeddings}`` and
``GET /v1/organization/costs`` take ``start_time`` (inclusive) / ``end_time`` (exclusive) in
Unix seconds, ``bucket_width=1d``, ``group_by``, ``project_ids``, ``api_key_ids`` (usage only),
``limit`` and ``page``; they answer ``{"data": [{"start_time", "end_time", "results": [...]}],
"has_more", "next_page"}``. A usage result's ``input_tokens`` includes cached and
cache-write tokens; a cost result's ``amount`` is ``{"value": <dollars>, "currency": "usd"}``.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from fractions import Fraction

import aiohttp

from .access import ReportAccess
from .compare import Books, Figures, model_family
from .pages import ReportError, amount, buckets, count, midnight, to_micro
from .report import UsageKind

KINDS = (
    UsageKind.REQUESTS,
    UsageKind.INPUT_TOKENS,
    UsageKind.CACHED_INPUT_TOKENS,
    UsageKind.CACHE_WRITE_TOKENS,
    UsageKind.OUTPUT_TOKENS,
)
_LIMIT = "31"  # the documented maximum of 1d buckets per page


def _day(bucket: dict[str, object]) -> date:
    start = bucket["start_time"]
    if not isinstance(start, int):
        raise ReportError(f"bucket start_time {start!r} is not Unix seconds")
    return datetime.fromtimestamp(start, UTC).date()


def _figures(result: dict[str, object]) -> Figures:
    def of(name: str) -> int:
        return count(result.get(name), name)

    cached = of("input_cached_tokens")
    writes = of("input_cache_write_tokens") + of("input_cache_write_12h_tokens")
    uncached = of("input_tokens") - cached - writes  # input_tokens includes the cached and written ones
    if uncached < 0:
        raise ReportError(f"input_tokens {of('input_tokens')} is below its cached and cache-write tokens")
    return Figures(
        requests=of("num_model_requests"),
        input_tokens=uncached,
        cached_input_tokens=cached,
        cache_write_tokens=writes,
        output_tokens=of("output_tokens"),
    )


def _line_model(line_item: str | None, models: set[str]) -> str | None:
    """The model a cost line is for, when it names one either side has usage of
    ("gpt-4o-mini-2024-07-18, input"); else None (the day's costs are then compared as a whole)."""
    name = model_family((line_item or "").partition(",")[0].strip())
    return name if name in models else None


async def openai_books(session: aiohttp.ClientSession, access: ReportAccess, start: date, end: date, ours: Books) -> Books:
    """OpenAI's figures of days ``start``..``end`` in the scope of ``access``."""
    headers = {"Authorization": f"Bearer {access.admin_key}"}
    window = [
        ("start_time", str(int(midnight(start).timestamp()))),
        ("end_time", str(int(midnight(end + timedelta(days=1)).timestamp()))),
        ("bucket_width", "1d"),
        ("limit", _LIMIT),
    ]
    projects = [("project_ids", access.scope_id)] if access.scope_id else []
    keys = [("api_key_ids", access.api_key_id)] if access.api_key_id else []
    theirs = Books()
    for endpoint in ("completions", "embeddings"):
        url = f"{access.base_url}/v1/organization/usage/{endpoint}"
        async for bucket in buckets(session, url, [*window, ("group_by", "model"), *projects, *keys], headers):
            for result in bucket["results"]:
                theirs.add_usage(_day(bucket), result.get("model") or "(no model)", _figures(result))
    costs: dict[tuple[date, str | None], Fraction] = {}
    url = f"{access.base_url}/v1/organization/costs"
    async for bucket in buckets(session, url, [*window, ("group_by", "line_item"), *projects], headers):
        day = _day(bucket)
        models = ours.models_on(day) | theirs.models_on(day)
        for result in bucket["results"]:
            cost = result.get("amount") or {}
            if str(cost.get("currency", "usd")).lower() != "usd":
                raise ReportError(f"{url}: cost in {cost.get('currency')!r}, not usd")
            key = (day, _line_model(result.get("line_item"), models))
            costs[key] = costs.get(key, Fraction(0)) + amount(cost.get("value", 0), "amount.value")
    for (day, model), dollars in costs.items():
        theirs.add_cost(day, model, to_micro(dollars))
    return theirs
