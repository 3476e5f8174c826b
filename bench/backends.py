"""Redis and Postgres for a benchmark run: finding or starting them, the run's own database,
what the run reads from Redis (command statistics, the usage stream's backlog), and cleaning
up after the run."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis import Redis

from proxy import db, embedded
from proxy.ledger import SHARDS

from .common import SERVERS_DIR, log


@dataclass
class Backends:
    """Where the run's Redis and Postgres are, and what the run did to them."""

    redis_url: str
    admin_db_url: str  # the Postgres server as given (DATABASE_URL or the embedded one)
    database_url: str = ""  # the database the proxy and the worker use
    db_name: str = ""  # the database this run created (dropped at the end), if any
    started_embedded: bool = False  # the embedded servers were started by this run, to stop at the end
    redis_pid: int | None = None  # embedded servers only: their pids, for CPU accounting
    postgres_pid: int | None = None
    aof: AofSwitch | None = None  # --appendfsync: Redis's settings to restore at the end


def _pid_alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().split()[0]), 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


def start_backends(keep_servers: bool) -> Backends:
    """Redis and Postgres from ``REDIS_URL`` / ``DATABASE_URL``, or else the embedded servers under
    ``.data/bench-servers``, started if they are not running (and then, unless ``keep_servers``,
    to be stopped at the end)."""
    redis_url, db_url = os.environ.get("REDIS_URL", ""), os.environ.get("DATABASE_URL", "")
    started = False
    redis_pid = pg_pid = None
    if not redis_url or not db_url:
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


def create_run_database(b: Backends, run_id: str) -> None:
    """A migrated database of this run's own (dropped at the end); the given one, migrated, if
    that is not allowed."""
    name = f"costproxy_bench_{run_id}"
    try:
        b.database_url = asyncio.run(db.create_database(b.admin_db_url, name))
        b.db_name = name
    except Exception as exc:  # no CREATEDB right: share the given database (emails are unique per run)
        log(f"cannot create a database ({exc}); using {b.admin_db_url} as it is")
        b.database_url = b.admin_db_url
        asyncio.run(db.migrate(b.database_url))


def release_backends(b: Backends, prefix: str) -> None:
    """After the run: restore Redis's append-only settings, delete its Redis keys, compact the
    embedded Redis's append-only file, drop its database, and stop the embedded servers if the
    run started them."""
    if b.aof is not None:
        try:
            b.aof.restore()
        except Exception as exc:
            log(f"could not restore Redis's {b.aof.before}: {exc!r}")
    try:
        deleted = delete_prefix(b.redis_url, prefix)
        log(f"deleted {deleted} Redis keys under {prefix}")
        if b.redis_pid:  # the embedded bench Redis: keep its append-only file small
            compact_aof(b.redis_url)
        if b.db_name:
            asyncio.run(db.drop_database(b.admin_db_url, b.db_name))
    except Exception as exc:
        log(f"cleanup of Redis/Postgres failed: {exc!r}")
    if b.started_embedded:
        log("stopping the embedded servers this run started")
        embedded.stop_all(SERVERS_DIR)


def delete_prefix(redis_url: str, prefix: str) -> int:
    """Delete every Redis key under ``prefix``; return how many there were."""
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


def compact_aof(redis_url: str, timeout: float = 30.0) -> None:
    """Rewrite the append-only file: a run appends ~1 KB per request, deletes included."""
    r = Redis.from_url(redis_url)
    try:
        r.bgrewriteaof()
        wait_aof_rewrite(r, timeout)
    except Exception as exc:  # e.g. a rewrite already running, or AOF off: harmless
        log(f"AOF rewrite skipped: {exc}")
    finally:
        r.close()


def wait_aof_rewrite(r: Redis, timeout: float = 30.0) -> None:
    """Wait (at most ``timeout`` s) until Redis is not rewriting its append-only file."""
    deadline = time.monotonic() + timeout
    time.sleep(0.2)
    while r.info("persistence").get("aof_rewrite_in_progress") and time.monotonic() < deadline:
        time.sleep(0.2)


class AofSwitch:
    """``--appendfsync``: the run's Redis with ``appendonly yes`` and the ``appendfsync`` of the
    target being measured, both put back as they were at the end (:meth:`restore`)."""

    def __init__(self, redis_url: str) -> None:
        """Note Redis's settings (to restore); nothing is changed before :meth:`begin`."""
        self.redis = Redis.from_url(redis_url)
        self.before = {k: str(v) for k, v in self.redis.config_get("append*").items() if k in ("appendonly", "appendfsync")}
        self.current = self.before["appendfsync"]

    def begin(self, appendfsync: str) -> None:
        """Turn the append-only file on, with ``appendfsync``."""
        log(f"Redis appendonly {self.before['appendonly']}, appendfsync {self.current}: switching per target")
        if self.before["appendonly"] != "yes":
            self.redis.config_set("appendonly", "yes")  # starts a rewrite, the file's first content
            wait_aof_rewrite(self.redis)
        self.set(appendfsync)

    def set(self, appendfsync: str) -> None:
        """``CONFIG SET appendfsync`` (when it changes)."""
        if appendfsync != self.current:
            self.redis.config_set("appendfsync", appendfsync)
            self.current = appendfsync

    def restore(self) -> None:
        """Put ``appendfsync`` and ``appendonly`` back as they were before the run."""
        self.set(self.before["appendfsync"])
        if self.before["appendonly"] != "yes":
            self.redis.config_set("appendonly", self.before["appendonly"])
        log(f"Redis appendonly {self.before['appendonly']}, appendfsync {self.before['appendfsync']} restored")
        self.redis.close()


def redis_commandstats(redis_url: str) -> dict[str, tuple[int, int]]:
    """{command: (calls, usec)} from INFO commandstats."""
    r = Redis.from_url(redis_url)
    try:
        stats = r.info("commandstats")
    finally:
        r.close()
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in stats.items()}


def commandstats_delta(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """Calls and server time per command between two :func:`redis_commandstats`, most time first."""
    rows = []
    for cmd, (calls, usec) in after.items():
        c0, u0 = before.get(cmd, (0, 0))
        if calls - c0 > 0:
            rows.append({"command": cmd, "calls": calls - c0, "usec": usec - u0, "usec_per_call": (usec - u0) / (calls - c0)})
    return sorted(rows, key=lambda r: -r["usec"])


class UsageLag:
    """Events in this run's ledger streams not yet drained by the worker."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.redis = Redis.from_url(redis_url)
        self.keys = [f"{prefix}{{s{n}}}:ledger" for n in range(SHARDS)]

    def __call__(self) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for key in self.keys:
            pipe.xlen(key)
        return sum(pipe.execute())

    def wait_drained(self, timeout: float = 60.0) -> float:
        """Wait until the worker has drained the streams (at most ``timeout`` s); return the seconds waited."""
        started = time.monotonic()
        while self() > 0:
            if time.monotonic() - started > timeout:
                log(f"usage stream still holds {self()} events after {timeout:.0f} s")
                break
            time.sleep(0.05)
        return time.monotonic() - started
