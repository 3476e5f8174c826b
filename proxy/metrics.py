"""Prometheus collectors exported on ``GET /metrics`` (names listed in the README)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

REQUESTS = Counter(
    "costproxy_requests_total",
    "Proxied requests by provider, model, tier and HTTP status returned to the client.",
    ["provider", "model", "tier", "status"],
)
REFUSALS = Counter(
    "costproxy_refusals_total",
    "Requests refused by the proxy itself, by provider and reason.",
    ["provider", "reason"],
)
TOKENS = Counter(
    "costproxy_tokens_total",
    "Tokens billed, by provider, model, tier and direction (input, output).",
    ["provider", "model", "tier", "direction"],
)
COST = Counter(
    "costproxy_cost_micro_usd_total",
    "Upstream cost charged to accounts, in micro-dollars (1 credit = 10,000).",
    ["provider", "model", "tier"],
)
ESTIMATED = Counter(
    "costproxy_estimated_charges_total",
    "Charges made from an estimate because the upstream never reported usage.",
    ["provider"],
)
UPSTREAM_LATENCY = Histogram(
    "costproxy_upstream_seconds",
    "Time from sending the request upstream to the last byte of its response.",
    ["provider"],
    buckets=_LATENCY_BUCKETS,
)
OVERHEAD = Histogram(
    "costproxy_overhead_seconds",
    "Time the proxy adds to a request: total handling time minus upstream time.",
    ["provider"],
    buckets=_OVERHEAD_BUCKETS,
)
ACTIVE_STREAMS = Gauge("costproxy_active_streams", "Streaming responses in flight.", ["provider"])
HOLDS_VOIDED = Counter("costproxy_holds_voided_total", "Credit holds voided, by reason.", ["reason"])
USAGE_LOG_LAG = Gauge("costproxy_usage_log_lag_events", "Usage events written to Redis but not yet in Postgres.")
USAGE_LOG_WRITTEN = Counter("costproxy_usage_log_written_total", "Ledger events the worker wrote to Postgres.")
USAGE_LOG_ERRORS = Counter("costproxy_usage_log_errors_total", "Failed attempts to write usage events to Postgres.")
CONFIG_RELOAD_OK = Gauge(
    "costproxy_config_last_reload_ok", "1 if the last pricing/tiers load succeeded, 0 if an edit was rejected."
)
CONFIG_RELOADS = Counter("costproxy_config_reloads_total", "Config reloads by result (ok, error).", ["result"])


@lru_cache(maxsize=8192)
def labelled(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, cached: the request path records a dozen samples and
    prometheus_client's own label lookup is several times slower than this."""
    return metric.labels(*values)
