"""Benchmark costproxy against a bare aiohttp pass-through (the floor) on one mock upstream.

    python -m bench.run                        # 10 s per scenario × concurrency × target
    python -m bench.run --quick                # about three minutes
    python -m bench.run --duration 20 --concurrency 1,4,16 --worker both --json out.json
    python -m bench.run --profile 10           # afterwards, py-spy the proxy under load

One run starts, each in its own process: the mock upstream(s), the floor, the proxy
(``costproxy serve``), the worker (``costproxy worker``, draining the usage stream as in
production) and a closed-loop load generator. Every scenario (see ``bench/scenarios.py``)
is sent to every target — ``direct`` (the mock), ``floor``, ``ledger-floor`` (the floor plus
the two ledger scripts the contract requires per request), ``proxy`` and, with
``--worker both``, ``proxy-noworker`` (the worker paused) — in interleaved rounds, so
all targets see the same machine conditions. Results are printed as Markdown and
written as JSON (default ``bench/results/latest.json``). Every process started is
stopped at the end, the run's Redis keys deleted and its Postgres database dropped.

Redis and Postgres come from ``REDIS_URL`` / ``DATABASE_URL``, or else the embedded
servers under ``.data/bench-servers`` (stopped again at the end if this run started them).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from .backends import (
    AofSwitch,
    Backends,
    UsageLag,
    commandstats_delta,
    create_run_database,
    redis_commandstats,
    release_backends,
    start_backends,
)
from .common import RESULTS, ROOT, log
from .config import bench_tiers, create_account, proxy_env
from .cpu import Quiet, watch_run
from .driver import LoadGen
from .measure import Bench, measure, warm_up
from .processes import Processes, http_get, renice
from .profiling import profile
from .report import (
    Cell,
    CellKey,
    comparisons,
    git_state,
    markdown,
    proxy_overhead,
    redis_table,
    summaries_in_order,
    variants,
    variants_markdown,
    write_json,
)
from .scenarios import SCENARIOS, BenchProvider, Scenario
from .services import sanity_check, start_floors, start_mocks, start_proxies, target_endpoints
from .targets import parse_appendfsync, parse_serve_workers, target_specs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with ``--quick`` applied and scenarios and concurrency levels parsed."""
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--duration", type=float, default=10.0, help="seconds per scenario × concurrency × target (split over rounds); default 10"
    )
    p.add_argument("--concurrency", default="1,16", help="comma-separated concurrency levels; default 1,16")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds each target is measured in; default 3")
    p.add_argument("--warmup", type=float, default=0.3, help="unrecorded seconds before each measurement; default 0.3")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated; default {','.join(SCENARIOS)}")
    p.add_argument(
        "--worker",
        choices=("on", "off", "both"),
        default="both",
        help="proxy with the usage worker draining the stream as in production (on), without a worker (off), "
        "or both: target 'proxy' with it and 'proxy-noworker' with it paused (default)",
    )
    p.add_argument(
        "--serve-workers",
        default="1",
        metavar="N,M",
        help="also measure the proxy started with `costproxy serve --workers N` (target 'proxy-Nw') "
        "beside the one-process 'proxy'; e.g. 1,2",
    )
    p.add_argument(
        "--appendfsync",
        default="",
        metavar="A,B",
        help="Redis appendonly yes and, before each measurement, CONFIG SET appendfsync: the first value "
        "for every target, each further one for a 'proxy-fsync-<value>' target; e.g. everysec,always "
        "(restored at the end; with REDIS_URL only with --allow-redis-config)",
    )
    p.add_argument(
        "--allow-redis-config",
        action="store_true",
        help="let --appendfsync change the configuration of the Redis in REDIS_URL (restored at the end)",
    )
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.3,
        metavar="CORES",
        help="before each measurement, wait while other jobs use more than this many cores (0: never wait)",
    )
    p.add_argument(
        "--quiet-budget",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="total seconds a run may spend waiting for quiet (default 120)",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="scheduling priority for every process of the run and the embedded servers, e.g. -5 "
        "(needs root for < 0): steadier figures on a machine shared with other jobs",
    )
    p.add_argument("--tier", default="enterprise", help="tier of the benchmark user (its limits are lifted); default enterprise")
    p.add_argument("--quick", action="store_true", help="about a minute: 3 s per cell in 3 rounds, worker on")
    p.add_argument("--json", type=Path, default=RESULTS / "latest.json", help="where to write the results")
    p.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after measuring, py-spy the proxy at the highest concurrency for SECONDS per scenario",
    )
    p.add_argument("--native", action="store_true", help="with --profile: also sample native (C) frames")
    p.add_argument("--keep-servers", action="store_true", help="leave embedded Redis/Postgres running if this run started them")
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (path printed at the end)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.warmup = 3.0, 3, 0.2
        args.quiet_budget = min(args.quiet_budget, 20.0)
        if args.worker == "both":
            args.worker = "on"
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c]
    unknown = [s for s in args.scenarios.split(",") if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    args.scenarios = [SCENARIOS[s] for s in args.scenarios.split(",") if s]
    try:
        args.serve_workers = parse_serve_workers(args.serve_workers)
        args.appendfsync = parse_appendfsync(args.appendfsync)
    except ValueError as exc:
        p.error(str(exc))
    if args.appendfsync and os.environ.get("REDIS_URL") and not args.allow_redis_config:
        p.error(
            "--appendfsync changes the configuration of the Redis in REDIS_URL, which others may use: "
            "pass --allow-redis-config too, or unset REDIS_URL to use the embedded benchmark Redis"
        )
    return args


def _raise_exit(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see the module docstring); every process started is stopped and the
    run's Redis keys and database deleted, also on Ctrl-C / SIGTERM."""
    args = parse_args(argv)
    # clean up on SIGTERM too, and on SIGINT even when started with it ignored (nohup/&)
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGINT, _raise_exit)
    run_id = uuid.uuid4().hex[:8]
    prefix = f"bench{run_id}:"
    tmp = Path(tempfile.mkdtemp(prefix=f"costproxy-bench-{run_id}-"))
    procs = Processes(tmp, nice=args.nice)
    b: Backends | None = None
    failed = True
    wall_start = time.monotonic()
    try:
        scenarios: list[Scenario] = args.scenarios
        providers: dict[str, BenchProvider] = {s.provider.name: s.provider for s in scenarios}
        b = start_backends(args.keep_servers)
        if args.appendfsync:
            b.aof = AofSwitch(b.redis_url)
            b.aof.begin(args.appendfsync[0])
        create_run_database(b, run_id)
        tiers_file, lifted = bench_tiers(ROOT / "tiers.yaml", args.tier, list(providers), tmp)
        if lifted:
            log(f"{args.tier} tier would throttle ({', '.join(lifted)}): using {tiers_file} without limits")
        bench = start_bench(args, procs, b, providers, tiers_file, run_id, prefix)
        warm_up(bench, scenarios, max(args.concurrency))

        quiet = Quiet(bench.cpu, args.quiet_threshold, args.quiet_budget)
        redis_stats_before = redis_commandstats(b.redis_url)
        report: dict[str, Any] = {}
        if args.duration > 0:
            cells = measure(bench, scenarios, args.concurrency, args.rounds, args.duration, args.warmup, quiet)
            meta = run_meta(args, run_id, b, lifted, quiet)
            report = report_results(args.json, bench, cells, meta, b.redis_url, redis_stats_before)
        if args.profile > 0:
            profiles = profile(bench, scenarios, max(args.concurrency), args.profile, args.native)
            if report and profiles:
                report["profiles"] = profiles
                write_json(args.json, report)
        failed = False
        return 0
    finally:
        log("stopping processes")
        procs.stop_all()
        if b is not None:
            release_backends(b, prefix)
        if args.keep_logs or failed:
            log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"total {time.monotonic() - wall_start:.0f} s")


