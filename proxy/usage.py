"""The usage log: ledger events move from the shard streams in Redis to Postgres.

Usage warnings travel the same streams; they are mailed (:mod:`proxy.notices`) rather
than written.

Events are read with a consumer group, written in one transaction per batch with
``ON CONFLICT DO NOTHING`` (so a replay is harmless), and acknowledged and deleted only
after the commit. A Postgres outage leaves them pending in Redis; they are written when
it is back. Entries held by a consumer that died are claimed after ``claim_idle_ms``
(``WORKER_CLAIM_IDLE_SECONDS``).

Postgres only gets what a failover cannot take back from Redis: where a primary has
replicas, a batch is written once one of them has acknowledged it (a mark touched after
the read, then ``WAIT`` on the same connection, on the server the batch came from). Replication is asynchronous, so a primary
can answer writes its replica never receives; if the worker wrote those and the replica
then took over, Postgres would hold charges the new primary does not - a balance off by
them until ``ledger rebuild``. Unacknowledged, the batch stays pending in Redis and is read
again: after a failover, what survived is written and what did not is in neither.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError
from redis.typing import KeyT, StreamIdT

from . import metrics
from .db import POSTGRES_UNAVAILABLE
from .ledger import SHARDS, Ledger, LedgerEntry, UsageWarning, decode_entry
from .ledger.scripts import text
from .notices import UsageWarnings
from .redis_url import RedisClient
from .rollup import write_usage

log = logging.getLogger("costproxy.usage")

GROUP = "ledger-writers"
#: how long a stream's replication mark lives untouched (it is touched by every batch)
_MARK_TTL_MS = 30 * 86_400_000
#: entries of one stream as XREADGROUP returns them: (entry id, fields)
StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]

# One statement per batch (arrays of columns), not one per row: a fraction of Postgres's work.
_LEDGER_SQL = """
INSERT INTO ledger (id, user_id, kind, amount_micro, balance_micro, hold_id, reason, created_at,
                    stream_order, cycle_start, cycle_end, auto_renew)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[], $7::text[],
                     $8::timestamptz[], $9::bigint[], $10::timestamptz[], $11::timestamptz[], $12::boolean[])
ON CONFLICT (id) DO NOTHING
"""


class UnreplicatedError(RedisError):
    """No replica of a primary acknowledged the events read from it within the wait; they
    stay pending in Redis and are read again."""


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def ledger_row(entry: LedgerEntry) -> tuple[Any, ...]:
    """The ``ledger`` row of a money movement, in :data:`_LEDGER_SQL`'s column order."""
    cycle = entry.cycle
    starts = (_at(cycle.start_ms), _at(cycle.end_ms), cycle.auto_renew) if cycle else (None, None, None)
    return (entry.id, entry.user_id, entry.kind.value, entry.amount, entry.balance, entry.hold_id, entry.reason, _at(entry.at_ms),
            entry.order, *starts)  # fmt: skip


def usage_row(entry: LedgerEntry) -> tuple[Any, ...] | None:
    """The ``usage_events`` row of a charge (:data:`proxy.rollup.USAGE_COLUMNS` order); None for other movements."""
    u = entry.usage
    if u is None:
        return None
    return (
        entry.id,
        entry.user_id,
        u.key_id,
        u.provider,
        u.model,
        u.tier,
        u.input_tokens,
        u.cached_input_tokens,
        u.cache_write_tokens,
        u.output_tokens,
        u.reasoning_tokens,
        -entry.amount,
        u.estimated,
        u.stream,
        u.status,
        u.latency_ms,
        _at(entry.at_ms),
        u.cache_write_1h_tokens,
        None if u.service_tier is None else u.service_tier.value,
        u.price_version,
    )


