"""Where the ledger keeps things in Redis.

Every account lives in one of :data:`SHARDS` shards. An account's keys and its shard's
holds zset and ledger stream share a hash tag (``{s7}``), so each script touches one
cluster slot and "move money + append the ledger event" is a single atomic step. The
shard count is part of the data layout: changing it moves accounts between shards.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

SHARDS = 16


def shard_of(user_id: str) -> int:
    """The shard an account lives in."""
    return zlib.crc32(user_id.encode()) % SHARDS


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """The Redis keys of the ledger under ``prefix``."""

    prefix: str

    def tag(self, shard: int) -> str:
        """The hash-tagged prefix of one shard's keys."""
        return f"{self.prefix}{{s{shard}}}"

    def _tag_of(self, user_id: str) -> str:
        return self.tag(shard_of(user_id))

    def account(self, user_id: str) -> str:
        """The account hash: balance, held, counters, cycle, tier, status."""
        return f"{self._tag_of(user_id)}:acct:{user_id}"

    def holds(self, user_id: str) -> str:
        """The holds zset of the account's shard (member = a hold, score = its expiry ms)."""
        return f"{self._tag_of(user_id)}:holds"

    def stream(self, user_id: str) -> str:
        """The ledger stream of the account's shard, drained into Postgres by the worker."""
        return f"{self._tag_of(user_id)}:ledger"

    def progress(self, user_id: str) -> str:
        """The progress hash of the account's shard: hold id → what its request has cost so
        far, posted if the hold expires (see ``heartbeat.lua`` and ``resolve.lua``). A hold
        the gate places has its record from admission until it is resolved, no longer: the
        receipts read it to tell a pending request (:mod:`proxy.receipts`)."""
        return f"{self._tag_of(user_id)}:progress"

    def lost_hold(self, user_id: str, hold_id: str) -> str:
        """Kept for a day after a hold lost with Redis's data was charged (see ``resolve.lua``)."""
        return f"{self._tag_of(user_id)}:lost:{hold_id}"

    def resolved(self, user_id: str) -> str:
        """The account's shard's holds resolved in the last two minutes (zset: hold id →
        Redis ms), which tells a repeated settlement from one whose admission a failover
        lost (see ``resolve.lua``)."""
        return f"{self._tag_of(user_id)}:resolved"

    def applied_marker(self, user_id: str, event_id: str) -> str:
        """Kept after a grant, so one event id moves money once (see ``grant.lua``)."""
        return f"{self._tag_of(user_id)}:applied:{event_id}"

    def replication_mark(self, shard: int) -> str:
        """Touched by the worker after it reads a shard's stream, so a ``WAIT`` on the same
        connection covers every event it read (see :mod:`proxy.usage`)."""
        return f"{self.tag(shard)}:replicated"

    def streams(self) -> list[str]:
        """The ledger stream of every shard."""
        return [f"{self.tag(n)}:ledger" for n in range(SHARDS)]

    def holds_sets(self) -> list[str]:
        """The holds zset of every shard."""
        return [f"{self.tag(n)}:holds" for n in range(SHARDS)]
