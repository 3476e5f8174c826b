"""Statistics and the report: percentiles, each cell's summary, every metered target against
the floor (and the targets' verdicts), the Markdown tables, and the JSON results file."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import ROOT

TARGET_RPS_RATIO, TARGET_ADDED_P50_MS = 0.70, 0.5

CellKey = tuple[str, int, str]  # (scenario, concurrency, target)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``sorted_values``, interpolated; None for no values."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict[str, float | None]:
    """p50, p90, p99, p99.9, mean and max of ``values``."""
    s = sorted(values)
    return {
        "p50": percentile(s, 0.50),
        "p90": percentile(s, 0.90),
        "p99": percentile(s, 0.99),
        "p999": percentile(s, 0.999),
        "mean": sum(s) / len(s) if s else None,
        "max": s[-1] if s else None,
    }


@dataclass
class Cell:
    """All rounds of one scenario × concurrency × target."""

    scenario: str
    concurrency: int
    target: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    ttfbs: list[float] = field(default_factory=list)

    def add(self, result: dict[str, Any], cores: dict[str, float], extra: dict[str, Any]) -> None:
        """Record one round: the load generator's ``result``, the cores used meanwhile, and ``extra`` fields."""
        self.latencies += result["latency_ms"]
        self.ttfbs += result["ttfb_ms"]
        rps = result["count"] / result["elapsed"] if result["elapsed"] else 0.0
        self.rounds.append(
            {
                "count": result["count"],
                "errors": result["errors"],
                "error_samples": result["error_samples"],
                "elapsed": result["elapsed"],
                "rps": rps,
                "p50": percentile(sorted(result["latency_ms"]), 0.5),
                "cores": cores,
                **extra,
            }
        )

    def summary(self) -> dict[str, Any]:
        """All rounds pooled: throughput, latency and TTFB percentiles, CPU per request, errors."""
        count = sum(r["count"] for r in self.rounds)
        elapsed = sum(r["elapsed"] for r in self.rounds)
        rps = count / elapsed if elapsed else 0.0
        cores: dict[str, float] = {}
        for r in self.rounds:  # time-weighted mean of cores used
            for k, v in r["cores"].items():
                cores[k] = cores.get(k, 0.0) + v * r["elapsed"] / elapsed
        return {
            "scenario": self.scenario,
            "concurrency": self.concurrency,
            "target": self.target,
            "requests": count,
            "errors": sum(r["errors"] for r in self.rounds),
            "error_samples": sorted({e for r in self.rounds for e in r["error_samples"]})[:5],
            "seconds": elapsed,
            "rps": rps,
            "rps_rounds": [r["rps"] for r in self.rounds],
            "latency_ms": summarize(self.latencies),
            "ttfb_ms": summarize(self.ttfbs) if self.ttfbs else None,
            "cores": cores,
            "cpu_us_per_request": {k: v / rps * 1e6 for k, v in cores.items()} if rps else {},
            "usage_lag_after": [r.get("usage_lag_after") for r in self.rounds if "usage_lag_after" in r],
            "drain_seconds": [r.get("drain_seconds") for r in self.rounds if "drain_seconds" in r],
        }


def summaries_in_order(cells: dict[CellKey, Cell], scenarios: list[str], targets: list[str]) -> dict[CellKey, dict[str, Any]]:
    """Every cell's summary, by scenario (in ``scenarios`` order), concurrency, then target (in ``targets`` order)."""
    order = sorted(cells, key=lambda k: (scenarios.index(k[0]), k[1], targets.index(k[2])))
    return {k: cells[k].summary() for k in order}


def comparisons(summaries: dict[CellKey, dict[str, Any]], proxy_targets: list[str]) -> list[dict[str, Any]]:
    """Each of ``proxy_targets`` against the floor (and the floor against direct), per scenario and
    concurrency, with the proxy's verdicts on the targets."""
    rows = []
    for (scenario, conc, target), s in summaries.items():
        if target not in proxy_targets:
            continue
        floor, direct = summaries[(scenario, conc, "floor")], summaries[(scenario, conc, "direct")]
        fl, pl, dl = floor["latency_ms"], s["latency_ms"], direct["latency_ms"]
        row = {
            "scenario": scenario,
            "concurrency": conc,
            "proxy": target,
            **rps_ratios(s, floor),
            "added_p50_ms": pl["p50"] - fl["p50"],
            "added_p99_ms": pl["p99"] - fl["p99"],
            "floor_minus_direct_p50_ms": fl["p50"] - dl["p50"],
            "floor_minus_direct_p99_ms": fl["p99"] - dl["p99"],
            "floor_rps_vs_direct": floor["rps"] / direct["rps"] if direct["rps"] else None,
        }
        if s["ttfb_ms"] and floor["ttfb_ms"]:
            row["added_ttfb_p50_ms"] = s["ttfb_ms"]["p50"] - floor["ttfb_ms"]["p50"]
        checks = {}
        if target.startswith("proxy"):  # the contract floor is a reference, not held to the targets
            if conc == 16:
                checks["rps_ratio>=0.70"] = row["rps_ratio"] is not None and row["rps_ratio"] >= TARGET_RPS_RATIO
            if conc == 1:
                checks["added_p50<0.5ms"] = row["added_p50_ms"] < TARGET_ADDED_P50_MS
        row["checks"] = checks
        rows.append(row)
    return rows


