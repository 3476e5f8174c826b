"""``--profile``: py-spy the floor and the proxy while the load generator drives each, keep the
raw collapsed stacks under ``bench/results/`` and print their summaries."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from .common import PY, RESULTS, log
from .cpu import CLK_TCK, proc_ticks
from .measure import Bench
from .profile_summary import summarize_file
from .scenarios import Scenario


def profile(bench: Bench, scenarios: list[Scenario], conc: int, seconds: float, native: bool = False) -> dict[str, Any]:
    """py-spy the floor and the proxy (raw collapsed stacks) while the load generator drives each."""
    spy = shutil.which("py-spy", path=str(Path(PY).parent)) or shutil.which("py-spy")
    if not spy:
        log("py-spy not found (pip install py-spy); skipping the profile")
        return {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    found: dict[str, Any] = {}
    for s in scenarios:
        for target in ("floor", "proxy"):
            profiled = _profile_one(bench, spy, s, target, conc, seconds, native)
            if profiled:
                found[f"{s.name}/{target}"] = profiled
    return found


def _profile_one(
    bench: Bench, spy: str, s: Scenario, target: str, conc: int, seconds: float, native: bool
) -> dict[str, Any] | None:
    """Profile ``target`` under scenario ``s``: the profile's file, rps and CPU per request, or None if py-spy wrote none."""
    out = RESULTS / f"profile-{s.name}-{target}.txt"
    out.unlink(missing_ok=True)
    pid = bench.procs.procs[target].pid
    bench.prepare(target)
    spy_log_path = bench.procs.log_dir / f"py-spy-{s.name}-{target}.log"
    with open(spy_log_path, "wb") as spy_log:
        p = subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--rate",
                "200",
                "--full-filenames",
                *(["--native"] if native else []),
                "--duration",
                str(int(seconds)),
                "--output",
                str(out),
            ],
            stdout=spy_log,
            stderr=spy_log,
        )
        time.sleep(0.5)
        ticks0 = proc_ticks(pid)
        r = bench.loadgen.run(bench.endpoints.command(s, target, conc, seconds - 0.5, 0.0))
        cpu_s = (proc_ticks(pid) - ticks0) / CLK_TCK
        p.wait(timeout=seconds + 60)
    if target == "proxy":
        bench.lag.wait_drained()
    rps = r["count"] / max(r["elapsed"], 1e-9)
    us_per_req = cpu_s / max(r["count"], 1) * 1e6
    if not out.exists():
        log(f"py-spy wrote no profile:\n{spy_log_path.read_text(errors='replace')[-2000:]}")
        return None
    log(f"profile {s.name} {target}: {rps:.0f} rps under py-spy, {us_per_req:.0f} µs CPU/request -> {out}")
    print(f"\n## profile: {s.name} via {target}, c={conc}, {rps:.0f} rps, {us_per_req:.0f} µs {target} CPU per request\n")
    print(summarize_file(out, us_per_request=us_per_req))
    return {"file": str(out), "rps": rps, "cpu_us_per_request": us_per_req}
