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
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from .scenarios import OPERATOR_KEY, SCENARIOS, BenchProvider, Scenario

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SERVERS_DIR = ROOT / ".data" / "bench-servers"
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
# A tier limit below these would throttle a benchmark (thousands of requests a second).
GENEROUS = {"rpm": 10**9, "monthly_requests": 10**12, "monthly_tokens": 10**15}
GRANT_CREDITS = 100_000_000  # $1M: ~345 µ$ a request, never runs out
TARGET_RPS_RATIO, TARGET_ADDED_P50_MS = 0.70, 0.5


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# processes -------------------------------------------------------------------------------
class Processes:
    """Every process this run starts, stopped in reverse order at the end."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    nice = 0  # applied to every process started (and to the embedded servers), see --nice

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen:
        logfile = open(self.log_dir / f"{name}.log", "wb")
        kw.setdefault("stdout", logfile)
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stderr=logfile, start_new_session=True, **kw)
        self.procs[name] = proc
        renice(proc.pid, self.nice)
        return proc

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def stop_all(self) -> None:
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is not None:
                continue
            try:
                os.kill(proc.pid, signal.SIGCONT)  # in case it was paused
                proc.send_signal(signal.SIGINT if name == "worker" else signal.SIGTERM)
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            except ProcessLookupError:
                pass


def renice(pid: int, nice: int) -> None:
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        except OSError as exc:
            log(f"cannot set nice {nice} on {pid}: {exc}")


def _raise_exit(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http(procs: Processes, name: str, url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procs.alive(name):
            raise RuntimeError(f"{name} exited during start-up:\n{procs.tail(name)}")
        try:
            if http_get(url, timeout=1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{name} not ready at {url} after {timeout:.0f} s:\n{procs.tail(name)}")


def run_cli(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(costproxy_cmd() + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"costproxy {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def costproxy_cmd() -> list[str]:
    exe = Path(PY).parent / "costproxy"
    return [str(exe)] if exe.exists() else [PY, "-m", "proxy.cli"]


# CPU accounting ----------------------------------------------------------------------------
def proc_ticks(pid: int, system_only: bool = False) -> int:
    """CPU clock ticks of a process so far: utime + stime (or stime alone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[12]) + (0 if system_only else int(fields[11]))
    except (OSError, IndexError, ValueError):
        return 0


def children_of(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def machine_ticks() -> dict[str, int]:
    """Jiffies over all CPUs: busy (all but idle/iowait), procs (user+nice+system), irq (+softirq), steal."""
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in Path("/proc/stat").read_text().split()[1:9])
    return {"_busy": user + nice + system + irq + softirq + steal, "_procs": user + nice + system,
            "_irq": irq + softirq, "_steal": steal}


@dataclass
class CpuWatch:
    """CPU time of named processes (a list of pids each) over a measurement."""

    groups: dict[str, list[int]] = field(default_factory=dict)

    def snapshot(self) -> dict[str, int]:
        snap = {name: sum(proc_ticks(p) for p in pids) for name, pids in self.groups.items()}
        for name in ("proxy", "floor"):  # kernel share: syscalls, i.e. mostly loopback socket I/O
            if name in self.groups:
                snap[f"{name}.sys"] = sum(proc_ticks(p, system_only=True) for p in self.groups[name])
        snap.update(machine_ticks())
        return snap

    @staticmethod
    def cores(before: dict[str, int], after: dict[str, int], wall: float) -> dict[str, float]:
        """CPU-seconds per wall second (cores used) of each group and of the machine.

        ``other``: processes not of this run; ``irq``: kernel interrupt/softirq time (which
        includes loopback network delivery); ``steal``: time the hypervisor took.
        """
        rate = lambda k: (after[k] - before[k]) / CLK_TCK / wall  # noqa: E731
        used = {k: rate(k) for k in before if not k.startswith("_")}
        ours = sum(v for k, v in used.items() if "." not in k)
        used["machine"] = rate("_busy")
        used["irq"] = rate("_irq")
        used["steal"] = rate("_steal")
        used["other"] = max(0.0, rate("_procs") - ours)
        return used