def rps_ratios(s: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Throughput of summary ``s`` over that of ``ref``: pooled (``rps_ratio``) and per round
    (``rps_ratio_rounds``; the two were measured in the same round, one after the other)."""
    return {
        "rps_ratio": s["rps"] / ref["rps"] if ref["rps"] else None,
        "rps_ratio_rounds": [a / b for a, b in zip(s["rps_rounds"], ref["rps_rounds"], strict=False) if b],
    }


def variants(summaries: dict[CellKey, dict[str, Any]], baselines: dict[str, str]) -> list[dict[str, Any]]:
    """Each variant target (a key of ``baselines``) against its baseline target, per scenario and
    concurrency: throughput and p50 / p99 latency ratios, and the latency differences in ms."""
    rows = []
    for (scenario, conc, target), s in summaries.items():
        ref = summaries.get((scenario, conc, baselines.get(target, "")))
        if ref is None:
            continue
        lat, ref_lat = s["latency_ms"], ref["latency_ms"]
        rows.append(
            {
                "scenario": scenario,
                "concurrency": conc,
                "target": target,
                "baseline": baselines[target],
                **rps_ratios(s, ref),
                **{f"{q}_ratio": _ratio(lat[q], ref_lat[q]) for q in ("p50", "p99")},
                **{f"{q}_delta_ms": lat[q] - ref_lat[q] for q in ("p50", "p99")},
            }
        )
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(v: float | None, digits: int = 2) -> str:
    """``v`` with ``digits`` decimals for the tables and the log; "–" for no value."""
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(summaries: dict[CellKey, dict[str, Any]], comps: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The run's Markdown tables: results per cell, the comparisons, CPU time per request at the highest concurrency."""
    out = [
        f"Run {meta['run_id']} on {meta['machine']}: {meta['duration']:g} s per scenario × concurrency × target "
        f"in {meta['rounds']} interleaved rounds; latency in ms (perf_counter, client side; streams: to the last byte). "
        f"Proxy code: {meta['git']['head']}"
        + (
            f" + {len(meta['git']['proxy_files_changed_since_head'])} uncommitted files"
            if meta["git"]["proxy_files_changed_since_head"]
            else ""
        )
        + ".",
        "",
        "| scenario | c | target | rps | p50 | p99 | TTFB p50 | TTFB p99 | errors |",
        "|---|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    for s in summaries.values():
        t = s["ttfb_ms"] or {}
        out.append(
            f"| {s['scenario']} | {s['concurrency']} | {s['target']} | {s['rps']:.0f} | {fmt(s['latency_ms']['p50'])} | "
            f"{fmt(s['latency_ms']['p99'])} | {fmt(t.get('p50'))} | {fmt(t.get('p99'))} | {s['errors']} |"
        )
    out += [
        "",
        "| scenario | c | target | rps target/floor (per round) | added p50 | added p99 | floor−direct p50 | "
        "floor−direct p99 | verdict |",
        "|---|--:|---|--:|--:|--:|--:|--:|---|",
    ]
    for c in comps:
        rounds = ", ".join(f"{r:.2f}" for r in c["rps_ratio_rounds"])
        verdict = ", ".join(f"{name}: {'PASS' if ok else 'FAIL'}" for name, ok in c["checks"].items()) or "–"
        out.append(
            f"| {c['scenario']} | {c['concurrency']} | {c['proxy']} | **{fmt(c['rps_ratio'])}** ({rounds}) | "
            f"**{fmt(c['added_p50_ms'], 3)}** | {fmt(c['added_p99_ms'], 3)} | {fmt(c['floor_minus_direct_p50_ms'], 3)} | "
            f"{fmt(c['floor_minus_direct_p99_ms'], 3)} | {verdict} |"
        )
    return "\n".join(out + _cpu_table(summaries))


def variants_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Markdown table of :func:`variants` rows, with its heading ("" without variants)."""
    if not rows:
        return ""
    out = [
        f"Variants against their baseline, measured in the same rounds ({_variants_legend(meta)}):",
        "",
        "| scenario | c | target ÷ baseline | rps ratio (per round) | p50 ratio | p99 ratio | Δ p50 ms | Δ p99 ms |",
        "|---|--:|---|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        rounds = ", ".join(f"{v:.2f}" for v in r["rps_ratio_rounds"])
        out.append(
            f"| {r['scenario']} | {r['concurrency']} | {r['target']} ÷ {r['baseline']} | **{fmt(r['rps_ratio'])}** ({rounds}) | "
            f"{fmt(r['p50_ratio'])} | {fmt(r['p99_ratio'])} | {fmt(r['p50_delta_ms'], 3)} | {fmt(r['p99_delta_ms'], 3)} |"
        )
    return "\n".join(out)


def _variants_legend(meta: dict[str, Any]) -> str:
    """What the variants differ in, for the heading of their table."""
    parts = [f"`proxy-{n}w`: `costproxy serve --workers {n}`" for n in meta.get("serve_workers", []) if n != 1]
    fsync = meta.get("appendfsync") or []
    if fsync:
        parts.append(f"every target but `proxy-fsync-*` with Redis `appendfsync {fsync[0]}`")
    if meta.get("worker") == "both":
        parts.append("`proxy-noworker`: the usage worker paused")
    return "; ".join(parts)


CPU_GROUPS = ("proxy", "floor", "mock", "loadgen", "worker", "redis", "postgres", "irq", "steal", "other")


def _cpu_groups(summaries: dict[CellKey, dict[str, Any]]) -> list[str]:
    """The CPU table's columns: the processes (and machine shares) measured, other proxies
    (``proxy-2w``, ...) after ``proxy``."""
    present = {k for s in summaries.values() for k in s["cpu_us_per_request"] if "." not in k and k != "machine"}
    order = [CPU_GROUPS[0], *sorted(present - set(CPU_GROUPS)), *CPU_GROUPS[1:]]
    return [g for g in order if g in present]


def _cpu_table(summaries: dict[CellKey, dict[str, Any]]) -> list[str]:
    top = max(s["concurrency"] for s in summaries.values())
    groups = _cpu_groups(summaries)
    out = [
        "",
        f"CPU time per request (µs) at c={top}, by process, and machine load (cores busy of {os.cpu_count()}):",
        "",
        "| scenario | target | " + " | ".join(groups) + " | machine cores |",
        "|---|---|" + "--:|" * (len(groups) + 1),
    ]
    for s in summaries.values():
        if s["concurrency"] != top:
            continue
        cpu = s["cpu_us_per_request"]
        out.append(
            f"| {s['scenario']} | {s['target']} | "
            + " | ".join(_cpu_cell(cpu, g) for g in groups)
            + f" | {s['cores'].get('machine', 0):.2f} |"
        )
    return out


def _cpu_cell(cpu: dict[str, float], group: str) -> str:
    total, sys_ = cpu.get(group, 0.0), cpu.get(f"{group}.sys")
    if sys_ and total >= 1:
        return f"{total:.0f} ({100 * sys_ / total:.0f}% sys)"
    return f"{total:.0f}"


def redis_table(rows: list[dict[str, Any]], metered_requests: int) -> str:
    """Markdown table of the ten Redis commands that took most server time (rows of ``commandstats_delta``)."""
    out = ["| command | calls | calls per metered request | µs per call | µs per metered request |", "|---|--:|--:|--:|--:|"]
    for row in rows[:10]:
        out.append(
            f"| {row['command']} | {row['calls']} | {row['calls'] / max(metered_requests, 1):.2f} | "
            f"{row['usec_per_call']:.1f} | {row['usec'] / max(metered_requests, 1):.1f} |"
        )
    return "\n".join(out)


def git_state() -> dict[str, Any]:
    """The commit checked out and the proxy files changed since (what the figures measured)."""

    def git(*a: str) -> str:
        done = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "proxy", "pyproject.toml").splitlines()]
    return {"head": git("rev-parse", "--short", "HEAD"), "proxy_files_changed_since_head": dirty}


def proxy_overhead(metrics_text: str) -> dict[str, float]:
    """Mean of the proxy's own costproxy_overhead_seconds, per provider (ms)."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("costproxy_overhead_seconds_sum"):
            sums[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("costproxy_overhead_seconds_count"):
            counts[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
    return {p: sums[p] / counts[p] * 1000 for p in sums if counts.get(p)}


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write the results file (its directory created if need be)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
