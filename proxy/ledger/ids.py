"""Ids of ledger entries and holds, and the clock the scripts are given.

An id is ``<prefix>_<ms>_<random>``: the wall-clock millisecond it was made at, as 11
lowercase hex digits (fixed width until the year 2527, so ids of one prefix sort by time,
as ULIDs do), and 96 bits from the OS's CSPRNG as 24 lowercase hex digits, e.g.
``hold_19ae8f3c2a1_9f1c0b7e4d2a6c8b0e3f5a71``. It says nothing about the process that made
it or the ids made before it; the random part alone makes it unique across processes and
hosts without coordination (two ids of one millisecond collide with probability 2⁻⁹⁶),
so a hold id can be an idempotency key. A hold id is a request's id
(``x-costproxy-request-id``); :func:`hold_time` reads back when it was made, which is when
the request was admitted (:mod:`proxy.receipts` looks for its settlement from then on).
The charset, ``[0-9a-z_]``, is safe in zset members (``<id>|<user>|<amount>``), key names,
URL paths and Redis glob patterns.
"""

from __future__ import annotations

import os
import re
import time

#: hex digits of an id's time (ms since the epoch: 16^11 ms is past the year 2500)
TIME_DIGITS = 11
#: random bits of an id, written as RANDOM_BITS / 4 hex digits
RANDOM_BITS = 96
#: what follows the prefix of an id :func:`new_id` makes; group 1 is its time in hex
ID_SHAPE = rf"_([0-9a-f]{{{TIME_DIGITS}}})_[0-9a-f]{{{RANDOM_BITS // 4}}}"
#: a hold id, which is a request id (``x-costproxy-request-id``), as a regular expression
HOLD_ID_PATTERN = "hold" + ID_SHAPE
_HOLD_ID = re.compile(HOLD_ID_PATTERN)


def now_ms() -> int:
    """Wall-clock milliseconds, the unit of every time the scripts store."""
    return int(time.time() * 1000)


def new_id(prefix: str) -> str:
    """A new unique, unpredictable id such as ``hold_19ae8f3c2a1_9f1c…`` (see the module)."""
    return f"{prefix}_{time.time_ns() // 1_000_000:011x}_{os.urandom(RANDOM_BITS // 8).hex()}"


def hold_time(hold_id: str) -> int | None:
    """When :func:`new_id` made hold id ``hold_id`` (ms), or None if it made no such id."""
    shape = _HOLD_ID.fullmatch(hold_id)
    return int(shape[1], 16) if shape else None
