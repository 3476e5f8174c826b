"""The entries of the shard ledger streams: what the scripts append and the worker reads.

A money movement's entry has the fields ``kind``, ``id``, ``user``, ``amount`` (signed µ$),
``balance`` (after it), ``ts`` (ms) and, by kind, ``hold``, ``reason``, ``tier`` and ``e``:
one JSON object with a charge's :class:`UsageEvent` (or a void's reason). A usage warning's
entry has ``kind=warning``, ``user``, ``metric``, ``used`` and ``limit``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from ..pricing import ServiceTier, known_service_tier
from .values import Cycle


class EntryKind(StrEnum):
    """What a ledger stream entry records."""

    GRANT = "grant"
    REFUND = "refund"
    CHARGE = "charge"
    VOID = "void"
    RESET = "reset"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """What a charge records about its request: the fields of its usage row."""

    key_id: str
    provider: str
    model: str
    tier: str
    input_tokens: int = 0
    cached_input_tokens: int = 0
    #: prompt tokens written to the provider's cache, 5-minute and 1-hour together
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False
    stream: bool = False
    status: int = 0
    latency_ms: int = 0
    #: of ``cache_write_tokens``, those written for an hour (priced apart)
    cache_write_1h_tokens: int = 0
    #: the service tier it was charged at (served, or else asked for; it picks the price
    #: set), if any
    service_tier: ServiceTier | None = None
    #: the price version the request was admitted and priced under (None: an event of a
    #: release before versions)
    price_version: str | None = None

    @property
    def tokens(self) -> int:
        """Every token billed: what the cycle's token counter adds."""
        return self.input_tokens + self.cached_input_tokens + self.cache_write_tokens + self.output_tokens

    def encode(self) -> bytes:
        """The JSON object stored as the entry's ``e`` field (short names: it is on every
        entry; ``cw1h`` and ``svc`` only when set)."""
        fields: dict[str, Any] = {
            "key": self.key_id,
            "provider": self.provider,
            "model": self.model,
            "tier": self.tier,
            "in": self.input_tokens,
            "cached": self.cached_input_tokens,
            "cache_write": self.cache_write_tokens,
            "out": self.output_tokens,
            "reasoning": self.reasoning_tokens,
            "estimated": int(self.estimated),
            "stream": int(self.stream),
            "status": self.status,
            "ms": self.latency_ms,
            "pv": self.price_version,
        }
        if self.cache_write_1h_tokens:
            fields["cw1h"] = self.cache_write_1h_tokens
        if self.service_tier is not None:
            fields["svc"] = self.service_tier.value
        return orjson.dumps(fields)

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> UsageEvent:
        """The event from the decoded ``e`` object."""

        def count(name: str) -> int:
            return int(data.get(name) or 0)

        return cls(
            key_id=data["key"],
            provider=data["provider"],
            model=data["model"],
            tier=data["tier"],
            input_tokens=count("in"),
            cached_input_tokens=count("cached"),
            cache_write_tokens=count("cache_write"),
            output_tokens=count("out"),
            reasoning_tokens=count("reasoning"),
            estimated=count("estimated") == 1,
            stream=count("stream") == 1,
            status=count("status"),
            latency_ms=count("ms"),
            cache_write_1h_tokens=count("cw1h"),
            service_tier=known_service_tier(data.get("svc")),
            price_version=data.get("pv"),
        )


def progress_record(cost: int, usage: UsageEvent) -> bytes:
    """A hold's progress as ``heartbeat.lua`` stores it and ``resolve.lua`` posts it when the
    hold expires: ``"<cost µ$> <tokens> <usage JSON>"``."""
    return b"%d %d %s" % (cost, usage.tokens, usage.encode())


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One money movement: a ledger row in Postgres (and a usage row for a charge)."""

    id: str
    user_id: str
    kind: EntryKind
    #: signed change of the balance, µ$
    amount: int
    #: the balance after it
    balance: int
    at_ms: int
    #: where the entry stands in its shard's stream: Redis's entry id as ms * 1,000,000 + sequence
    order: int
    hold_id: str | None = None
    reason: str | None = None
    usage: UsageEvent | None = None
    #: a cycle's start: its bounds (ms) and whether the account renews it by itself
    cycle: Cycle | None = None


@dataclass(frozen=True, slots=True)
class UsageWarning:
    """Usage of ``metric`` (credits, tokens or requests) crossed the tier's warning threshold."""

    user_id: str
    metric: str
    used: int
    limit: int


def stream_order(entry_id: str) -> int:
    """A stream entry id (``<ms>-<seq>``) as one integer that sorts the same way."""
    ms, _, seq = entry_id.partition("-")
    return int(ms) * 1_000_000 + int(seq or 0)


def entry_id(order: int) -> str:
    """The stream entry id of a :func:`stream_order`."""
    return f"{order // 1_000_000}-{order % 1_000_000}"


def decode_entry(fields: Mapping[str, str], entry_id: str) -> LedgerEntry | UsageWarning:
    """A stream entry (its id and its fields decoded to text) as the value it records."""
    kind = EntryKind(fields["kind"])
    if kind is EntryKind.WARNING:
        return UsageWarning(fields["user"], fields["metric"], int(fields["used"]), int(fields["limit"]))
    details: dict[str, Any] = orjson.loads(fields["e"]) if "e" in fields else {}
    return LedgerEntry(
        id=fields["id"],
        user_id=fields["user"],
        kind=kind,
        amount=int(fields["amount"]),
        balance=int(fields["balance"]),
        at_ms=int(fields["ts"]),
        order=stream_order(entry_id),
        hold_id=fields.get("hold"),
        reason=fields.get("reason") or details.get("reason"),
        usage=UsageEvent.decode(details) if kind is EntryKind.CHARGE else None,
        cycle=Cycle(int(fields["cycle_start"]), int(fields["cycle_end"]), fields.get("auto_renew") == "1")
        if "cycle_start" in fields
        else None,
    )
