"""The processes a benchmark run starts: starting and stopping them, waiting until they
answer over HTTP, and running one-off ``costproxy`` commands."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .common import PY, ROOT, log


class Processes:
    """Every process this run starts, stopped in reverse order at the end.

    Each one runs in the repository, in a session of its own, at priority ``nice`` (see
    ``--nice``), with its stderr (and, unless redirected, stdout) in ``log_dir/<name>.log``.
    """

    def __init__(self, log_dir: Path, nice: int = 0) -> None:
        self.log_dir = log_dir
        self.nice = nice
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[bytes]:
        """Start process ``name``; extra keywords go to :class:`subprocess.Popen`."""
        with open(self.log_dir / f"{name}.log", "wb") as logfile:  # the child keeps its own copy
            kw.setdefault("stdout", logfile)
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stderr=logfile, start_new_session=True, **kw)
        self.procs[name] = proc
        renice(proc.pid, self.nice)
        return proc

    def tail(self, name: str, lines: int = 30) -> str:
        """The last lines of process ``name``'s log."""
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def alive(self, name: str) -> bool:
        """Whether process ``name`` is still running."""
        return self.procs[name].poll() is None

    def stop_all(self) -> None:
        """Stop every process still running, last started first (the worker with SIGINT, the rest with
        SIGTERM; what has not stopped 10 s later is killed, with its process group)."""
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is not None:
                continue
            try:
                os.kill(proc.pid, signal.SIGCONT)  # in case it was paused
                proc.send_signal(signal.SIGINT if name == "worker" else signal.SIGTERM)
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its session's group: with the workers it forked
                proc.wait(timeout=5)
            except ProcessLookupError:
                pass


def renice(pid: int, nice: int) -> None:
    """Set process ``pid``'s priority to ``nice`` (0: leave it); a refusal is logged, not raised."""
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        except OSError as exc:
            log(f"cannot set nice {nice} on {pid}: {exc}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; error statuses are returned, connection errors raised (``OSError``)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http(procs: Processes, name: str, url: str, timeout: float = 30.0, *, any_answer: bool = False) -> None:
    """Wait until ``url`` answers 200 (with ``any_answer``: answers at all) while process ``name`` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procs.alive(name):
            raise RuntimeError(f"{name} exited during start-up:\n{procs.tail(name)}")
        try:
            status = http_get(url, timeout=1.0)[0]
            if any_answer or status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    state = "listening" if any_answer else "ready"
    raise RuntimeError(f"{name} not {state} at {url} after {timeout:.0f} s:\n{procs.tail(name)}")


def costproxy_cmd() -> list[str]:
    """The argv prefix that runs the ``costproxy`` command line of this virtualenv."""
    exe = Path(PY).parent / "costproxy"
    return [str(exe)] if exe.exists() else [PY, "-m", "proxy.cli"]


def run_cli(args: list[str], env: dict[str, str]) -> str:
    """Run ``costproxy ARGS`` with ``env`` and return its stdout; raise if it fails."""
    done = subprocess.run(costproxy_cmd() + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"costproxy {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout
