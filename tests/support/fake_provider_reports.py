"""Local fakes of the providers' own usage and cost reports, answering in their documented
shapes, a few buckets per page, and the figures they hold: derived from what a mock
upstream reported for each request, priced at pricing.yaml's list prices.

OpenAI (``/v1/organization/usage/completions``, ``.../usage/embeddings``,
``/v1/organization/costs``): buckets ``{"object": "bucket", "start_time", "end_time",
"results"}``; usage results with ``input_tokens`` (cached and cache writes included),
``input_cached_tokens``, ``output_tokens``, ``num_model_requests``; cost results with
``amount: {"value", "currency": "usd"}`` and a ``line_item`` ("gpt-4o, output").

Anthropic (``/v1/organizations/usage_report/messages``, ``/v1/organizations/cost_report``):
buckets ``{"starting_at", "ending_at", "results"}``; usage results with
``uncached_input_tokens``, ``cache_read_input_tokens``, ``cache_creation`` by TTL and
``output_tokens``; cost results with ``amount`` in cents as a decimal string, ``currency``
"USD", ``model``, ``token_type`` and ``workspace_id``.

Models are named by their dated snapshot (:data:`SNAPSHOTS`), as the providers do.
Every request is recorded in ``app[SEEN]`` (path, query pairs, headers). A report holds the
buckets of the days asked for (``start_time``/``end_time``, ``starting_at``/``ending_at``);
a request that asks for a day in ``app[REFUSED]`` is refused (HTTP 500), as in an outage.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from .mock_upstreams import DEFAULT_USAGE, Received

SEEN = web.AppKey("seen", list)
REFUSED = web.AppKey("refused", set)
#: the snapshot a provider names in its reports for the id a client sent
SNAPSHOTS = {"gpt-4o-mini": "gpt-4o-mini-2024-07-18", "claude-haiku-4-5": "claude-haiku-4-5-20251001"}
#: the workspace the gateway's key is in, and another one whose costs must not count
WORKSPACE, OTHER_WORKSPACE = "wrkspc_gateway", "wrkspc_other"


@dataclass(frozen=True)
class Seen:
    """One request a fake report API received."""

    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]


@dataclass
class ModelDay:
    """What a provider reports for one model on one day: requests, tokens, and the dollars of each
    priced token type (OpenAI line item / Anthropic token_type)."""

    requests: int = 0
    uncached: int = 0
    cached: int = 0
    write_5m: int = 0
    write_1h: int = 0
    output: int = 0
    dollars: dict[str, Decimal] = field(default_factory=dict)

    @property
    def cost_micro(self) -> int:
        """The day's cost in µ$ (the fakes' prices make it whole)."""
        total = sum(self.dollars.values(), Decimal(0)) * 1_000_000
        assert total == total.to_integral_value(), total
        return int(total)


#: what a provider reports, by (UTC day, model)
Report = dict[tuple[date, str], ModelDay]


def _usage_header(sent: Received) -> dict[str, int]:
    usage = dict(DEFAULT_USAGE)
    header = {k.lower(): v for k, v in sent.headers.items()}.get("x-mock-usage", "")
    for part in filter(None, header.split(",")):
        name, _, value = part.partition("=")
        usage[name.strip()] = int(value)
    return usage


def _prices(pricing_file: Path, provider: str, model: str) -> dict[str, Decimal]:
    entry = yaml.safe_load(pricing_file.read_text())["providers"][provider]["models"][model]
    return {name: Decimal(str(value)) for name, value in entry.items() if name.endswith("_per_1m")}


def _add(report: Report, day: date, model: str, tokens: dict[str, int], prices: dict[str, Decimal]) -> None:
    """One request: its tokens by type (``uncached``, ``cached``, ``write_5m``, ``write_1h``, ``output``)."""
    row = report.setdefault((day, model), ModelDay())
    row.requests += 1
    price_of = {
        "uncached": prices["input_per_1m"],
        "cached": prices.get("cached_input_per_1m", prices["input_per_1m"]),
        "write_5m": prices.get("cache_write_per_1m", prices["input_per_1m"]),
        "write_1h": prices.get("cache_write_1h_per_1m", prices["input_per_1m"]),
        "output": prices["output_per_1m"],
    }
    for kind, count in tokens.items():
        setattr(row, kind, getattr(row, kind) + count)
        if count:
            row.dollars[kind] = row.dollars.get(kind, Decimal(0)) + count * price_of[kind] / 1_000_000


def openai_report(received: list[tuple[date, Received]], pricing_file: Path) -> Report:
    """OpenAI's report of the requests its mock upstream answered, each on the day given."""
    report: Report = {}
    for day, sent in received:
        model, usage = sent.json()["model"], _usage_header(sent)
        if sent.path.endswith("/embeddings"):
            tokens = {"uncached": usage["prompt"]}
        else:  # the mock's prompt counts its cached tokens too, as OpenAI's does
            tokens = {"uncached": usage["prompt"] - usage["cached"], "cached": usage["cached"], "output": usage["completion"]}
        _add(report, day, model, tokens, _prices(pricing_file, "openai", model))
    return report


