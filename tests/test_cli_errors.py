"""The CLI's errors an operator makes or meets — a malformed REDIS_URL, Redis or Postgres
down, a database that does not exist, a connection that breaks — come out as one line and exit status 1, not a
traceback."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import asyncpg
import pytest

from proxy.db import _MIGRATION_LOCK, database_url

from .support import ROOT
from .support.processes import environment, free_port
from .support.waiting import until

MALFORMED = {"REDIS_URL": "localhost:6379"}
NO_SCHEME = "REDIS_URL 'localhost:6379' has no scheme"
POSTGRES_DOWN = {"DATABASE_URL": "postgresql://costproxy:secret@127.0.0.1:{port}/costproxy"}
REDIS_DOWN = {"REDIS_URL": "redis://127.0.0.1:{port}"}


@pytest.mark.parametrize(
    ("command", "broken", "message"),
    [
        (
            ["users", "create", "--email", "ada@example.com", "--tier", "free"],
            MALFORMED,
            "REDIS_URL 'localhost:6379' has no scheme",
        ),
        (["serve", "--port", "{port}"], MALFORMED, NO_SCHEME),
        (["migrate"], POSTGRES_DOWN, "cannot connect to PostgreSQL at 127.0.0.1:{port}: "),
        (["keys", "list"], POSTGRES_DOWN, "cannot connect to PostgreSQL at 127.0.0.1:{port}: "),
        (["ledger", "check", "--wait", "0"], REDIS_DOWN, "Redis: Error 111 connecting to 127.0.0.1:{port}"),
        (["migrate"], {"DATABASE_URL": "{database}"}, 'database "costproxy_no_such_database" does not exist'),
    ],
    ids=[
        "malformed-redis-url",
        "serve-malformed-redis-url",
        "postgres-down",
        "postgres-down-accounts",
        "redis-down",
        "no-database",
    ],
)
async def test_a_broken_setting_or_server_is_one_line_and_exit_1(settings, command, broken, message):
    values = {"port": free_port(), "database": database_url(settings.database_url, "costproxy_no_such_database")}
    env = environment(settings, **{name: value.format(**values) for name, value in broken.items()})
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy.cli", *(arg.format(**values) for arg in command)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert f"error: {message.format(**values)}" in done.stderr, done.stderr
    assert "secret" not in done.stderr  # a password in a URL stays out of the message


async def test_migrate_whose_connection_breaks_says_why(settings):
    holder = await asyncpg.connect(settings.database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)  # migrate waits for it
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.cli", "migrate", cwd=ROOT, env=environment(settings), stderr=subprocess.PIPE
        )

        async def waiting() -> int | None:
            return await holder.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
                "AND query LIKE 'SELECT pg_advisory_lock%'"
            )

        await until(waiting, 30, "migrate to wait for the lock")
        await holder.execute("SELECT pg_terminate_backend($1)", await waiting())
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        await holder.close()
    assert process.returncode == 1
    last = stderr.decode().splitlines()[-1]
    assert last.startswith("error: ") and last.endswith("terminating connection due to administrator command"), last
