"""Live holds kept alive: every ``HEARTBEAT_SECONDS`` each proxy process renews the holds
of the requests it is still serving and records what each has cost so far.

A hold that stops being renewed (its proxy died) expires after ``HOLD_TTL_SECONDS`` and
the worker posts it at its last recorded progress, marked estimated: a crashed request is
charged at least its prompt estimate plus the output relayed before its last heartbeat.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from . import metrics
from .gate import Ticket
from .ledger import Ledger, LedgerReplyError

log = logging.getLogger("costproxy.holds")


class HoldKeeper:
    """The live tickets of one process, and the loop that beats for them."""

    def __init__(self, ledger: Ledger, *, hold_ttl_seconds: float, heartbeat_seconds: float):
        self.ledger = ledger
        self.hold_ttl_ms = int(hold_ttl_seconds * 1000)
        self.heartbeat_seconds = heartbeat_seconds
        self._live: dict[str, Ticket] = {}

    def track(self, ticket: Ticket) -> None:
        """Keep ``ticket``'s hold alive until :meth:`release`."""
        self._live[ticket.hold.id] = ticket

    def release(self, ticket: Ticket) -> None:
        """Stop renewing ``ticket``'s hold (it was posted, voided or spooled)."""
        self._live.pop(ticket.hold.id, None)

    def __len__(self) -> int:
        return len(self._live)

    async def beat(self) -> int:
        """Renew every live hold once; returns how many Redis renewed."""
        beats = [(ticket.hold, ticket.progress()) for ticket in self._live.values() if not ticket.settled]
        if not beats:
            return 0
        return await self.ledger.heartbeat(beats, hold_ttl_ms=self.hold_ttl_ms)

    async def run(self) -> None:
        """Beat every ``heartbeat_seconds`` until cancelled; a failed beat is counted and retried."""
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            try:
                await self.beat()
            except (OSError, RedisError, LedgerReplyError) as exc:
                metrics.HEARTBEAT_ERRORS.inc()
                log.warning("heartbeat of %d live holds failed: %r", len(self), exc)
