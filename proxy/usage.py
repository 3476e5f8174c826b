"""The usage log: ledger events move from the shard streams in Redis to Postgres.

Usage warnings travel the same streams; they are mailed (:mod:`proxy.notices`) rather
than written.

Events are read with a consumer group, written in one transaction per batch with
``ON CONFLICT DO NOTHING`` (so a replay is harmless), and acknowledged and deleted only
after the commit. A Postgres outage leaves them pending in Redis; they are written when
it is back. Entries held by a consumer that died are claimed after ``CLAIM_IDLE_MS``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from datetime import datetime, timezone
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from . import metrics
from .ledger import Ledger
from .notices import UsageWarnings
from .rollup import write_usage

log = logging.getLogger("costproxy.usage")

GROUP = "ledger-writers"
CLAIM_IDLE_MS = 60_000

# One statement per batch (arrays of columns), not one per row: a fraction of Postgres's work.
_LEDGER_SQL = """
INSERT INTO ledger (id, user_id, kind, amount_micro, balance_micro, hold_id, reason, created_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[], $7::text[],
                     $8::timestamptz[])
ON CONFLICT (id) DO NOTHING
"""


def _rows(fields: dict[str, str]) -> tuple[tuple[Any, ...], tuple[Any, ...] | None]:
    """The ledger row, and the usage row for a charge, of one stream entry (its details,
    if any, arrive as one JSON field ``e``)."""
    if "e" in fields:
        fields = {**orjson.loads(fields.pop("e")), **fields}
    at = datetime.fromtimestamp(int(fields["ts"]) / 1000, tz=timezone.utc)
    amount = int(fields["amount"])
    ledger = (
        fields["id"], fields["user"], fields["kind"], amount, int(fields["balance"]),
        fields.get("hold"), fields.get("reason"), at,
    )
    if fields["kind"] != "charge":
        return ledger, None
    n = lambda name: int(fields.get(name) or 0)  # noqa: E731
    usage = (
        fields["id"], fields["user"], fields["key"], fields["provider"], fields["model"], fields["tier"],
        n("in"), n("cached"), n("cache_write"), n("out"), n("reasoning"), -amount,
        n("estimated") == 1, n("stream") == 1, n("status"), n("ms"), at,
    )
    return ledger, usage


class UsageLog:
    """Drains every shard's ledger stream into Postgres."""

    def __init__(self, redis: Redis, ledger: Ledger, pool: asyncpg.Pool, batch: int = 500, warnings: UsageWarnings | None = None):
        self.redis = redis
        self.warnings = warnings
        self.pool = pool
        self.batch = batch
        self.streams = ledger.stream_keys()
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"

    async def ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _read(self, start: str, block_ms: int | None) -> list[tuple[str, list[tuple[bytes, dict[bytes, bytes]]]]]:
        streams = {s: start for s in self.streams}
        try:
            found = await self.redis.xreadgroup(GROUP, self.consumer, streams, count=self.batch, block=block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_groups()  # first run, or Redis lost the streams
            found = await self.redis.xreadgroup(GROUP, self.consumer, streams, count=self.batch, block=block_ms)
        return [(s.decode() if isinstance(s, bytes) else s, entries) for s, entries in found or [] if entries]

    async def drain_once(self, block_ms: int | None = None, pending_first: bool = True) -> int:
        """Write one batch (this consumer's unacknowledged entries first, unless told there
        are none); return the events handled."""
        batch = (await self._read("0", None) if pending_first else []) or await self._read(">", block_ms)
        if not batch:
            return 0
        ledger_rows, usage_rows, warnings = [], [], []
        for _, entries in batch:
            for _, raw in entries:
                fields = {k.decode(): v.decode() for k, v in raw.items()}
                if fields["kind"] == "warning":
                    warnings.append(fields)
                    continue
                ledger_row, usage_row = _rows(fields)
                ledger_rows.append(ledger_row)
                if usage_row is not None:
                    usage_rows.append(usage_row)
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                if ledger_rows:
                    await conn.execute(_LEDGER_SQL, *(list(column) for column in zip(*ledger_rows)))
                if usage_rows:
                    await write_usage(conn, usage_rows)  # with their daily rollup; a replay counts once
            if warnings and self.warnings is not None:
                await self.warnings.send(conn, warnings)
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, entries in batch:
                ids = [entry_id for entry_id, _ in entries]
                pipe.xack(stream, GROUP, *ids)
                pipe.xdel(stream, *ids)
            await pipe.execute()
        metrics.USAGE_LOG_WRITTEN.inc(len(ledger_rows))
        return len(ledger_rows) + len(warnings)

    async def claim_abandoned(self) -> bool:
        """Take over entries a dead consumer read but never acknowledged; True if any."""
        claimed = False
        for stream in self.streams:
            found = await self.redis.xautoclaim(stream, GROUP, self.consumer, CLAIM_IDLE_MS, count=self.batch)
            claimed = claimed or bool(found[1])
        return claimed

    async def lag(self) -> int:
        """Events in Redis not yet written to Postgres."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xlen(stream)
            lengths = await pipe.execute()
        total = sum(lengths)
        metrics.USAGE_LOG_LAG.set(total)
        return total

    async def run(self, stop: asyncio.Event, gather_seconds: float = 0.2) -> None:
        """Drain until ``stop`` is set, backing off while Postgres is unreachable.

        After a short batch it waits ``gather_seconds`` so the next one is large: one
        transaction per few hundred events, not one per event, keeps the worker's share of
        the machine small. Own pending entries are re-read only at start and after errors.
        """
        await self.ensure_groups()
        loop = asyncio.get_running_loop()
        backoff, pending, next_chores = 0.5, True, 0.0
        while not stop.is_set():
            try:
                if loop.time() >= next_chores:
                    pending = await self.claim_abandoned() or pending
                    await self.lag()
                    next_chores = loop.time() + 5
                handled = await self.drain_once(block_ms=1000, pending_first=pending)
                pending, backoff = False, 0.5
                if handled < self.batch:
                    await asyncio.sleep(gather_seconds)
            except (OSError, RedisError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                metrics.USAGE_LOG_ERRORS.inc()
                log.warning("usage log write failed, events stay in Redis and will be retried: %s", exc)
                pending = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30)
