"""CPU accounting from ``/proc``: the CPU time of the run's processes and of the machine over
a measurement, and waiting until other jobs on the machine are quiet before one."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import log
from .processes import Processes

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_ticks(pid: int, system_only: bool = False) -> int:
    """CPU clock ticks of a process so far: utime + stime (or stime alone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[12]) + (0 if system_only else int(fields[11]))
    except (OSError, IndexError, ValueError):
        return 0


def children_of(pid: int) -> list[int]:
    """The pids of the processes whose parent is ``pid``."""
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
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in Path("/proc/stat").read_text().split()[1:9])
    return {
        "_busy": user + nice + system + irq + softirq + steal,
        "_procs": user + nice + system,
        "_irq": irq + softirq,
        "_steal": steal,
    }


@dataclass
class CpuWatch:
    """CPU time of named processes (a list of pids each) over a measurement."""

    groups: dict[str, list[int]] = field(default_factory=dict)

    def snapshot(self) -> dict[str, int]:
        """Ticks so far of every group, the kernel's share of the proxy's and the floor's, and the machine's."""
        snap = {name: sum(proc_ticks(p) for p in pids) for name, pids in self.groups.items()}
        for name, pids in self.groups.items():  # kernel share: syscalls, i.e. mostly loopback socket I/O
            if name.startswith(("proxy", "floor")):
                snap[f"{name}.sys"] = sum(proc_ticks(p, system_only=True) for p in pids)
        snap.update(machine_ticks())
        return snap

    @staticmethod
    def cores(before: dict[str, int], after: dict[str, int], wall: float) -> dict[str, float]:
        """CPU-seconds per wall second (cores used) of each group and of the machine.

        ``other``: processes not of this run; ``irq``: kernel interrupt/softirq time (which
        includes loopback network delivery); ``steal``: time the hypervisor took.
        """

        def rate(key: str) -> float:
            return (after[key] - before[key]) / CLK_TCK / wall

        used = {k: rate(k) for k in before if not k.startswith("_")}
        ours = sum(v for k, v in used.items() if "." not in k)
        used["machine"] = rate("_busy")
        used["irq"] = rate("_irq")
        used["steal"] = rate("_steal")
        used["other"] = max(0.0, rate("_procs") - ours)
        return used


def watch_run(procs: Processes, redis_pid: int | None, postgres_pid: int | None) -> CpuWatch:
    """A watch over the run's processes (with the children running now: the workers of ``serve
    --workers N``), and over the embedded Redis and Postgres (with the Postgres backends running
    now) when their pids are known."""
    cpu = CpuWatch({name: [proc.pid, *children_of(proc.pid)] for name, proc in procs.procs.items()})
    if redis_pid:
        cpu.groups["redis"] = [redis_pid]
    if postgres_pid:
        cpu.groups["postgres"] = [postgres_pid, *children_of(postgres_pid)]
    return cpu


class Quiet:
    """Before a measurement, wait (within a budget) until other jobs on the machine are quiet.

    The machine's busy time not used by this run's processes is sampled over 0.5 s windows;
    while it exceeds ``threshold`` cores the measurement waits, up to ``budget`` seconds in
    total for the whole run.
    """

    def __init__(self, cpu: CpuWatch, threshold: float, budget: float) -> None:
        self.cpu, self.threshold, self.budget = cpu, threshold, budget
        self.waited = 0.0

    def other_load(self, window: float = 0.5) -> float:
        """Cores used by processes not of this run over the next ``window`` seconds."""
        before, t0 = self.cpu.snapshot(), time.monotonic()
        time.sleep(window)
        return CpuWatch.cores(before, self.cpu.snapshot(), time.monotonic() - t0)["other"]

    def wait(self) -> float:
        """Wait while other jobs are busy (within the budget left); return their load at the end."""
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