def start_bench(
    args: argparse.Namespace,
    procs: Processes,
    b: Backends,
    providers: dict[str, BenchProvider],
    tiers_file: Path,
    run_id: str,
    prefix: str,
) -> Bench:
    """Start the mocks, create the benchmark account, start the floors, the proxies, the worker and
    the load generator, check every scenario once through each proxy, and watch the CPU of all."""
    mock_ports = start_mocks(procs, providers)
    env = proxy_env(b, prefix, tiers_file, providers, mock_ports)
    account = create_account(env, run_id, args.tier)
    floor_ports = start_floors(procs, mock_ports, b.redis_url, prefix, account, args.tier)
    proxy_ports = start_proxies(procs, env, args.serve_workers, with_worker=args.worker != "off")
    lag = UsageLag(b.redis_url, prefix)
    loadgen = LoadGen(procs)
    targets = target_specs(args.worker, args.serve_workers, args.appendfsync)
    endpoints = target_endpoints(mock_ports, floor_ports, proxy_ports, account["api_key"], targets)
    sanity_check(args.scenarios, endpoints)
    cpu = watch_run(procs, b.redis_pid, b.postgres_pid)
    for pid in cpu.groups.get("redis", []) + cpu.groups.get("postgres", []):
        renice(pid, args.nice)  # only the embedded servers under .data/bench-servers
    return Bench(procs, loadgen, endpoints, cpu, lag, args.worker, b.aof)


