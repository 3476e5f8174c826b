"""Driving the load generator: where every target listens, the command that measures one
scenario against one of them, and the parent's side of the ``bench.loadgen`` process
(one JSON command line in, one JSON result line out)."""

from __future__ import annotations

import selectors
import subprocess
from dataclasses import dataclass
from typing import Any

import orjson

from .common import PY
from .processes import Processes
from .scenarios import Scenario
from .targets import TargetSpec


@dataclass(frozen=True)
class Endpoints:
    """Where the targets listen, and the benchmark user's proxy key."""

    proxy_url: str  # base URL of the one-process proxy
    bases: dict[str, dict[str, str]]  # provider -> {listener (see TargetSpec.listener): base URL}
    api_key: str
    targets: dict[str, TargetSpec]  # every target of the run by name, in measuring order

    def url(self, s: Scenario, target: str) -> tuple[str, dict[str, str]]:
        """(url, headers) of scenario ``s`` sent to ``target``."""
        spec = self.targets[target]
        return s.request(spec.kind, self.bases[s.provider.name][spec.listener], self.api_key)

    def command(self, s: Scenario, target: str, concurrency: int, seconds: float, warmup: float) -> dict[str, Any]:
        """The load generator's command for ``warmup + seconds`` of scenario ``s`` against ``target``."""
        url, headers = self.url(s, target)
        return {
            "url": url,
            "method": s.method,
            "headers": headers,
            "body": s.body_bytes().decode("latin-1"),
            "stream": s.stream,
            "done_marker": s.done_marker if s.stream else "",
            "concurrency": concurrency,
            "duration": seconds,
            "warmup": warmup,
        }


class LoadGen:
    """The load generator process (``python -m bench.loadgen``), started and waited for on creation."""

    def __init__(self, procs: Processes) -> None:
        proc = procs.start("loadgen", [PY, "-m", "bench.loadgen"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        self.stdin, self.stdout = proc.stdin, proc.stdout
        self.procs = procs
        if self._readline(30) != b"ready":
            raise RuntimeError(f"load generator did not start:\n{procs.tail('loadgen')}")

    def _readline(self, timeout: float) -> bytes:
        with selectors.DefaultSelector() as sel:
            sel.register(self.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise RuntimeError(f"load generator silent for {timeout:.0f} s:\n{self.procs.tail('loadgen')}")
        line = self.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited:\n{self.procs.tail('loadgen')}")
        return line.strip()

    def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Run one measurement (see :meth:`Endpoints.command`) and return its result."""
        self.stdin.write(orjson.dumps(cmd) + b"\n")
        self.stdin.flush()
        result: dict[str, Any] = orjson.loads(self._readline(cmd["duration"] + cmd.get("warmup", 0) + 120))
        return result