class UsageLog:
    """Drains every shard's ledger stream into Postgres."""

    def __init__(
        self,
        redis: RedisClient,
        ledger: Ledger,
        pool: asyncpg.Pool,
        batch: int = 500,
        warnings: UsageWarnings | None = None,
        claim_idle_ms: int = 60_000,
        replication_wait_ms: int = 1_000,
    ):
        self.redis = redis
        self.warnings = warnings
        self.pool = pool
        self.batch = batch
        self.claim_idle_ms = claim_idle_ms
        self.replication_wait_ms = replication_wait_ms
        self.streams = ledger.keys.streams()
        self._marks = dict(zip(self.streams, (ledger.keys.replication_mark(n) for n in range(SHARDS)), strict=True))
        self._primaries: dict[str, str] = {}  # node name ("" outside a cluster) → its server's run_id
        self._replicas: dict[str, int] = {}  # run_id → the most replicas seen on that server
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"

    async def ensure_groups(self) -> None:
        """Create the consumer group of every shard stream that lacks one, and the marks that
        tell when a replica has what was read (written now, while Redis has room)."""
        for stream in self.streams:
            await self._ensure_group(stream)
            try:
                await self.redis.set(self._marks[stream], self.consumer, px=_MARK_TTL_MS)
            except OutOfMemoryError:
                log.warning("Redis is out of memory: the replication mark of %s is written with its first batch", stream)

    async def _ensure_group(self, stream: str) -> None:
        try:
            await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read_stream(self, stream: str, start: str) -> tuple[str, StreamEntries]:
        ask: dict[KeyT, StreamIdT] = {stream: start}
        try:
            found = await self.redis.xreadgroup(GROUP, self.consumer, ask, count=self.batch)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._ensure_group(stream)  # first run, or Redis lost the streams
            found = await self.redis.xreadgroup(GROUP, self.consumer, ask, count=self.batch)
        replies = cast(list[tuple[bytes, StreamEntries]], found or [])
        return stream, [entry for _, entries in replies for entry in entries]

    async def _read(self, start: str) -> list[tuple[str, StreamEntries]]:
        """Entries of every shard stream, each read on its own (on a cluster the streams live
        on different nodes, and one XREADGROUP over several slots is refused)."""
        found = await asyncio.gather(*(self._read_stream(stream, start) for stream in self.streams))
        return [(stream, entries) for stream, entries in found if entries]

    async def _primary_info(self, node: ClusterNode | None) -> dict[str, Any]:
        return await (self.redis.info() if node is None else self.redis.info(target_nodes=node))

    async def refresh_replicas(self) -> None:
        """Learn which server each primary is (its ``run_id``) and count its replicas: a
        batch waits for an acknowledgement only where a replica can give one.

        A server keeps the most replicas this worker has seen on it: one that lost its
        replica is likely the old primary of a failover, whose last writes are about to be
        dropped, so its batches keep waiting (a replica removed for good: restart the
        worker). A replica promoted in its place is another server, counted afresh.
        """
        nodes: list[tuple[str, ClusterNode | None]] = (
            [(node.name, node) for node in self.redis.get_primaries()] if isinstance(self.redis, RedisCluster) else [("", None)]
        )
        seen = self._replicas
        for name, node in nodes:
            info = await self._primary_info(node)
            run_id, count = str(info["run_id"]), int(info.get("connected_slaves", 0))
            if count < seen.get(run_id, 0):
                log.warning(
                    "Redis primary %s had %d replicas and has %d: the usage log writes only what a replica acknowledged "
                    "(after removing a replica for good, restart the worker)", name or run_id, seen[run_id], count,
                )  # fmt: skip
            seen[run_id] = max(count, seen.get(run_id, 0))
            self._primaries[name] = run_id

    async def _acknowledged(self, stream: str, node: ClusterNode | None, run_id: str) -> bool:
        """Whether a replica of the server ``run_id`` has everything read from ``stream``."""
        mark = self._marks[stream]
        for _ in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                # The mark is touched after the reads were answered, so its replication offset
                # is past every event they returned and WAIT counts the replicas that have
                # it. PEXPIRE, unlike SET, is taken by a primary out of memory (which the
                # worker must drain); INFO says whether a retry sent all this elsewhere.
                pipe.pexpire(mark, _MARK_TTL_MS)
                for command in (("WAIT", 1, self.replication_wait_ms), ("INFO", "server")):
                    if node is None:
                        pipe.execute_command(*command)
                    else:
                        pipe.execute_command(*command, target_nodes=node)
                touched, acknowledged, info = await pipe.execute()
            if touched:
                return int(acknowledged) >= 1 and cast(dict[str, Any], info).get("run_id") == run_id
            await self.redis.set(mark, self.consumer, px=_MARK_TTL_MS)  # first run, or the mark was lost
        return False

    async def confirm_replicated(self, streams: list[str]) -> None:
        """Return once a replica of every primary that ``streams`` live on has what was read
        from them (at once where a primary has no replica); :class:`UnreplicatedError`
        if one did not acknowledge within ``replication_wait_ms``, or the primary is not
        the server it was (a failover: the batch is read again from the new one)."""
        nodes = {
            stream: self.redis.get_node_from_key(stream) if isinstance(self.redis, RedisCluster) else None for stream in streams
        }
        if any(("" if node is None else node.name) not in self._primaries for node in nodes.values()):
            await self.refresh_replicas()
        waits: dict[str, tuple[str, ClusterNode | None, str]] = {}
        for stream, node in nodes.items():
            name = "" if node is None else node.name
            run_id = self._primaries.get(name, "")
            if self._replicas.get(run_id, 0) > 0:
                waits.setdefault(name, (stream, node, run_id))
        acknowledged = await asyncio.gather(*(self._acknowledged(*wait) for wait in waits.values()))
        missing = [name or "the primary" for name, ok in zip(waits, acknowledged, strict=True) if not ok]
        if missing:
            self._primaries.clear()  # learn them again: one may be another server now
            metrics.USAGE_LOG_UNREPLICATED.inc()
            raise UnreplicatedError(
                f"no replica of {', '.join(missing)} acknowledged the events read within {self.replication_wait_ms} ms"
            )

    async def drain_once(self, pending_first: bool = True) -> int:
        """Write one batch (this consumer's unacknowledged entries first, unless told there
        are none); return the events handled."""
        batch = (await self._read("0") if pending_first else []) or await self._read(">")
        if not batch:
            return 0
        await self.confirm_replicated([stream for stream, _ in batch])
        ledger_rows, usage_rows, warnings = [], [], []
        for _, entries in batch:
            for entry_id, raw in entries:
                if not raw:  # deleted while pending (`ledger rebuild --force` drops unwritten entries): only acknowledged
                    continue
                entry = decode_entry({k.decode(): v.decode() for k, v in raw.items()}, text(entry_id))
                if isinstance(entry, UsageWarning):
                    warnings.append(entry)
                    continue
                ledger_rows.append(ledger_row(entry))
                if (usage := usage_row(entry)) is not None:
                    usage_rows.append(usage)
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                if ledger_rows:
                    await conn.execute(_LEDGER_SQL, *(list(column) for column in zip(*ledger_rows, strict=True)))
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
            found = await self.redis.xautoclaim(stream, GROUP, self.consumer, self.claim_idle_ms, count=self.batch)
            claimed = claimed or bool(found[1])
        return claimed

    async def lag(self) -> int:
        """Events in Redis not yet written to Postgres."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xlen(stream)
            lengths: list[int] = await pipe.execute()
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
                    await self.refresh_replicas()
                    next_chores = loop.time() + 5
                handled = await self.drain_once(pending_first=pending)
                pending, backoff = False, 0.5
                if handled < self.batch:
                    await asyncio.sleep(gather_seconds)
            except (RedisError, *POSTGRES_UNAVAILABLE) as exc:
                metrics.USAGE_LOG_ERRORS.inc()
                log.warning("usage log write failed, events stay in Redis and will be retried: %s", exc)
                pending = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30)
