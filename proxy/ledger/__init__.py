"""The money path: credit holds, charges and grants as atomic Redis scripts.

Each operation is a ``.lua`` file beside the Python module that builds its KEYS and ARGV
and decodes its reply (``admit``, ``resolve``, ``grant``); :class:`Ledger` calls them. The
values crossing that boundary are in :mod:`.values` and :mod:`.events`, the key layout in
:mod:`.layout`. The worker drains the shard streams into Postgres (:mod:`proxy.usage`).
"""

from .events import EntryKind, LedgerEntry, UsageEvent, UsageWarning, decode_entry, progress_record
from .ids import new_id, now_ms
from .layout import SHARDS, KeyLayout, shard_of
from .ledger import Ledger
from .values import (
    MAX_AMOUNT,
    Account,
    AccountStatus,
    Admission,
    Cycle,
    CycleLimits,
    Hold,
    LedgerReplyError,
    NoAccountError,
    Policy,
    Refusal,
    Renewal,
    Resolution,
)

__all__ = [
    "MAX_AMOUNT",
    "SHARDS",
    "Account",
    "AccountStatus",
    "Admission",
    "Cycle",
    "CycleLimits",
    "EntryKind",
    "Hold",
    "KeyLayout",
    "Ledger",
    "LedgerEntry",
    "LedgerReplyError",
    "NoAccountError",
    "Policy",
    "Refusal",
    "Renewal",
    "Resolution",
    "UsageEvent",
    "UsageWarning",
    "decode_entry",
    "new_id",
    "now_ms",
    "progress_record",
    "shard_of",
]
