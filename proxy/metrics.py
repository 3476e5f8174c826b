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
UNPRICED_TIER = Counter(
    "costproxy_unpriced_service_tier_total",
    "Requests the provider served at priority on a model pricing.yaml gives no priority prices (charged at standard prices).",
    ["provider", "model", "service_tier"],
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
ACTIVE_STREAMS = Gauge("costproxy_active_streams", "Streaming responses in flight.", ["provider"], multiprocess_mode="livesum")
HOLDS_VOIDED = Counter("costproxy_holds_voided_total", "Credit holds voided, by reason.", ["reason"])
USAGE_LOG_LAG = Gauge(
    "costproxy_usage_log_lag_events", "Usage events written to Redis but not yet in Postgres.", multiprocess_mode="max"
)
USAGE_LOG_WRITTEN = Counter("costproxy_usage_log_written_total", "Ledger events the worker wrote to Postgres.")
USAGE_LOG_ERRORS = Counter("costproxy_usage_log_errors_total", "Failed attempts to write usage events to Postgres.")
USAGE_LOG_UNREPLICATED = Counter(
    "costproxy_usage_log_unreplicated_total",
    "Batches the usage log held back because no replica acknowledged them in time (a failover, a lagging replica).",
)
CONFIG_RELOAD_OK = Gauge(
    "costproxy_config_last_reload_ok",
    "1 if the last pricing/tiers load succeeded, 0 if an edit was rejected.",
    multiprocess_mode="livemin",
)
CONFIG_RELOADS = Counter("costproxy_config_reloads_total", "Config reloads by result (ok, error).", ["result"])


@lru_cache(maxsize=8192)
def labelled(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, cached: the request path records a dozen samples and
    prometheus_client's own label lookup is several times slower than this."""
    return metric.labels(*values)


HOLDS_EXPIRED = Counter(
    "costproxy_holds_expired_total",
    "Holds whose proxy stopped renewing them, by outcome: posted (at their last recorded progress) or voided.",
    ["outcome"],
)
HEARTBEAT_ERRORS = Counter("costproxy_heartbeat_errors_total", "Heartbeats of live holds that Redis did not take.")
SETTLEMENTS_RESENT = Counter(
    "costproxy_settlements_resent_total",
    "Settlements sent again after a Redis failure, by outcome (applied: the first was lost, as in a failover).",
    ["outcome"],
)
SPOOLED = Counter("costproxy_spooled_total", "Settlements kept in the local spool because Redis did not take them.")
SPOOL_PENDING = Gauge(
    "costproxy_spool_pending", "Settlements in this process's spool waiting for Redis.", multiprocess_mode="livesum"
)
CONNECTIONS_CUT = Counter(
    "costproxy_connections_cut_total",
    "Client connections closed by the server's guards: header_timeout (no complete request head in time), connection_cap.",
    ["reason"],
)
LEDGER_CHECK_DIFFERENCES = Gauge(
    "costproxy_ledger_check_differences",
    "Differences between Redis and the Postgres ledger found by the worker's last scheduled ledger check (0: they agree).",
    multiprocess_mode="max",
)
LEDGER_CHECK_ACCOUNTS = Gauge(
    "costproxy_ledger_check_accounts", "Accounts the last scheduled ledger check compared.", multiprocess_mode="max"
)
LEDGER_CHECK_TIME = Gauge(
    "costproxy_ledger_check_last_run_timestamp_seconds",
    "When the worker's last scheduled ledger check finished (Unix time).",
    multiprocess_mode="max",
)
RECONCILE_RATIO = Gauge(
    "costproxy_reconcile_difference_ratio",
    "Largest difference between the usage log and the provider's own report in the worker's last daily "
    "reconciliation, as a share of the provider's figure, by provider and kind (0: they agree; +Inf: the "
    "provider reports nothing where we have usage).",
    ["provider", "kind"],
    multiprocess_mode="max",
)
RECONCILE_LAST_RUN = Gauge(
    "costproxy_reconcile_last_run_timestamp_seconds",
    "When the worker last stored a daily reconciliation of the provider (Unix time).",
    ["provider"],
    multiprocess_mode="max",
)
RECONCILE_TOLERANCE = Gauge(
    "costproxy_reconcile_tolerance_ratio",
    "RECONCILE_TOLERANCE: the share beyond which a reconciliation difference fails (the alert compares with it).",
    multiprocess_mode="max",
)
