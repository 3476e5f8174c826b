"""Settlements a failover may have dropped, sent again.

Redis replicates asynchronously: a settlement the primary answered can be missing from the
replica that takes over (the old primary's last writes), and so can the admission of the
hold it resolved. So a process remembers the settlements Redis answered in the last
``recent_seconds``, and when a call to Redis fails (connection lost, ``READONLY``,
``NOREPLICAS``, a timeout) it sends them again once Redis answers, with every one answered
since. ``resolve.lua`` makes that harmless where the first went through (a duplicate) and
exact where it did not: a hold still pending is posted or voided as it was meant to be, and
a post of a hold whose admission was lost as well is charged once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from enum import StrEnum

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import metrics
from .pipeline import TRANSIENT_ERRORS, PrimaryDownError
from .scripts import ScriptCall
from .values import NoAccountError, Resolution

log = logging.getLogger("costproxy.resend")

#: how far back before a failed call settlements are sent again (``RESEND_SECONDS``): a
#: replica's lag is milliseconds and the AOF window a second, but a cluster primary cut off
#: from its peers takes writes for up to ``cluster-node-timeout`` (15 s by default)
RECENT_SECONDS = 15.0
#: failures that may mean writes were lost: the connection broke or timed out, the primary
#: was demoted (``READONLY``, ``NOREPLICAS``) or is down (``CLUSTERDOWN``, ``MASTERDOWN``);
#: not ``TRYAGAIN``, ``OOM`` or ``BUSY``. (A cluster call that follows a dead primary's
#: slots to its replica says so through ``ClusterPipeline.on_failover``.)
FAILOVER_SIGNS = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, PrimaryDownError)
#: how long after the failure a settlement is sent again at the most: resolve.lua charges
#: a hold whose admission was lost only within a minute of its placement
RESEND_FOR_SECONDS = 60.0
#: the longest pause between two attempts to send a settlement again while Redis is away
MAX_PAUSE_SECONDS = 5.0


class Resent(StrEnum):
    """What a settlement sent again did (label ``outcome`` of ``costproxy_settlements_resent_total``)."""

    #: the first went through: nothing moved
    DUPLICATE = "duplicate"
    #: the first was lost: the hold was posted or voided now
    APPLIED = "applied"
    #: the account is not in Redis (it lost its data: ``ledger rebuild`` restores it from Postgres)
    NO_ACCOUNT = "no_account"
    #: Redis did not take it within RESEND_FOR_SECONDS, or refused it
    FAILED = "failed"


class RecentSettlements:
    """The settlements one process sent in the last ``recent_seconds``, and whether a
    failed call asks for them to be sent again."""

    def __init__(self, recent_seconds: float = RECENT_SECONDS):
        self.recent_seconds = recent_seconds
        self._sent: deque[tuple[float, str, ScriptCall]] = deque()
        self._disrupted_at: float | None = None
        self._taken_at = float("-inf")
        self._wake = asyncio.Event()

    def sent(self, hold_id: str, call: ScriptCall) -> None:
        """Redis answered this settlement."""
        now = time.monotonic()
        self._sent.append((now, hold_id, call))
        start = now if self._disrupted_at is None else min(now, self._disrupted_at)
        while self._sent[0][0] < start - self.recent_seconds:
            self._sent.popleft()

    def disrupted(self) -> None:
        """A call to Redis failed: what was sent shortly before may be lost with a failover."""
        if self._disrupted_at is None:
            self._disrupted_at = time.monotonic()
            self._wake.set()

    def take(self) -> list[tuple[str, ScriptCall]]:
        """The settlements to send again (the latest per hold), from ``recent_seconds``
        before the first failure until now, less those an earlier round took (failures in
        a row, as under overload, do not send the same ones again and again); the next
        failure starts another round."""
        now = time.monotonic()
        start = max((self._disrupted_at or now) - self.recent_seconds, self._taken_at)
        self._disrupted_at, self._taken_at = None, now
        latest = {hold_id: call for at, hold_id, call in self._sent if at >= start}
        return list(latest.items())

    async def wait(self) -> None:
        """Return once a failed call asked for a resend."""
        await self._wake.wait()
        self._wake.clear()


#: how a settlement is sent again (:meth:`proxy.ledger.Ledger.resend`)
Send = Callable[[ScriptCall], Awaitable[Resolution | None]]


async def _resend_one(call: ScriptCall, send: Send, pause: float, until: float) -> Resent:
    while True:
        try:
            resolution = await send(call)
        except TRANSIENT_ERRORS:  # Redis is still away (or being failed over): wait for it
            if time.monotonic() >= until:
                return Resent.FAILED
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE_SECONDS)
            continue
        except NoAccountError:
            return Resent.NO_ACCOUNT
        except Exception:  # Redis refused this call: the others still go
            log.exception("a settlement sent again after a Redis failure was refused")
            return Resent.FAILED
        return Resent.DUPLICATE if resolution is None else Resent.APPLIED


async def resend_after_failures(
    recent: RecentSettlements,
    send: Send,
    *,
    settle_seconds: float = 1.0,
    pause: float = 0.5,
) -> None:
    """Until cancelled: after each failed call, wait ``settle_seconds`` (a failover is
    named in about a second), then send the recent settlements again through ``send``,
    each retried while Redis is away for up to RESEND_FOR_SECONDS."""
    while True:
        await recent.wait()
        await asyncio.sleep(settle_seconds)
        until = time.monotonic() + RESEND_FOR_SECONDS
        outcomes: dict[Resent, int] = {}
        for hold_id, call in recent.take():
            outcome = await _resend_one(call, send, pause, until)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            metrics.SETTLEMENTS_RESENT.labels(outcome.value).inc()
            if outcome is Resent.FAILED:
                log.error("settlement of hold %s could not be sent again after a Redis failure", hold_id)
        if outcomes:
            log.warning(
                "after a Redis failure, recent settlements were sent again: %s", {k.value: v for k, v in outcomes.items()}
            )
