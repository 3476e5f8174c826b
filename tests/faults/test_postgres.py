"""PostgreSQL restarts under load: the request path does not notice (Postgres is not on it),
the worker reconnects by itself and writes every charge exactly once, and the ledger check
is clean afterwards — no manual step."""

from __future__ import annotations

import asyncio
import collections
import importlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy import embedded

from ..support.mock_upstreams import RECEIVED
from ..support.servers import migrated_database
from ..support.traffic import steady_load

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


class PostgresServer:
    """A PostgreSQL server of the test's own (the embedded build), so it can be stopped."""

    def __init__(self, directory: Path):
        self.server: Any = embedded.pgserver_module(directory).get_server((directory / "pg").resolve(), cleanup_mode="delete")
        self.url = str(self.server.get_uri("postgres"))

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: every connection is cut, as a restart or a crash does."""
        commands = importlib.import_module("pgserver._commands")
        commands.pg_ctl(["-m", "fast", "-w", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

    def start(self) -> None:
        self.server.ensure_postgres_running()


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    # Outside pytest's own temporary root: as root, pgserver runs Postgres as another user
    # and opens the directories above its data to it, which a pytest starting meanwhile
    # closes again (it keeps /tmp/pytest-of-<user> at 0700), and pg_ctl stop then fails.
    with tempfile.TemporaryDirectory(prefix="costproxy-fault-pg-") as directory:
        server = PostgresServer(Path(directory))
        yield server
        server.server.cleanup()


@pytest.fixture
def fault_database(postgres_server: PostgresServer) -> Iterator[str]:
    """This module's databases live on a server the test stops and starts."""
    with migrated_database(postgres_server.url, "costproxy_fault") as url:
        yield url


async def test_postgres_restart_under_load_is_survived_without_a_manual_step(world, postgres_server, upstream):
    world.without_limits("enterprise")
    customer = await world.customer("enterprise")
    outcomes: collections.Counter[str] = collections.Counter()
    with world.worker() as worker, world.serve() as proxy:
        url = f"{proxy.url}/openai/v1/chat/completions"
        end = time.monotonic() + 20
        load = [asyncio.create_task(steady_load(url, customer.api_key, end, outcomes)) for _ in range(4)]
        await asyncio.sleep(4)
        await asyncio.to_thread(postgres_server.stop)
        before = outcomes["200"]
        await asyncio.sleep(8)
        served_while_down = outcomes["200"] - before
        await asyncio.to_thread(postgres_server.start)
        await asyncio.gather(*load)
        report = await world.ledger_check()
        assert worker.process.poll() is None, "the worker died instead of reconnecting"

    served = len(upstream.app[RECEIVED])
    charges = await world.pool.fetchval("SELECT count(*) FROM ledger WHERE user_id = $1 AND kind = 'charge'", customer.user_id)
    rows = await world.pool.fetchval("SELECT count(*) FROM usage_events WHERE user_id = $1", customer.user_id)
    assert set(outcomes) == {"200"} and served_while_down > 0, outcomes  # the request path never needs Postgres
    assert charges == rows == served == outcomes["200"], (charges, rows, served, outcomes)
    print(
        f"PostgreSQL stopped 8 s under load: {dict(outcomes)} ({served_while_down} while it was down); "
        f"the worker reconnected and wrote all {rows} charges once; ledger check clean over {report['accounts']} accounts"
    )
