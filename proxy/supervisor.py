"""``costproxy serve --workers N``: N processes sharing one port (``SO_REUSEPORT``), so a
host's cores all serve, supervised by the process the command started.

The parent forks the workers before any of them opens a connection, forwards SIGTERM,
SIGINT and SIGHUP to them, starts a worker again if one dies (it is logged), and exits 0
once every worker stopped cleanly after a SIGTERM. A worker whose supervisor dies (kill -9,
the OOM killer) is sent SIGTERM by the kernel and stops as after any SIGTERM — draining,
settling its holds — instead of serving on, orphaned, on the shared port (Linux). The workers' Prometheus samples go to
one directory (``PROMETHEUS_MULTIPROC_DIR``; a temporary one unless set) so ``/metrics``
on any of them reports the host's totals.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

log = logging.getLogger("costproxy.supervisor")

#: a worker that dies sooner than this after its start is not restarted (it would only die again)
_MIN_LIFETIME_SECONDS = 5.0
#: what the supervisor passes on to its workers
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: prctl(2): the signal the kernel sends this process when its parent dies
_PR_SET_PDEATHSIG = 1


def prepare_metrics() -> tuple[Path, bool]:
    """Point prometheus_client at a directory the workers share, before anything imports
    it; returns the directory and whether it is ours to remove. A directory the operator
    names is created if missing and only its sample files (``*.db``) deleted: whatever else
    it holds (a spool, say) stays."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink(missing_ok=True)
        return path, False
    path = Path(tempfile.mkdtemp(prefix="costproxy-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path, True


class _Supervisor:
    """The worker processes and what happens when one ends."""

    def __init__(self, worker: Callable[[], int]):
        self.worker = worker
        self.children: dict[int, float] = {}  # pid -> when it started
        self.stopping = False
        self.failed = False

    def start(self) -> None:
        """Fork a worker, unless we are stopping. The stop signals wait (blocked) until the
        new worker is in ``children``, so each one reaches every worker."""
        parent = os.getpid()
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            if self.stopping:
                return
            pid = os.fork()
            if pid == 0:
                self._work(parent)
            self.children[pid] = time.monotonic()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)

    def _work(self, parent: int) -> NoReturn:
        """The worker process: ``worker()``, its crash logged, then exit with its status."""
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload before serve() listens for one
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        code = 1
        try:
            _stop_with(parent)
            code = self.worker()
        except SystemExit as exc:  # what sys.exit() would do, then the immediate exit
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                log.error("worker %d: %s", os.getpid(), exc.code)
        except BaseException:
            log.exception("worker %d failed", os.getpid())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def forward(self, signum: int, _frame: object = None) -> None:
        """Pass a signal on to every worker; SIGTERM and SIGINT also mean we are stopping,
        after which a reload (SIGHUP) is no longer passed on."""
        if signum == signal.SIGHUP and self.stopping:
            return
        self.stopping = self.stopping or signum in (signal.SIGTERM, signal.SIGINT)
        for pid in list(self.children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def ended(self, pid: int, code: int) -> None:
        """A worker ended: expected while stopping; else restarted, unless it died at once."""
        started = self.children.pop(pid, time.monotonic())
        _mark_dead(pid)
        if self.stopping:
            self.failed = self.failed or code != 0
            return
        log.error("worker %d exited with %d", pid, code)
        if time.monotonic() - started < _MIN_LIFETIME_SECONDS:
            self.failed = True
            self.forward(signal.SIGTERM)
        else:
            self.start()


def run_workers(count: int, worker: Callable[[], int], metrics: tuple[Path, bool]) -> int:
    """Run ``worker()`` in ``count`` forked processes until a stop signal; 0 if all stopped
    cleanly. ``metrics`` is what :func:`prepare_metrics` returned, called before anything
    imported prometheus_client (its storage is chosen when it is imported)."""
    metrics_dir, made = metrics
    supervisor = _Supervisor(worker)
    for signum in _SIGNALS:
        signal.signal(signum, supervisor.forward)
    for _ in range(count):
        supervisor.start()  # none once a stop signal came
    log.info("%d workers serving (pids %s)", len(supervisor.children), ", ".join(map(str, supervisor.children)))
    try:
        while supervisor.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            supervisor.ended(pid, os.waitstatus_to_exitcode(status))
    finally:
        if made:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 1 if supervisor.failed else 0


def _stop_with(parent: int) -> None:
    """Have the kernel send this process SIGTERM when ``parent`` dies (Linux's
    ``PR_SET_PDEATHSIG``; elsewhere nothing)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _mark_dead(pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]  # unannotated upstream
