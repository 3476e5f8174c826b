"""The fault tests' world: a Redis server of the test's own (so it can be stopped, killed
and flushed), a database of its own, a mock upstream, and costproxy processes started from
the CLI with short hold TTLs and sweep intervals."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from aiohttp import web
from aiohttp.typedefs import Handler
from redis.asyncio import Redis

from proxy.accounts import Accounts
from proxy.config import load_config
from proxy.keys import KeyMirror
from proxy.ledger import Ledger
from proxy.settings import Settings

from ..support import ROOT
from ..support.accounts import Customer, create_customer
from ..support.mock_upstreams import openai_app
from ..support.processes import costproxy, environment
from ..support.redis_server import RedisServer
from ..support.servers import migrated_database

pytestmark = pytest.mark.faults


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.kill()


@pytest.fixture
def fault_database(servers: tuple[str, str]) -> Iterator[str]:
    """A database of the test's own: `ledger check` looks at every account in it."""
    with migrated_database(servers[1], f"costproxy_fault_{uuid.uuid4().hex[:10]}") as url:
        yield url


async def _delay(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``x-fault-delay: <seconds>`` makes the mock think that long before answering (after it
    recorded the request: a test waiting for requests to arrive sees them at once)."""
    response = await handler(request)
    await asyncio.sleep(float(request.headers.get("x-fault-delay", "0")))
    return response


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Any:
    """The mock OpenAI upstream, in the test's process (the proxies talk to it over TCP)."""
    app = openai_app()
    app.middlewares.append(web.middleware(_delay))
    return await aiohttp_server(app)


@pytest.fixture
def fault_settings(settings: Settings, redis_server: RedisServer, fault_database: str, upstream: Any, tmp_path: Path) -> Settings:
    return replace(
        settings,
        redis_url=redis_server.url,
        database_url=fault_database,
        redis_prefix="cp:",
        upstream_urls={"openai": str(upstream.make_url("")).rstrip("/")},
        hold_ttl_seconds=3.0,
        heartbeat_seconds=0.5,
        spool_dir=tmp_path / "spool",
    )


#: what every process of a fault test runs with, beyond the settings
PROCESS_ENV = {
    "HOLD_TTL_SECONDS": "3",
    "HEARTBEAT_SECONDS": "0.5",
    "WORKER_SWEEP_SECONDS": "0.5",
    "WORKER_CLAIM_IDLE_SECONDS": "1",
}


@dataclass
class World:
    """The fault test's servers, its service objects in this process, and how to start processes."""

    settings: Settings
    redis: Redis
    pool: asyncpg.Pool
    ledger: Ledger
    accounts: Accounts
    logs: Path

    def without_limits(self, tier: str, admission: str | None = None) -> None:
        """Drop ``tier``'s rate and monthly limits (and set its admission policy) in the
        test's tiers.yaml, before processes start: load tests measure money, not limits."""
        tiers = yaml.safe_load(self.settings.tiers_file.read_text())
        entry = tiers["tiers"][tier]
        for limit in ("rpm", "monthly_requests", "monthly_tokens"):
            entry.pop(limit, None)
        if admission:
            entry["admission"] = admission
        self.settings.tiers_file.write_text(yaml.safe_dump(tiers))
        self.accounts.config = load_config(self.settings.pricing_file, self.settings.tiers_file)

    def env(self, **extra: str) -> dict[str, str]:
        return environment(self.settings, **{**PROCESS_ENV, **extra})

    def serve(self, name: str = "serve", **extra: str) -> Any:
        return costproxy(["serve"], self.env(**extra), self.logs / f"{name}.log")

    def worker(self, name: str = "worker", **extra: str) -> Any:
        return costproxy(["worker"], self.env(**extra), self.logs / f"{name}.log")

    async def customer(self, tier: str = "starter", balance_micro: int | None = None) -> Customer:
        return await create_customer(self.accounts, self.ledger, tier, balance_micro)

    async def ledger_check(self, wait: float = 60, **env: str) -> dict[str, Any]:
        """``costproxy ledger check --json``, the command an operator runs: its report, which must be clean."""
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "proxy.cli", "ledger", "check", "--json", "--wait", str(wait)],
            cwd=ROOT, env=self.env(**env), capture_output=True, text=True, timeout=wait + 60,
        )  # fmt: skip
        report: dict[str, Any] = json.loads(done.stdout)
        assert done.returncode == 0 and report["clean"], f"ledger check found differences:\n{done.stdout}\n{done.stderr}"
        return report

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", *args], cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=120
        )


@pytest.fixture
async def world(fault_settings: Settings, tmp_path: Path) -> AsyncIterator[World]:
    redis = Redis.from_url(fault_settings.redis_url)
    pool = await asyncpg.create_pool(fault_settings.database_url, min_size=1, max_size=4)
    ledger = Ledger(redis, fault_settings.redis_prefix)
    config = load_config(fault_settings.pricing_file, fault_settings.tiers_file)
    accounts = Accounts(pool, ledger, KeyMirror(redis, fault_settings.redis_prefix), config)
    logs = tmp_path / "logs"
    logs.mkdir()
    yield World(fault_settings, redis, pool, ledger, accounts, logs)
    await pool.close()
    await redis.aclose()
