"""Anthropic's Admin API usage and cost reports, read into per day and model figures.

Documented shapes: ``GET /v1/organizations/usage_report/messages`` and
``GET /v1/organizations/cost_report`` take ``starting_at`` (inclusive) / ``ending_at``
(exclusive) as RFC 3339, ``bucket_width=1d``, ``group_by[]``, ``limit`` and ``page``; the
usage report also ``workspace_ids[]`` and ``api_key_ids[]``. They answer ``{"data":
[{"starting_at", "ending_at", "results": [...]}], "has_more", "next_page"}``. A usage result
carries ``uncached_input_tokens``, ``cache_read_input_tokens``, ``cache_creation``
(``ephemeral_5m_input_tokens``, ``ephemeral_1h_input_tokens``) and ``output_tokens`` but no
request count; a cost result's ``amount`` is a decimal string in cents ("123.45" is $1.23),
with ``model`` set on token costs when grouped by description.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from fractions import Fraction
from typing import Any

import aiohttp

from ..money import MICRO_PER_CENT
from .access import ReportAccess
from .compare import Books, Figures
from .pages import ReportError, amount, buckets, count, midnight, to_micro
from .report import UsageKind

KINDS = (UsageKind.INPUT_TOKENS, UsageKind.CACHED_INPUT_TOKENS, UsageKind.CACHE_WRITE_TOKENS, UsageKind.OUTPUT_TOKENS)
NOTES = ("Anthropic's usage report counts no requests: requests are not compared",)
_VERSION = "2023-06-01"
_LIMIT = "31"  # the documented maximum of 1d buckets per page


def _day(bucket: dict[str, Any]) -> date:
    try:
        return datetime.fromisoformat(bucket["starting_at"]).date()
    except (KeyError, TypeError, ValueError):
        raise ReportError(f"bucket starting_at {bucket.get('starting_at')!r} is not RFC 3339") from None


def _figures(result: dict[str, Any]) -> Figures:
    writes = result.get("cache_creation") or {}
    if not isinstance(writes, dict):
        raise ReportError(f"cache_creation {writes!r} is not an object")
    return Figures(
        input_tokens=count(result.get("uncached_input_tokens"), "uncached_input_tokens"),
        cached_input_tokens=count(result.get("cache_read_input_tokens"), "cache_read_input_tokens"),
        cache_write_tokens=sum(count(writes.get(n), n) for n in ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens")),
        output_tokens=count(result.get("output_tokens"), "output_tokens"),
    )


async def anthropic_books(session: aiohttp.ClientSession, access: ReportAccess, start: date, end: date, ours: Books) -> Books:
    """Anthropic's figures of days ``start``..``end`` in the scope of ``access``.

    The cost report has no key filter: with a workspace set, its costs are that workspace's.
    """
    del ours  # cost lines name their model themselves
    headers = {"x-api-key": access.admin_key, "anthropic-version": _VERSION}
    window = [
        ("starting_at", midnight(start).isoformat().replace("+00:00", "Z")),
        ("ending_at", midnight(end + timedelta(days=1)).isoformat().replace("+00:00", "Z")),
        ("bucket_width", "1d"),
        ("limit", _LIMIT),
    ]
    scope = [("workspace_ids[]", access.scope_id)] if access.scope_id else []
    keys = [("api_key_ids[]", access.api_key_id)] if access.api_key_id else []
    theirs = Books()
    url = f"{access.base_url}/v1/organizations/usage_report/messages"
    async for bucket in buckets(session, url, [*window, ("group_by[]", "model"), *scope, *keys], headers):
        for result in bucket["results"]:
            theirs.add_usage(_day(bucket), result.get("model") or "(no model)", _figures(result))
    cents: dict[tuple[date, str | None], Fraction] = {}
    url = f"{access.base_url}/v1/organizations/cost_report"
    grouping = [("group_by[]", "description"), ("group_by[]", "workspace_id")]
    async for bucket in buckets(session, url, [*window, *grouping], headers):
        for result in bucket["results"]:
            if access.scope_id and result.get("workspace_id") != access.scope_id:
                continue
            if str(result.get("currency", "USD")).upper() != "USD":
                raise ReportError(f"{url}: cost in {result.get('currency')!r}, not USD")
            key = (_day(bucket), result.get("model"))
            cents[key] = cents.get(key, Fraction(0)) + amount(result.get("amount", "0"), "amount")
    for (day, model), total in cents.items():
        theirs.add_cost(day, model, to_micro(total, MICRO_PER_CENT))
    return theirs
