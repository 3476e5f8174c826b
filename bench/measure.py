"""The measurements: warming every path up, then every scenario × concurrency × target in
interleaved rounds, each round recording throughput, latency and the CPU of every process."""

from __future__ import annotations

import itertools
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from .backends import AofSwitch, UsageLag
from .common import log
from .cpu import CpuWatch, Quiet
from .driver import Endpoints, LoadGen
from .processes import Processes
from .report import Cell, CellKey, fmt
from .scenarios import Scenario
from .targets import one_per_listener


@dataclass
class Bench:
    """What the measurements drive and watch, once every service is up."""

    procs: Processes
    loadgen: LoadGen
    endpoints: Endpoints
    cpu: CpuWatch
    lag: UsageLag
    worker: str  # --worker: on | off | both
    aof: AofSwitch | None = None  # --appendfsync: switches Redis's appendfsync per target

    @property
    def targets(self) -> list[str]:
        """Every target's name, in measuring order."""
        return list(self.endpoints.targets)

    def prepare(self, target: str) -> None:
        """Set Redis's ``appendfsync`` for ``target`` (with ``--appendfsync``)."""
        spec = self.endpoints.targets[target]
        if self.aof is not None and spec.appendfsync:
            self.aof.set(spec.appendfsync)

    @property
    def draining(self) -> bool:
        """Whether a worker drains the usage stream (to be waited for after metered load)."""
        return self.worker != "off"


def warm_up(bench: Bench, scenarios: list[Scenario], concurrency: int) -> None:
    """Warm every listener once for 1 s (connection pools, key cache, script cache, JIT-less caches),
    then wait until the worker has drained the usage stream."""
    for s, target in itertools.product(scenarios, one_per_listener(bench.endpoints.targets)):
        r = bench.loadgen.run(bench.endpoints.command(s, target, concurrency, 1.0, 0.0))
        if r["errors"] or not r["count"]:
            raise RuntimeError(f"warm-up of {s.name} via {target}: {r['errors']} errors {r['error_samples']}")
    if bench.draining:
        bench.lag.wait_drained()


def measure(
    bench: Bench, scenarios: list[Scenario], concurrency: list[int], rounds: int, duration: float, warmup: float, quiet: Quiet
) -> dict[CellKey, Cell]:
    """Measure every scenario × concurrency × target for ``duration`` seconds in ``rounds`` interleaved
    rounds, the target order rotated every round, so all targets see the same machine conditions."""
    per_round = duration / rounds
    targets = bench.targets
    cells: dict[CellKey, Cell] = {}
    total = rounds * len(scenarios) * len(concurrency) * len(targets)
    done = 0
    for rnd in range(rounds):
        order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
        for s, conc, target in itertools.product(scenarios, concurrency, order):
            cell = cells.setdefault((s.name, conc, target), Cell(s.name, conc, target))
            result = measure_round(bench, cell, s, per_round, warmup, quiet)
            done += 1
            log(
                f"[{done}/{total}] round {rnd + 1} {s.name} c={conc} {target}: "
                f"{cell.rounds[-1]['rps']:.0f} rps p50 {fmt(cell.rounds[-1]['p50'], 3)} ms"
                + (f" errors {result['errors']} {result['error_samples']}" if result["errors"] else "")
            )
    return cells


def measure_round(bench: Bench, cell: Cell, s: Scenario, seconds: float, warmup: float, quiet: Quiet) -> dict[str, Any]:
    """One round of ``cell``: set Redis's appendfsync for its target, wait for quiet, measure,
    record it in ``cell``; return the load generator's result.

    A target with ``pause_worker`` (``proxy-noworker``) is measured with the worker paused.
    After metered load the worker is let catch up, so its backlog does not load the next target.
    """
    spec = bench.endpoints.targets[cell.target]
    bench.prepare(cell.target)
    extra: dict[str, Any] = {"other_load_before": quiet.wait()}
    if spec.pause_worker:
        os.kill(bench.procs.procs["worker"].pid, signal.SIGSTOP)
    before, t0 = bench.cpu.snapshot(), time.monotonic()
    result = bench.loadgen.run(bench.endpoints.command(s, cell.target, cell.concurrency, seconds, warmup))
    cores = CpuWatch.cores(before, bench.cpu.snapshot(), time.monotonic() - t0)
    if spec.metered and bench.draining:
        extra["usage_lag_after"] = bench.lag()
        if spec.pause_worker:
            os.kill(bench.procs.procs["worker"].pid, signal.SIGCONT)
        extra["drain_seconds"] = bench.lag.wait_drained()
    cell.add(result, cores, extra)
    return result