def run_meta(args: argparse.Namespace, run_id: str, b: Backends, lifted: list[str], quiet: Quiet) -> dict[str, Any]:
    """What the report says about the run: when, where, with which options and code."""
    return {
        "run_id": run_id,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "duration": args.duration,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "worker": args.worker,
        "serve_workers": args.serve_workers,
        "appendfsync": args.appendfsync,
        "redis_aof_before": b.aof.before if b.aof else None,
        "scenarios": [s.name for s in args.scenarios],
        "redis": "embedded (unix socket)" if b.redis_url.startswith("unix://") else "REDIS_URL",
        "tiers_lifted": lifted,
        "git": git_state(),
        "waited_for_quiet_seconds": round(quiet.waited, 1),
        "nice": args.nice,
    }


def report_results(
    json_path: Path,
    bench: Bench,
    cells: dict[CellKey, Cell],
    meta: dict[str, Any],
    redis_url: str,
    redis_stats_before: dict[str, tuple[int, int]],
) -> dict[str, Any]:
    """Print the Markdown tables, the proxy's own overhead metric and Redis's server time per
    command; write the JSON report to ``json_path`` and return it."""
    specs = bench.endpoints.targets
    summaries = summaries_in_order(cells, meta["scenarios"], bench.targets)
    comps = comparisons(summaries, [t for t, spec in specs.items() if spec.metered])
    variant_rows = variants(summaries, {t: spec.baseline for t, spec in specs.items() if spec.baseline})
    status, metrics_text = http_get(f"{bench.endpoints.proxy_url}/metrics")
    table = "\n\n".join(part for part in (markdown(summaries, comps, meta), variants_markdown(variant_rows, meta)) if part)
    print(table)
    overhead = proxy_overhead(metrics_text.decode()) if status == 200 else {}
    if overhead:
        print(
            "\nProxy's own costproxy_overhead_seconds (mean over the whole run, ms): "
            + ", ".join(f"{p} {v:.3f}" for p, v in overhead.items())
        )
    redis_cmds = commandstats_delta(redis_stats_before, redis_commandstats(redis_url))
    metered_requests = sum(s["requests"] for k, s in summaries.items() if specs[k[2]].metered)
    print(
        f"\nRedis server time by command over the measurements ({metered_requests} metered requests, "
        "proxy and contract floor; the worker's commands included):\n"
    )
    print(redis_table(redis_cmds, metered_requests))
    report = {
        "meta": meta,
        "results": list(summaries.values()),
        "comparisons": comps,
        "variants": variant_rows,
        "proxy_overhead_metric_ms": overhead,
        "redis_commandstats": redis_cmds,
        "markdown": table,
    }
    write_json(json_path, report)
    log(f"wrote {json_path}")
    return report


if __name__ == "__main__":
    sys.exit(main())
