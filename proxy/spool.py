"""Settlements Redis could not take, kept on local disk until it can.

A post or void that cannot reach Redis (after a few quick retries) is appended, as its
exact script call, to this process's spool file and made durable (fsync) before the
request's answer is finished; a replay loop sends spooled calls again until Redis takes
them. ``resolve.lua`` resolves a hold once, so replaying a call that did go through (its
reply was lost) is a duplicate that charges nothing more: every charge is posted once.

Files: ``<SPOOL_DIR>/spool-<host>-<pid>-<random>.jsonl``, one JSON object per line, either
a call (``{"hold", "keys", "args"}``) or ``{"done": <hold id>}`` once Redis took it. A
process holds an exclusive lock (``flock``) on its own file; a file nobody holds (its
process died, even with ``kill -9``) is adopted by the next process that opens the
spool directory, replayed, and deleted once empty.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import orjson

from . import metrics
from .ledger.pipeline import TRANSIENT_ERRORS
from .ledger.scripts import Arg, ScriptCall
from .ledger.values import NoAccountError

log = logging.getLogger("costproxy.spool")


@dataclass
class _File:
    path: Path
    handle: BinaryIO
    pending: dict[str, ScriptCall] = field(default_factory=dict)


def _line(record: object) -> bytes:
    return orjson.dumps(record) + b"\n"


def _encode(hold_id: str, call: ScriptCall) -> bytes:
    args = [a.decode() if isinstance(a, bytes) else a for a in call.args]
    return _line({"hold": hold_id, "keys": call.keys, "args": args})


def _read(path: Path) -> dict[str, ScriptCall]:
    """The calls of a spool file not yet marked done (a torn last line is skipped)."""
    pending: dict[str, ScriptCall] = {}
    for raw in path.read_bytes().splitlines():
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.warning("skipping a torn line in %s", path)
            continue
        if "done" in record:
            pending.pop(record["done"], None)
        else:
            args: list[Arg] = record["args"]
            pending[record["hold"]] = ScriptCall(record["keys"], args)
    return pending


def _lock(path: Path) -> BinaryIO | None:
    handle = open(path, "ab")  # noqa: SIM115 - kept open (and locked) for the process's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


class Spool:
    """This process's spool in ``directory`` (see the module docstring)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._own: _File | None = None
        self._adopted: list[_File] = []
        self._unsynced: list[bytes] = []
        self._queued = 0  # lines handed to keep()
        self._synced = 0  # lines written and fsynced
        self._sync_lock = asyncio.Lock()

    def open(self) -> int:
        """Create this process's file and adopt the files of processes that died; returns
        the calls waiting to be replayed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.directory.glob("spool-*.jsonl")):
            handle = _lock(path)
            if handle is not None:
                self._adopted.append(_File(path, handle, _read(path)))
        name = f"spool-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}.jsonl"
        # Created under a name the glob above does not match and renamed once locked: a
        # process starting in the same instant would otherwise adopt it before the lock.
        hidden = self.directory / f".{name}"
        own = _lock(hidden)
        assert own is not None  # a name of our own: nobody else holds it
        hidden.rename(self.directory / name)
        self._own = _File(self.directory / name, own)
        waiting = len(self)
        if waiting:
            log.warning("spool: %d settlements left by stopped processes will be posted when Redis answers", waiting)
        metrics.SPOOL_PENDING.set(waiting)
        return waiting

    def __len__(self) -> int:
        return sum(len(f.pending) for f in self._files())

    def _files(self) -> list[_File]:
        return ([self._own] if self._own else []) + self._adopted

    async def keep(self, hold_id: str, call: ScriptCall) -> None:
        """Append a settlement Redis did not take; returns once it is on disk (fsync).
        Concurrent calls share one write and fsync."""
        own = self._own
        assert own is not None, "Spool.open() first"
        own.pending[hold_id] = call
        self._unsynced.append(_encode(hold_id, call))
        self._queued += 1
        mine = self._queued
        metrics.SPOOLED.inc()
        metrics.SPOOL_PENDING.set(len(self))
        async with self._sync_lock:
            if self._synced >= mine:
                return
            lines, self._unsynced = self._unsynced, []
            upto = self._queued
            await asyncio.to_thread(self._append_durably, own.handle, b"".join(lines))
            self._synced = upto

    @staticmethod
    def _append_durably(handle: BinaryIO, data: bytes) -> None:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())

    async def replay(self, run: Callable[[ScriptCall], Awaitable[object]]) -> int:
        """Send the spooled calls again through ``run`` until Redis stops answering;
        returns how many it took. A call whose account is missing (Redis lost it, awaiting
        ``ledger rebuild``), or that Redis refuses, stays spooled (logged) and the next is sent."""
        taken = 0
        for spooled in self._files():
            for hold_id, call in list(spooled.pending.items()):
                try:
                    await run(call)
                except TRANSIENT_ERRORS:
                    metrics.SPOOL_PENDING.set(len(self))
                    return taken
                except NoAccountError:
                    log.error("spooled settlement of hold %s waits: its account is not in Redis (ledger rebuild?)", hold_id)
                    continue
                except Exception:  # Redis refused this one call: keep it, and let the others through
                    log.exception("spooled settlement of hold %s was refused; it stays spooled", hold_id)
                    continue
                del spooled.pending[hold_id]
                spooled.handle.write(_line({"done": hold_id}))  # lost with a crash: the replay is a duplicate
                spooled.handle.flush()
                taken += 1
        self._compact()
        metrics.SPOOL_PENDING.set(len(self))
        return taken

    def _compact(self) -> None:
        own = self._own
        if own is not None and not own.pending and not self._unsynced and own.handle.tell():
            own.handle.truncate(0)
            own.handle.seek(0)
        for adopted in [f for f in self._adopted if not f.pending]:
            adopted.path.unlink(missing_ok=True)
            adopted.handle.close()
            self._adopted.remove(adopted)

    def close(self) -> None:
        """Release the files; this process's is deleted if nothing in it waits."""
        for spooled in self._files():
            if not spooled.pending:
                spooled.path.unlink(missing_ok=True)
            spooled.handle.close()
        self._own, self._adopted = None, []


class _Settles(Protocol):
    async def run_settlement(self, call: ScriptCall) -> object: ...


async def replay_spool(spool: Spool, ledger: _Settles, every: float = 1.0) -> None:
    """Replay ``spool`` through ``ledger`` every ``every`` seconds while it holds anything, until cancelled."""
    while True:
        await asyncio.sleep(every)
        if len(spool):
            try:
                taken = await spool.replay(ledger.run_settlement)
            except Exception:  # not Redis being away (replay handles that): log, keep the calls, try again
                log.exception("spool replay failed")
                continue
            if taken:
                log.info("spool: Redis took %d settlements, %d still waiting", taken, len(spool))