class Quiet:
    """Before a measurement, wait (within a budget) until other jobs on the machine are quiet.

    The machine's busy time not used by this run's processes is sampled over 0.5 s windows;
    while it exceeds ``threshold`` cores the measurement waits, up to ``budget`` seconds in
    total for the whole run.
    """

    def __init__(self, cpu: CpuWatch, threshold: float, budget: float):
        self.cpu, self.threshold, self.budget = cpu, threshold, budget
        self.waited = 0.0

    def other_load(self, window: float = 0.5) -> float:
        before, t0 = self.cpu.snapshot(), time.monotonic()
        time.sleep(window)
        return CpuWatch.cores(before, self.cpu.snapshot(), time.monotonic() - t0)["other"]

    def wait(self) -> float:
        if self.threshold <= 0:
            return 0.0
        started = time.monotonic()
        load = self.other_load(0.3)
        while load > self.threshold and self.waited + (time.monotonic() - started) < self.budget:
            load = self.other_load()
        spent = time.monotonic() - started
        self.waited += spent
        if spent > 1:
            log(f"waited {spent:.1f} s for other jobs to quiet down (other load now {load:.2f} cores)")
        return load


# servers: Redis and Postgres -----------------------------------------------------------------
def _pid_alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().split()[0]), 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


@dataclass
class Backends:
    redis_url: str
    admin_db_url: str
    database_url: str = ""
    db_name: str = ""
    started_embedded: bool = False
    redis_pid: int | None = None
    postgres_pid: int | None = None


def backends(keep_servers: bool) -> Backends:
    redis_url, db_url = os.environ.get("REDIS_URL", ""), os.environ.get("DATABASE_URL", "")
    started = False
    redis_pid = pg_pid = None
    if not redis_url or not db_url:
        from proxy import embedded

        before = _pid_alive(SERVERS_DIR / "redis" / "redis.pid"), _pid_alive(SERVERS_DIR / "pg" / "postmaster.pid")
        log(f"using embedded servers under {SERVERS_DIR}" + (" (starting them)" if not all(before) else ""))
        redis_url = redis_url or embedded.redis_url(SERVERS_DIR)
        db_url = db_url or embedded.postgres_url(SERVERS_DIR)
        started = not all(before) and not keep_servers
        if (SERVERS_DIR / "redis" / "redis.pid").exists() and redis_url.startswith("unix://"):
            redis_pid = int((SERVERS_DIR / "redis" / "redis.pid").read_text().split()[0])
        if (SERVERS_DIR / "pg" / "postmaster.pid").exists():
            pg_pid = int((SERVERS_DIR / "pg" / "postmaster.pid").read_text().split()[0])
    return Backends(redis_url, db_url, started_embedded=started, redis_pid=redis_pid, postgres_pid=pg_pid)