def anthropic_report(received: list[tuple[date, Received]], pricing_file: Path) -> Report:
    """Anthropic's report of the messages its mock upstream answered, each on the day given."""
    report: Report = {}
    for day, sent in received:
        model, usage = sent.json()["model"], _usage_header(sent)
        tokens = {
            "uncached": usage["prompt"],
            "cached": usage["cached"],
            "write_5m": usage.get("write5m", 0),
            "write_1h": usage.get("write1h", 0),
            "output": usage["completion"],
        }
        _add(report, day, model, tokens, _prices(pricing_file, "anthropic", model))
    return report


def planted(report: Report, *, drop_day: date, more_output: tuple[date, str, int], cent_on: tuple[date, str]) -> Report:
    """``report`` with a missing day, a model with more output tokens and a cost a cent higher."""
    changed = {key: replace(row, dollars=dict(row.dollars)) for key, row in report.items() if key[0] != drop_day}
    day, model, extra = more_output
    changed[(day, model)].output += extra
    dollars = changed[cent_on].dollars
    dollars["output"] = dollars.get("output", Decimal(0)) + Decimal("0.01")
    return changed


# the report APIs ----------------------------------------------------------------------------
def _days(report: Report) -> list[date]:
    return sorted({day for day, _ in report})


def _start(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


def _rfc3339(day: date) -> str:
    return _start(day).isoformat().replace("+00:00", "Z")


def _openai_usage(report: Report, embeddings: bool) -> list[dict[str, Any]]:
    kind = "embeddings" if embeddings else "completions"
    buckets = []
    for day in _days(report):
        results = []
        for (d, model), row in sorted(report.items()):
            if d != day or model.startswith("text-embedding") != embeddings:
                continue
            result = {
                "object": f"organization.usage.{kind}.result",
                "input_tokens": row.uncached + row.cached + row.write_5m + row.write_1h,
                "num_model_requests": row.requests,
                "model": SNAPSHOTS.get(model, model),
                "project_id": None,
                "user_id": None,
                "api_key_id": None,
            }
            if not embeddings:
                result |= {"input_cached_tokens": row.cached, "output_tokens": row.output, "batch": None, "service_tier": None}
            results.append(result)
        start = int(_start(day).timestamp())
        buckets.append({"object": "bucket", "start_time": start, "end_time": start + 86400, "results": results})
    return buckets


_OPENAI_LINE = {"uncached": "input", "cached": "cached input", "output": "output"}


def _openai_costs(report: Report) -> list[dict[str, Any]]:
    buckets = []
    for day in _days(report):
        results = [
            {
                "object": "organization.costs.result",
                # a JSON number, as documented: the shortest float repr of these amounts is exact
                "amount": {"value": float(amount), "currency": "usd"},
                "line_item": f"{SNAPSHOTS.get(model, model)}, {_OPENAI_LINE[kind]}",
                "project_id": None,
            }
            for (d, model), row in sorted(report.items())
            if d == day
            for kind, amount in sorted(row.dollars.items())
        ]
        start = int(_start(day).timestamp())
        buckets.append({"object": "bucket", "start_time": start, "end_time": start + 86400, "results": results})
    return buckets


def _anthropic_usage(report: Report) -> list[dict[str, Any]]:
    return [
        {
            "starting_at": _rfc3339(day),
            "ending_at": _rfc3339(day + timedelta(days=1)),
            "results": [
                {
                    "uncached_input_tokens": row.uncached,
                    "cache_read_input_tokens": row.cached,
                    "cache_creation": {"ephemeral_5m_input_tokens": row.write_5m, "ephemeral_1h_input_tokens": row.write_1h},
                    "output_tokens": row.output,
                    "server_tool_use": {"web_search_requests": 0},
                    "model": SNAPSHOTS.get(model, model),
                    "api_key_id": None,
                    "workspace_id": None,
                    "service_tier": None,
                    "context_window": None,
                }
                for (d, model), row in sorted(report.items())
                if d == day
            ],
        }
        for day in _days(report)
    ]


_ANTHROPIC_TOKEN_TYPE = {
    "uncached": "uncached_input_tokens",
    "cached": "cache_read_input_tokens",
    "write_5m": "cache_creation.ephemeral_5m_input_tokens",
    "write_1h": "cache_creation.ephemeral_1h_input_tokens",
    "output": "output_tokens",
}


def _anthropic_cost(model: str, kind: str, dollars: Decimal, workspace: str) -> dict[str, Any]:
    token_type = _ANTHROPIC_TOKEN_TYPE[kind]
    return {
        "amount": str(dollars * 100),  # cents, as a decimal string
        "currency": "USD",
        "cost_type": "tokens",
        "description": f"{SNAPSHOTS.get(model, model)} {token_type}",
        "model": SNAPSHOTS.get(model, model),
        "token_type": token_type,
        "service_tier": "standard",
        "context_window": "0-200k",
        "workspace_id": workspace,
    }


def _anthropic_costs(report: Report) -> list[dict[str, Any]]:
    buckets = []
    for day in _days(report):
        rows = [(model, row) for (d, model), row in sorted(report.items()) if d == day]
        results = [
            _anthropic_cost(model, kind, amount, WORKSPACE) for model, row in rows for kind, amount in sorted(row.dollars.items())
        ]
        # another workspace of the organization: the gateway's reconciliation must leave it out
        results.append(_anthropic_cost(rows[0][0], "output", Decimal("1.50"), OTHER_WORKSPACE))
        buckets.append({"starting_at": _rfc3339(day), "ending_at": _rfc3339(day + timedelta(days=1)), "results": results})
    return buckets


def _asked(query: Any) -> tuple[datetime, datetime] | None:
    """The range a report request asks for: OpenAI's unix seconds, or Anthropic's RFC 3339."""
    if "start_time" in query:
        return datetime.fromtimestamp(int(query["start_time"]), UTC), datetime.fromtimestamp(int(query["end_time"]), UTC)
    if "starting_at" in query:
        return datetime.fromisoformat(query["starting_at"]), datetime.fromisoformat(query["ending_at"])
    return None


def _bucket_start(bucket: dict[str, Any]) -> datetime:
    if "start_time" in bucket:
        return datetime.fromtimestamp(bucket["start_time"], UTC)
    return datetime.fromisoformat(bucket["starting_at"])


def _paged(buckets: list[dict[str, Any]], page_size: int) -> web.Handler:
    async def handler(request: web.Request) -> web.Response:
        request.app[SEEN].append(Seen(request.path, list(request.query.items()), dict(request.headers)))
        asked = _asked(request.query)
        selected = buckets
        if asked is not None:
            since, until = asked
            if any(since <= _start(day) < until for day in request.app[REFUSED]):
                return web.json_response({"error": {"message": "the report is not available"}}, status=500)
            selected = [bucket for bucket in buckets if since <= _bucket_start(bucket) < until]
        at = int(request.query.get("page", "page_0").removeprefix("page_"))
        more = at + page_size < len(selected)
        body = {"data": selected[at : at + page_size], "has_more": more, "next_page": f"page_{at + page_size}" if more else None}
        if "start_time" in request.query:
            body["object"] = "page"
        return web.json_response(body)

    return handler


def openai_reports_app(report: Report, page_size: int = 1) -> web.Application:
    """OpenAI's Usage and Costs APIs holding ``report``."""
    app = web.Application()
    app[SEEN] = []
    app[REFUSED] = set()
    app.router.add_get("/v1/organization/usage/completions", _paged(_openai_usage(report, embeddings=False), page_size))
    app.router.add_get("/v1/organization/usage/embeddings", _paged(_openai_usage(report, embeddings=True), page_size))
    app.router.add_get("/v1/organization/costs", _paged(_openai_costs(report), page_size))
    return app


def anthropic_reports_app(report: Report, page_size: int = 1) -> web.Application:
    """Anthropic's usage and cost reports holding ``report``."""
    app = web.Application()
    app[SEEN] = []
    app[REFUSED] = set()
    app.router.add_get("/v1/organizations/usage_report/messages", _paged(_anthropic_usage(report), page_size))
    app.router.add_get("/v1/organizations/cost_report", _paged(_anthropic_costs(report), page_size))
    return app
