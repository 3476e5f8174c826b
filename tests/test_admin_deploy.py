"""deploy/: the Grafana dashboard and the Prometheus rules use only metrics costproxy
exports, the scrape config covers proxy and worker, and promtool (when installed)
accepts the rules and passes their unit tests."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import proxy.metrics
import proxy.reports.gauges  # noqa: F401 - registers the business gauges

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
FROM_ELSEWHERE = {"up", "probe_success"}  # Prometheus' own and the blackbox exporter's


def exported() -> set[str]:
    names = set()
    for family in REGISTRY.collect():
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(costproxy_[a-z_]+|up|probe_success)\b(?=\s*[{\[)]|\s*$|\s*[<>=!])", expr))


def test_grafana_dashboard_uses_exported_metrics_only():
    dashboard = json.loads((DEPLOY / "grafana" / "costproxy-dashboard.json").read_text())
    known = exported()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 25
    used = set().union(*(metric_names(e) for e in exprs))
    assert used and used <= known, used - known
    for required in (
        "costproxy_requests_total",
        "costproxy_refusals_total",
        "costproxy_cost_micro_usd_total",
        "costproxy_overhead_seconds_bucket",
        "costproxy_usage_log_lag_events",
        "costproxy_margin_ratio",
    ):
        assert required in used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "provider", "tier"}


def test_alert_rules_cover_the_issue_and_use_exported_metrics():
    rules = [r for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {
        "CostproxyUpstreamErrorRate",
        "CostproxyUsageLogLag",
        "CostproxyRedisUnreachable",
        "CostproxyPostgresUnreachable",
        "CostproxyMarginBelowTarget",
        "CostproxyLedgerMismatch",  # the scheduled ledger check found differences
        "CostproxyLedgerCheckStale",  # no ledger check has finished lately
    } <= names
    by_name = {r["alert"]: r for r in rules}
    assert "costproxy_ledger_check_differences" in metric_names(by_name["CostproxyLedgerMismatch"]["expr"])
    assert by_name["CostproxyLedgerMismatch"]["labels"]["severity"] == "critical"
    assert "costproxy_ledger_check_last_run_timestamp_seconds" in metric_names(by_name["CostproxyLedgerCheckStale"]["expr"])
    known = exported() | FROM_ELSEWHERE
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
        assert metric_names(rule["expr"]) <= known, rule["alert"]


def test_scrape_config_covers_proxy_and_worker():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets["costproxy-proxy"] == ["127.0.0.1:8080"] and targets["costproxy-worker"] == ["127.0.0.1:9101"]
    assert config["rule_files"] == ["alerts.yml"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_accepts_the_rules_and_their_unit_tests():
    folder = DEPLOY / "prometheus"
    for command in (
        ["check", "rules", "alerts.yml"],
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "alerts_test.yml"],
    ):
        done = subprocess.run(["promtool", *command], cwd=folder, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