def _with_database(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def _admin_sql(url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_database(b: Backends, run_id: str) -> None:
    """A database of this run's own (dropped at the end); the given one if that is not allowed."""
    name = f"costproxy_bench_{run_id}"
    try:
        asyncio.run(_admin_sql(b.admin_db_url, f'CREATE DATABASE "{name}"'))
        b.db_name, b.database_url = name, _with_database(b.admin_db_url, name)
    except Exception as exc:  # no CREATEDB right: share the given database (emails are unique per run)
        log(f"cannot create a database ({exc}); using {b.admin_db_url} as it is")
        b.database_url = b.admin_db_url


def drop_database(b: Backends) -> None:
    if b.db_name:
        asyncio.run(_admin_sql(b.admin_db_url, f'DROP DATABASE IF EXISTS "{b.db_name}" WITH (FORCE)'))


def delete_prefix(redis_url: str, prefix: str) -> int:
    from redis import Redis

    r = Redis.from_url(redis_url)
    try:
        n = 0
        batch = []
        for key in r.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                n += r.delete(*batch)
                batch = []
        if batch:
            n += r.delete(*batch)
        return n
    finally:
        r.close()


def redis_commandstats(redis_url: str) -> dict[str, tuple[int, int]]:
    """{command: (calls, usec)} from INFO commandstats."""
    from redis import Redis

    r = Redis.from_url(redis_url)
    try:
        stats = r.info("commandstats")
    finally:
        r.close()
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in stats.items()}


def commandstats_delta(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    rows = []
    for cmd, (calls, usec) in after.items():
        c0, u0 = before.get(cmd, (0, 0))
        if calls - c0 > 0:
            rows.append({"command": cmd, "calls": calls - c0, "usec": usec - u0, "usec_per_call": (usec - u0) / (calls - c0)})
    return sorted(rows, key=lambda r: -r["usec"])


def compact_aof(redis_url: str, timeout: float = 30.0) -> None:
    """Rewrite the append-only file: a run appends ~1 KB per request, deletes included."""
    from redis import Redis

    r = Redis.from_url(redis_url)
    try:
        r.bgrewriteaof()
        deadline = time.monotonic() + timeout
        time.sleep(0.2)
        while r.info("persistence").get("aof_rewrite_in_progress") and time.monotonic() < deadline:
            time.sleep(0.2)
    except Exception as exc:  # e.g. a rewrite already running, or AOF off: harmless
        log(f"AOF rewrite skipped: {exc}")
    finally:
        r.close()


class UsageLag:
    """Events in this run's ledger streams not yet drained by the worker."""

    def __init__(self, redis_url: str, prefix: str):
        from redis import Redis

        from proxy.ledger import SHARDS

        self.redis = Redis.from_url(redis_url)
        self.keys = [f"{prefix}{{s{n}}}:ledger" for n in range(SHARDS)]

    def __call__(self) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for key in self.keys:
            pipe.xlen(key)
        return sum(pipe.execute())

    def wait_drained(self, timeout: float = 60.0) -> float:
        started = time.monotonic()
        while self() > 0:
            if time.monotonic() - started > timeout:
                log(f"usage stream still holds {self()} events after {timeout:.0f} s")
                break
            time.sleep(0.05)
        return time.monotonic() - started


# config -------------------------------------------------------------------------------------
def bench_tiers(tiers_file: Path, tier: str, providers: list[str], out_dir: Path) -> tuple[Path, list[str]]:
    """The repo's tiers file, or a copy in ``out_dir`` whose ``tier`` cannot throttle the benchmark."""
    data = yaml.safe_load(tiers_file.read_text())
    if tier not in data.get("tiers", {}):
        raise SystemExit(f"{tiers_file} has no tier {tier!r} (tiers: {', '.join(data.get('tiers', {}))}); pass --tier")
    t = data["tiers"][tier]
    lifted = [f"{k}={t[k]}" for k in GENEROUS if t.get(k) is not None and t[k] < GENEROUS[k]]
    missing = [p for p in providers if p not in t.get("providers", [])]
    if not lifted and not missing and t.get("models") is None:
        return tiers_file, []
    for k in GENEROUS:
        t.pop(k, None)
    t.pop("models", None)
    t["providers"] = sorted(set(t.get("providers", [])) | set(providers))
    path = out_dir / "tiers.yaml"
    path.write_text("# written by bench/run.py: the benchmark tier without limits\n" + yaml.safe_dump(data, sort_keys=False))
    return path, lifted + [f"+provider {p}" for p in missing]


# load generator ------------------------------------------------------------------------------
class LoadGen:
    def __init__(self, procs: Processes):
        self.proc = procs.start("loadgen", [PY, "-m", "bench.loadgen"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.procs = procs
        if self._readline(30) != b"ready":
            raise RuntimeError(f"load generator did not start:\n{procs.tail('loadgen')}")

    def _readline(self, timeout: float) -> bytes:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise RuntimeError(f"load generator silent for {timeout:.0f} s:\n{self.procs.tail('loadgen')}")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited:\n{self.procs.tail('loadgen')}")
        return line.strip()

    def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(orjson.dumps(cmd) + b"\n")
        self.proc.stdin.flush()
        return orjson.loads(self._readline(cmd["duration"] + cmd.get("warmup", 0) + 120))


# statistics ---------------------------------------------------------------------------------
def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict[str, float | None]:
    s = sorted(values)
    return {
        "p50": percentile(s, 0.50), "p90": percentile(s, 0.90), "p99": percentile(s, 0.99),
        "p999": percentile(s, 0.999), "mean": sum(s) / len(s) if s else None, "max": s[-1] if s else None,
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
        self.latencies += result["latency_ms"]
        self.ttfbs += result["ttfb_ms"]
        rps = result["count"] / result["elapsed"] if result["elapsed"] else 0.0
        self.rounds.append({
            "count": result["count"], "errors": result["errors"], "error_samples": result["error_samples"],
            "elapsed": result["elapsed"], "rps": rps, "p50": percentile(sorted(result["latency_ms"]), 0.5),
            "cores": cores, **extra,
        })

    def summary(self) -> dict[str, Any]:
        count = sum(r["count"] for r in self.rounds)
        elapsed = sum(r["elapsed"] for r in self.rounds)
        rps = count / elapsed if elapsed else 0.0
        cores: dict[str, float] = {}
        for r in self.rounds:  # time-weighted mean of cores used
            for k, v in r["cores"].items():
                cores[k] = cores.get(k, 0.0) + v * r["elapsed"] / elapsed
        return {
            "scenario": self.scenario, "concurrency": self.concurrency, "target": self.target,
            "requests": count, "errors": sum(r["errors"] for r in self.rounds),
            "error_samples": sorted({e for r in self.rounds for e in r["error_samples"]})[:5],
            "seconds": elapsed, "rps": rps, "rps_rounds": [r["rps"] for r in self.rounds],
            "latency_ms": summarize(self.latencies), "ttfb_ms": summarize(self.ttfbs) if self.ttfbs else None,
            "cores": cores,
            "cpu_us_per_request": {k: v / rps * 1e6 for k, v in cores.items()} if rps else {},
            "usage_lag_after": [r.get("usage_lag_after") for r in self.rounds if "usage_lag_after" in r],
            "drain_seconds": [r.get("drain_seconds") for r in self.rounds if "drain_seconds" in r],
        }


def comparisons(summaries: dict[tuple[str, int, str], dict[str, Any]], proxy_targets: list[str]) -> list[dict[str, Any]]:
    rows = []
    for (scenario, conc, target), s in summaries.items():
        if target not in proxy_targets:
            continue
        floor, direct = summaries[(scenario, conc, "floor")], summaries[(scenario, conc, "direct")]
        fl, pl, dl = floor["latency_ms"], s["latency_ms"], direct["latency_ms"]
        row = {
            "scenario": scenario, "concurrency": conc, "proxy": target,
            "rps_ratio": s["rps"] / floor["rps"] if floor["rps"] else None,
            "rps_ratio_rounds": [p / f for p, f in zip(s["rps_rounds"], floor["rps_rounds"]) if f],
            "added_p50_ms": pl["p50"] - fl["p50"], "added_p99_ms": pl["p99"] - fl["p99"],
            "floor_minus_direct_p50_ms": fl["p50"] - dl["p50"], "floor_minus_direct_p99_ms": fl["p99"] - dl["p99"],
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


def _f(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(summaries: dict, comps: list[dict], meta: dict) -> str:
    out = [
        f"Run {meta['run_id']} on {meta['machine']}: {meta['duration']:g} s per scenario × concurrency × target "
        f"in {meta['rounds']} interleaved rounds; latency in ms (perf_counter, client side; streams: to the last byte). "
        f"Proxy code: {meta['git']['head']}" + (f" + {len(meta['git']['proxy_files_changed_since_head'])} uncommitted files"
                                                 if meta["git"]["proxy_files_changed_since_head"] else "") + ".",
        "",
        "| scenario | c | target | rps | p50 | p99 | TTFB p50 | TTFB p99 | errors |",
        "|---|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    for s in summaries.values():
        t = s["ttfb_ms"] or {}
        out.append(
            f"| {s['scenario']} | {s['concurrency']} | {s['target']} | {s['rps']:.0f} | {_f(s['latency_ms']['p50'])} | "
            f"{_f(s['latency_ms']['p99'])} | {_f(t.get('p50'))} | {_f(t.get('p99'))} | {s['errors']} |"
        )
    out += [
        "",
        "| scenario | c | target | rps target/floor (per round) | added p50 | added p99 | floor−direct p50 | floor−direct p99 | verdict |",
        "|---|--:|---|--:|--:|--:|--:|--:|---|",
    ]
    for c in comps:
        rounds = ", ".join(f"{r:.2f}" for r in c["rps_ratio_rounds"])
        verdict = ", ".join(f"{name}: {'PASS' if ok else 'FAIL'}" for name, ok in c["checks"].items()) or "–"
        out.append(
            f"| {c['scenario']} | {c['concurrency']} | {c['proxy']} | **{_f(c['rps_ratio'])}** ({rounds}) | "
            f"**{_f(c['added_p50_ms'], 3)}** | {_f(c['added_p99_ms'], 3)} | {_f(c['floor_minus_direct_p50_ms'], 3)} | "
            f"{_f(c['floor_minus_direct_p99_ms'], 3)} | {verdict} |"
        )
    top = max(s["concurrency"] for s in summaries.values())
    groups = [g for g in ("proxy", "floor", "mock", "loadgen", "worker", "redis", "postgres", "irq", "steal", "other")
              if any(g in s["cpu_us_per_request"] for s in summaries.values())]
    out += [
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
            f"| {s['scenario']} | {s['target']} | " + " | ".join(_cpu_cell(cpu, g) for g in groups)
            + f" | {s['cores'].get('machine', 0):.2f} |"
        )
    return "\n".join(out)


def _cpu_cell(cpu: dict[str, float], group: str) -> str:
    total, sys_ = cpu.get(group, 0.0), cpu.get(f"{group}.sys")
    if sys_ and total >= 1:
        return f"{total:.0f} ({100 * sys_ / total:.0f}% sys)"
    return f"{total:.0f}"


def git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        done = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "proxy", "pyproject.toml").splitlines()]
    return {"head": git("rev-parse", "--short", "HEAD"), "proxy_files_changed_since_head": dirty}


def proxy_overhead(metrics_text: str) -> dict[str, float]:
    """Mean of the proxy's own costproxy_overhead_seconds, per provider (ms)."""
    sums, counts = {}, {}
    for line in metrics_text.splitlines():
        if line.startswith("costproxy_overhead_seconds_sum"):
            sums[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("costproxy_overhead_seconds_count"):
            counts[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
    return {p: sums[p] / counts[p] * 1000 for p in sums if counts.get(p)}


# main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per scenario × concurrency × target (split over rounds); default 10")
    p.add_argument("--concurrency", default="1,16", help="comma-separated concurrency levels; default 1,16")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds each target is measured in; default 3")
    p.add_argument("--warmup", type=float, default=0.3, help="unrecorded seconds before each measurement; default 0.3")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated; default {','.join(SCENARIOS)}")
    p.add_argument("--worker", choices=("on", "off", "both"), default="both",
                   help="proxy with the usage worker draining the stream as in production (on), without a worker (off), "
                        "or both: target 'proxy' with it and 'proxy-noworker' with it paused (default)")
    p.add_argument("--quiet-threshold", type=float, default=0.3, metavar="CORES",
                   help="before each measurement, wait while other jobs use more than this many cores (0: never wait)")
    p.add_argument("--quiet-budget", type=float, default=120.0, metavar="SECONDS",
                   help="total seconds a run may spend waiting for quiet (default 120)")
    p.add_argument("--nice", type=int, default=0,
                   help="scheduling priority for every process of the run and the embedded servers, e.g. -5 "
                        "(needs root for < 0): steadier figures on a machine shared with other jobs")
    p.add_argument("--tier", default="enterprise", help="tier of the benchmark user (its limits are lifted); default enterprise")
    p.add_argument("--quick", action="store_true", help="about a minute: 3 s per cell in 3 rounds, worker on")
    p.add_argument("--json", type=Path, default=RESULTS / "latest.json", help="where to write the results")
    p.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                   help="after measuring, py-spy the proxy at the highest concurrency for SECONDS per scenario")
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
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # clean up on SIGTERM too, and on SIGINT even when started with it ignored (nohup/&)
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGINT, _raise_exit)
    Processes.nice = args.nice
    run_id = uuid.uuid4().hex[:8]
    prefix = f"bench{run_id}:"
    tmp = Path(tempfile.mkdtemp(prefix=f"costproxy-bench-{run_id}-"))
    procs = Processes(tmp)
    b: Backends | None = None
    failed = True
    wall_start = time.monotonic()
    try:
        scenarios: list[Scenario] = args.scenarios
        providers: dict[str, BenchProvider] = {s.provider.name: s.provider for s in scenarios}

        # backends, database, tiers --------------------------------------------------------
        b = backends(args.keep_servers)
        create_database(b, run_id)
        tiers_file, lifted = bench_tiers(ROOT / "tiers.yaml", args.tier, list(providers), tmp)
        if lifted:
            log(f"{args.tier} tier would throttle ({', '.join(lifted)}): using {tiers_file} without limits")

        # mock upstreams, one listener per provider ----------------------------------------------
        mock_ports = {name: free_port() for name in providers}
        mock_argv = [PY, "-m", "bench.mock_server"]
        for name, prov in providers.items():
            mock_argv += ["--listen", f"{mock_ports[name]}={prov.mock}"]
        procs.start("mock", mock_argv)
        for name in providers:
            # any answer (404 too) means the listener is up; /v1/models exists on the OpenAI mock
            wait_http_any(procs, "mock", f"http://127.0.0.1:{mock_ports[name]}/v1/models")

        # the proxy and the worker -------------------------------------------------------
        env = {
            **os.environ,
            "REDIS_URL": b.redis_url, "DATABASE_URL": b.database_url, "REDIS_PREFIX": prefix,
            "PRICING_FILE": str(ROOT / "pricing.yaml"), "TIERS_FILE": str(tiers_file),
            "DATA_DIR": str(SERVERS_DIR),
        }
        for name, prov in providers.items():
            env[f"{prov.env}_UPSTREAM_URL"] = f"http://127.0.0.1:{mock_ports[name]}"
            env[f"{prov.env}_API_KEY"] = OPERATOR_KEY
        run_cli(["migrate"], env)
        user = json.loads(run_cli(["users", "create", "--email", f"bench-{run_id}@example.com", "--tier", args.tier, "--json"], env))
        run_cli(["credits", "grant", user["user_id"], "--credits", str(GRANT_CREDITS), "--json"], env)
        api_key = user["api_key"]

        # the floor and the contract floor, one listener each per provider, in one process -----
        floor_ports = {(name, kind): free_port() for name in providers for kind in ("floor", "ledger-floor")}
        floor_argv = [PY, "-m", "bench.floor"]
        for (name, kind), port in floor_ports.items():
            floor_argv += ["--listen", f"{port}={'ledger+' if kind == 'ledger-floor' else ''}http://127.0.0.1:{mock_ports[name]}"]
        procs.start("floor", floor_argv, {
            **os.environ, "BENCH_REDIS_URL": b.redis_url, "BENCH_REDIS_PREFIX": prefix,
            "BENCH_USER": user["user_id"], "BENCH_KEY_ID": user["key_id"], "BENCH_TIER": args.tier,
        })
        for port in floor_ports.values():
            wait_http_any(procs, "floor", f"http://127.0.0.1:{port}/v1/models")

        proxy_port, worker_port = free_port(), free_port()
        procs.start("proxy", costproxy_cmd() + ["serve", "--host", "127.0.0.1", "--port", str(proxy_port)], env)
        wait_http(procs, "proxy", f"http://127.0.0.1:{proxy_port}/readyz")
        if args.worker != "off":
            procs.start("worker", costproxy_cmd() + ["worker", "--port", str(worker_port)], env)
            wait_http(procs, "worker", f"http://127.0.0.1:{worker_port}/healthz")
        lag = UsageLag(b.redis_url, prefix)

        loadgen = LoadGen(procs)
        bases = {name: {"direct": f"http://127.0.0.1:{mock_ports[name]}", "floor": f"http://127.0.0.1:{floor_ports[name, 'floor']}",
                        "ledger-floor": f"http://127.0.0.1:{floor_ports[name, 'ledger-floor']}",
                        "proxy": f"http://127.0.0.1:{proxy_port}"} for name in providers}
        sanity_check(scenarios, bases, api_key)

        cpu = CpuWatch({
            name: [procs.procs[name].pid] for name in ("proxy", "floor", "mock", "loadgen", "worker") if name in procs.procs
        })
        if b.redis_pid:
            cpu.groups["redis"] = [b.redis_pid]
        if b.postgres_pid:
            cpu.groups["postgres"] = [b.postgres_pid, *children_of(b.postgres_pid)]
        for pid in cpu.groups.get("redis", []) + cpu.groups.get("postgres", []):
            renice(pid, args.nice)  # only the embedded servers under .data/bench-servers

        targets = ["direct", "floor", "ledger-floor", "proxy"] + (["proxy-noworker"] if args.worker == "both" else [])
        metered = {"ledger-floor", "proxy", "proxy-noworker"}  # targets that append usage events

        def command(s: Scenario, target: str, conc: int, seconds: float, warmup: float) -> dict[str, Any]:
            url, headers = s.request("proxy" if target.startswith("proxy") else target, bases[s.provider.name], api_key)
            return {"url": url, "method": s.method, "headers": headers, "body": s.body_bytes().decode("latin-1"),
                    "stream": s.stream, "done_marker": s.done_marker if s.stream else "",
                    "concurrency": conc, "duration": seconds, "warmup": warmup}

        # warm every path once (connection pools, key cache, script cache, JIT-less caches) ---
        for s in scenarios:
            for target in targets[:4]:
                r = loadgen.run(command(s, target, max(args.concurrency), 1.0, 0.0))
                if r["errors"] or not r["count"]:
                    raise RuntimeError(f"warm-up of {s.name} via {target}: {r['errors']} errors {r['error_samples']}")
        lag.wait_drained() if args.worker != "off" else None

        quiet = Quiet(cpu, args.quiet_threshold, args.quiet_budget)
        redis_stats_before = redis_commandstats(b.redis_url)
        report: dict[str, Any] = {}
        if args.duration > 0:
            # measure: interleaved rounds, target order rotated each round -----------------------
            per_round = args.duration / args.rounds
            cells: dict[tuple[str, int, str], Cell] = {}
            total = args.rounds * len(scenarios) * len(args.concurrency) * len(targets)
            done = 0
            for rnd in range(args.rounds):
                order = targets[rnd % len(targets):] + targets[: rnd % len(targets)]
                for s in scenarios:
                    for conc in args.concurrency:
                        for target in order:
                            cell = cells.setdefault((s.name, conc, target), Cell(s.name, conc, target))
                            extra: dict[str, Any] = {"other_load_before": quiet.wait()}
                            if target == "proxy-noworker":
                                os.kill(procs.procs["worker"].pid, signal.SIGSTOP)
                            before, t0 = cpu.snapshot(), time.monotonic()
                            result = loadgen.run(command(s, target, conc, per_round, args.warmup))
                            cores = CpuWatch.cores(before, cpu.snapshot(), time.monotonic() - t0)
                            if target in metered and args.worker != "off":
                                extra["usage_lag_after"] = lag()
                                if target == "proxy-noworker":
                                    os.kill(procs.procs["worker"].pid, signal.SIGCONT)
                                # let the worker catch up so its backlog does not load the next target
                                extra["drain_seconds"] = lag.wait_drained()
                            cell.add(result, cores, extra)
                            done += 1
                            log(f"[{done}/{total}] round {rnd + 1} {s.name} c={conc} {target}: "
                                f"{cell.rounds[-1]['rps']:.0f} rps p50 {_f(cell.rounds[-1]['p50'], 3)} ms"
                                + (f" errors {result['errors']} {result['error_samples']}" if result["errors"] else ""))

            summaries = {k: cells[k].summary() for k in sorted(cells, key=lambda k: (
                [x.name for x in scenarios].index(k[0]), k[1], targets.index(k[2])))}
            comps = comparisons(summaries, [t for t in targets if t in metered])
            status, metrics_text = http_get(f"http://127.0.0.1:{proxy_port}/metrics")
            meta = {
                "run_id": run_id, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
                "duration": args.duration, "rounds": args.rounds, "warmup": args.warmup,
                "concurrency": args.concurrency, "worker": args.worker, "scenarios": [s.name for s in scenarios],
                "redis": "embedded (unix socket)" if b.redis_url.startswith("unix://") else "REDIS_URL",
                "tiers_lifted": lifted, "git": git_state(), "waited_for_quiet_seconds": round(quiet.waited, 1), "nice": args.nice,
            }
            table = markdown(summaries, comps, meta)
            print(table)
            overhead = proxy_overhead(metrics_text.decode()) if status == 200 else {}
            if overhead:
                print("\nProxy's own costproxy_overhead_seconds (mean over the whole run, ms): "
                      + ", ".join(f"{p} {v:.3f}" for p, v in overhead.items()))
            redis_cmds = commandstats_delta(redis_stats_before, redis_commandstats(b.redis_url))
            metered_requests = sum(s_["requests"] for k, s_ in summaries.items() if k[2] in metered)
            print(f"\nRedis server time by command over the measurements ({metered_requests} metered requests, "
                  "proxy and contract floor; the worker's commands included):\n")
            print("| command | calls | calls per metered request | µs per call | µs per metered request |\n|---|--:|--:|--:|--:|")
            for row in redis_cmds[:10]:
                print(f"| {row['command']} | {row['calls']} | {row['calls'] / max(metered_requests, 1):.2f} | "
                      f"{row['usec_per_call']:.1f} | {row['usec'] / max(metered_requests, 1):.1f} |")
            args.json.parent.mkdir(parents=True, exist_ok=True)
            report = {"meta": meta, "results": list(summaries.values()), "comparisons": comps,
                      "proxy_overhead_metric_ms": overhead, "redis_commandstats": redis_cmds, "markdown": table}
            args.json.write_text(json.dumps(report, indent=2))
            log(f"wrote {args.json}")

        if args.profile > 0:
            profiles = profile(procs, loadgen, scenarios, command, max(args.concurrency), args.profile, lag, args.native)
            if report and profiles:
                report["profiles"] = profiles
                args.json.write_text(json.dumps(report, indent=2))
        failed = False
        return 0
    finally:
        log("stopping processes")
        procs.stop_all()
        if b is not None:
            try:
                deleted = delete_prefix(b.redis_url, prefix)
                log(f"deleted {deleted} Redis keys under {prefix}")
                if b.redis_pid:  # the embedded bench Redis: keep its append-only file small
                    compact_aof(b.redis_url)
                drop_database(b)
            except Exception as exc:
                log(f"cleanup of Redis/Postgres failed: {exc!r}")
            if b.started_embedded:
                from proxy import embedded

                log("stopping the embedded servers this run started")
                embedded.stop_all(SERVERS_DIR)
        if args.keep_logs or failed:
            log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"total {time.monotonic() - wall_start:.0f} s")


def wait_http_any(procs: Processes, name: str, url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procs.alive(name):
            raise RuntimeError(f"{name} exited during start-up:\n{procs.tail(name)}")
        try:
            http_get(url, timeout=1.0)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} not listening at {url} after {timeout:.0f} s:\n{procs.tail(name)}")


def sanity_check(scenarios: list[Scenario], bases: dict[str, dict[str, str]], api_key: str) -> None:
    """One request per scenario through the proxy: charged, and the stream as the client asked."""
    for s in scenarios:
        url, headers = s.request("proxy", bases[s.provider.name], api_key)
        req = urllib.request.Request(url, data=s.body_bytes(), headers=headers, method=s.method)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                body, charged = resp.read(), resp.headers.get("x-credits-charged")
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{s.name} via proxy: HTTP {exc.code}: {exc.read()[:300]!r}") from None
        if s.stream:
            if s.done_marker and not body.rstrip().endswith(s.done_marker.encode()):
                raise RuntimeError(f"{s.name} via proxy: stream did not end with {s.done_marker!r}: {body[-200:]!r}")
        elif charged is None:
            raise RuntimeError(f"{s.name} via proxy: no x-credits-charged header")
        log(f"sanity {s.name}: ok" + (f" (charged {charged} credits)" if charged else ""))


def profile(procs: Processes, loadgen: LoadGen, scenarios: list[Scenario], command, conc: int, seconds: float,
            lag: UsageLag, native: bool = False) -> dict[str, Any]:
    """py-spy the floor and the proxy (raw collapsed stacks) while the load generator drives each."""
    from .profile_summary import summarize_file

    spy = shutil.which("py-spy", path=str(Path(PY).parent)) or shutil.which("py-spy")
    if not spy:
        log("py-spy not found (pip install py-spy); skipping the profile")
        return {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    found: dict[str, Any] = {}
    for s in scenarios:
        for target in ("floor", "proxy"):
            out = RESULTS / f"profile-{s.name}-{target}.txt"
            out.unlink(missing_ok=True)
            pid = procs.procs[target].pid
            spy_log_path = procs.log_dir / f"py-spy-{s.name}-{target}.log"
            with open(spy_log_path, "wb") as spy_log:
                p = subprocess.Popen(
                    [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "--full-filenames",
                     *(["--native"] if native else []), "--duration", str(int(seconds)), "--output", str(out)],
                    stdout=spy_log, stderr=spy_log,
                )
                time.sleep(0.5)
                ticks0 = proc_ticks(pid)
                r = loadgen.run(command(s, target, conc, seconds - 0.5, 0.0))
                cpu_s = (proc_ticks(pid) - ticks0) / CLK_TCK
                p.wait(timeout=seconds + 60)
            if target == "proxy":
                lag.wait_drained()
            rps = r["count"] / max(r["elapsed"], 1e-9)
            us_per_req = cpu_s / max(r["count"], 1) * 1e6
            if not out.exists():
                log(f"py-spy wrote no profile:\n{spy_log_path.read_text(errors='replace')[-2000:]}")
                continue
            log(f"profile {s.name} {target}: {rps:.0f} rps under py-spy, {us_per_req:.0f} µs CPU/request -> {out}")
            print(f"\n## profile: {s.name} via {target}, c={conc}, {rps:.0f} rps, {us_per_req:.0f} µs {target} CPU per request\n")
            print(summarize_file(out, us_per_request=us_per_req))
            found[f"{s.name}/{target}"] = {"file": str(out), "rps": rps, "cpu_us_per_request": us_per_req}
    return found

if __name__ == "__main__":
    sys.exit(main())
