"""Real costproxy processes for the tests that need them: started from the CLI exactly as
an operator would, killed with SIGKILL or stopped with SIGTERM."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from proxy.settings import Settings

from . import ROOT


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def environment(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a costproxy process needs to run with the test's ``settings``."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "REDIS_PREFIX": settings.redis_prefix,
        "PRICING_FILE": str(settings.pricing_file),
        "TIERS_FILE": str(settings.tiers_file),
        "SPOOL_DIR": str(settings.spool_dir),
        "KEY_CACHE_SECONDS": str(settings.key_cache_seconds),
        **{f"{name.upper()}_API_KEY": key for name, key in settings.provider_keys.items()},
        **{f"{name.upper()}_UPSTREAM_URL": url for name, url in settings.upstream_urls.items()},
    }
    return {**env, **extra}


@dataclass
class Running:
    """A started process and the base URL it serves on."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, and the exit status once the process stopped."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def answers(url: str, timeout: float = 1.0) -> int | None:
    """The HTTP status ``url`` answers with, or None if it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return None


@contextmanager
def costproxy(
    command: list[str], env: Mapping[str, str], log: Path, *, port: int | None = None, open_files: int | None = None
) -> Iterator[Running]:
    """Run ``costproxy <command> --port <port>`` until the block ends (then SIGKILL if still up);
    waits for ``/healthz``. ``open_files`` lowers its descriptor limit."""
    port = port or free_port()

    def limit() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", *command, "--port", str(port)],
            cwd=ROOT, env=dict(env), stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit,
        )  # fmt: skip
    running = Running(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 30
        while answers(f"{running.url}/healthz") != 200:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"costproxy {command[0]} did not start:\n{running.output()}")
            time.sleep(0.05)
        yield running
    finally:
        if process.poll() is None:
            running.kill()
