"""Receipts: what one request cost, and why, to the micro-dollar.

A metered request's id is its hold's id (``x-costproxy-request-id``, fixed at admission).
Its receipt is read from the ledger entry that settled the hold: the charge (with its usage
event) or the void. The entry is looked for where it is: in Postgres once the usage log
has written it; before that in its shard's ledger stream in Redis, where the settlement put
it atomically with the money; and while the hold is still pending (the request is running,
or its settlement waits in a proxy's spool) the receipt is *pending*. The unit prices come
from the price version the request was admitted under, as stored
(:mod:`proxy.price_versions`); the cost is the ledger entry's amount itself, so the receipt
equals the charge.

A lookup reads only what belongs to the request, or a bounded number of entries near it:

- The id carries its admission time (:func:`proxy.ledger.ids.hold_time`); an id without
  one (or one from the future) is no request's, answered as unknown without Redis or Postgres.
- *Pending* is decided by the hold's own progress record: ``admit.lua`` writes it together
  with the hold (the gate always gives one) and ``resolve.lua`` deletes it in the same step
  that releases the hold, so the record exists exactly while the hold is pending. The
  record names the request's key, which must be one of the caller's (the progress hash is
  shared by the accounts of a shard).
- The settlement is appended to the shard's stream after the admission, so the stream is
  read from the admission time on (less :data:`CLOCK_SKEW_MS`: the id is timed by the
  proxy's clock, the stream by Redis's), in pages of :data:`STREAM_PAGE`, up to
  :data:`STREAM_SEARCH_LIMIT` entries.

The answer is *not found* only when nothing left can hold the settlement: the hold is not
pending, Postgres has no entry, and the search reached the stream's end. When more than
:data:`STREAM_SEARCH_LIMIT` entries follow the admission in the stream (the usage log is
behind), the settlement may be beyond them: the answer is *pending*, and it becomes exact
as the usage log drains the stream (it deletes an entry only once Postgres has it).

:meth:`Receipts.lookup` is the one lookup both receipt routes make (``GET /api/usage/{id}``
with a key, ``GET /portal/api/usage/{id}`` with a portal session): a :class:`Receipt`, or
the :class:`~proxy.http_json.ApiError` to answer (:data:`PENDING`, :data:`NOT_FOUND`,
:data:`~proxy.http_json.LEDGER_UNAVAILABLE`), which each route renders in its error shape.

A settlement's ledger entry id is its request id behind a prefix (:func:`charge_id`,
:func:`void_id`; ``resolve.lua`` writes them); :func:`request_id_of` takes it off.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, cast

import asyncpg
import orjson
from redis.exceptions import RedisError

from .config import ConfigError, ConfigStore
from .db import POSTGRES_UNAVAILABLE
from .http_json import LEDGER_UNAVAILABLE, ApiError
from .ledger import EntryKind, Ledger, LedgerEntry, UsageEvent, decode_entry, now_ms
from .ledger.ids import hold_time
from .ledger.scripts import text
from .money import credits, micro_usd
from .price_versions import stored_book
from .pricing import PicoPrices

#: a settlement's ledger entry id: one of these prefixes, then its hold's (request's) id,
#: as ``resolve.lua`` writes it
CHARGE_PREFIX, VOID_PREFIX = "chg_", "void_"
#: entries of a shard's ledger stream after a request's admission searched for its
#: settlement (the usage log keeps the streams short; a longer backlog answers "pending")
STREAM_SEARCH_LIMIT = 64
#: entries read per XRANGE: a settlement is most often among the first after its admission
STREAM_PAGE = 16
#: how far the clock of the proxy that made a request id may be ahead of Redis's, which
#: numbers the stream entries, or of the clock of the process looking it up (ms; hosts
#: kept in time by NTP are within a few ms): an id from further ahead is no id yet
CLOCK_SKEW_MS = 2_000

_OWN_KEY_SQL = "SELECT EXISTS (SELECT 1 FROM api_keys WHERE id = $1 AND user_id = $2)"

_ENTRY_SQL = """
SELECT l.id, l.user_id, l.kind, l.amount_micro, l.balance_micro, l.hold_id, l.reason, l.created_at,
       coalesce(l.stream_order, 0) AS stream_order, e.key_id, e.provider, e.model, e.tier, e.input_tokens,
       e.cached_input_tokens, e.cache_write_tokens, e.cache_write_1h_tokens, e.output_tokens, e.reasoning_tokens,
       e.estimated, e.stream, e.status, e.latency_ms, e.service_tier, e.price_version
FROM ledger l LEFT JOIN usage_events e ON e.id = l.id
WHERE l.id = ANY($1::text[]) AND ($2::text IS NULL OR l.user_id = $2)
ORDER BY l.kind = 'charge' DESC
LIMIT 1
"""


def charge_id(request_id: str) -> str:
    """The ledger entry id of the charge that settled ``request_id``."""
    return CHARGE_PREFIX + request_id


def void_id(request_id: str) -> str:
    """The ledger entry id of the void that settled ``request_id``."""
    return VOID_PREFIX + request_id


def request_id_of(entry_id: str) -> str | None:
    """The request id a settlement's ledger entry id (a charge's or a void's) carries; None
    for any other entry's."""
    for prefix in (CHARGE_PREFIX, VOID_PREFIX):
        if entry_id.startswith(prefix):
            return entry_id.removeprefix(prefix)
    return None


#: the caller's request is admitted but not settled yet: ask again in a second
PENDING = ApiError(404, "receipt_pending", "This request is not settled yet; ask again in a moment.", {"retry-after": "1"})
#: no request of the caller's has the id (malformed, unknown, or another account's: one answer)
NOT_FOUND = ApiError(404, "not_found", "No request of yours has this id.")
USAGE_LOG_UNAVAILABLE = ApiError(503, "unavailable", "The usage log (PostgreSQL) cannot be read right now; retry in a moment.")


class Outcome(StrEnum):
    """How a request's hold was settled."""

    CHARGED = "charged"
    #: released without a charge: the provider did not serve the request
    VOIDED = "voided"


class ReceiptState(StrEnum):
    """What a lookup found for a request id."""

    FOUND = "found"
    #: the caller's request is admitted but not settled yet (running, or its settlement is
    #: spooled, or the usage log is far behind): ask again shortly
    PENDING = "pending"
    #: no request of the caller has this id (malformed, unknown, or another account's)
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class Receipt:
    """One request's settlement with the prices that made its cost."""

    request_id: str
    entry: LedgerEntry
    #: the price set applied and its unit prices, when the price version is stored
    prices: PicoPrices | None

    @property
    def outcome(self) -> Outcome:
        return Outcome.CHARGED if self.entry.kind is EntryKind.CHARGE else Outcome.VOIDED

    @property
    def cost(self) -> int:
        """The charge, µ$ (the ledger entry's amount: 0 for a void)."""
        return -self.entry.amount

    def as_json(self) -> dict[str, Any]:
        """The receipt as ``GET /api/usage/{id}`` answers it."""
        usage, prices = self.entry.usage, self.prices
        return {
            "id": self.request_id,
            "user_id": self.entry.user_id,
            "time": datetime.fromtimestamp(self.entry.at_ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z"),
            "outcome": self.outcome.value,
            "void_reason": self.entry.reason if self.outcome is Outcome.VOIDED else None,
            "provider": usage.provider if usage else None,
            "model": usage.model if usage else None,
            "tier": usage.tier if usage else None,
            "stream": usage.stream if usage else None,
            "tokens": _tokens(usage) if usage else None,
            "service_tier": usage.service_tier if usage else None,
            "price_set": prices.name.value if prices else None,
            "unit_prices_usd_per_1m": prices.per_million_usd() if prices else None,
            "price_version": usage.price_version if usage else None,
            "estimated": usage.estimated if usage else False,
            "cost_micro_usd": self.cost,
            "cost_credits": credits(self.cost),
            "cost_usd": micro_usd(self.cost),
            "balance_after_micro_usd": self.entry.balance,
        }


def _tokens(usage: UsageEvent) -> dict[str, int]:
    """Tokens by the price each is charged at (reasoning tokens are part of ``output``)."""
    return {
        "input": usage.input_tokens,
        "cached_input": usage.cached_input_tokens,
        "cache_write": usage.cache_write_tokens - usage.cache_write_1h_tokens,
        "cache_write_1h": usage.cache_write_1h_tokens,
        "output": usage.output_tokens,
        "reasoning": usage.reasoning_tokens,
    }


class Receipts:
    """Finds receipts in Postgres and, for the latest requests, in the Redis ledger."""

    def __init__(self, pool: asyncpg.Pool, config: ConfigStore, ledger: Ledger | None = None):
        """Without a ``ledger`` only what the usage log wrote to Postgres is found (the
        admin API, which links to receipts from the Postgres ledger)."""
        self.pool = pool
        self.config = config
        self.ledger = ledger

    async def lookup(self, request_id: str, user_id: str) -> Receipt | ApiError:
        """The receipt of ``user_id``'s request ``request_id``, or the error to answer:
        :data:`PENDING`, :data:`NOT_FOUND`, :data:`~proxy.http_json.LEDGER_UNAVAILABLE`
        when Redis is needed and away, or :data:`USAGE_LOG_UNAVAILABLE` when Postgres is."""
        try:
            state, receipt = await self.find(request_id, user_id)
        except RedisError:
            return LEDGER_UNAVAILABLE
        except POSTGRES_UNAVAILABLE:
            return USAGE_LOG_UNAVAILABLE
        if state is ReceiptState.PENDING:
            return PENDING
        return receipt if receipt is not None else NOT_FOUND

    async def find(self, request_id: str, user_id: str | None) -> tuple[ReceiptState, Receipt | None]:
        """The receipt of ``request_id`` if it is a request of ``user_id`` (None: of anyone).

        Postgres first; then, with a ledger, the hold's progress record (pending?) and the
        shard's ledger stream from the admission on, then Postgres again (the usage log
        moves an entry from the stream to Postgres between the two looks: it deletes it
        from the stream only once written). Raises :class:`redis.exceptions.RedisError` if
        Redis is needed and away."""
        admitted = hold_time(request_id)
        if admitted is None or admitted > now_ms() + CLOCK_SKEW_MS:
            return ReceiptState.NOT_FOUND, None
        entry = await self._written(request_id, user_id)
        if entry is None and self.ledger is not None and user_id is not None:
            if await self._pending(self.ledger, request_id, user_id):
                return ReceiptState.PENDING, None
            entry, searched_all = await self._in_stream(self.ledger, request_id, user_id, admitted)
            entry = entry or await self._written(request_id, user_id)
            if entry is None and not searched_all:
                return ReceiptState.PENDING, None
        if entry is None:
            return ReceiptState.NOT_FOUND, None
        return ReceiptState.FOUND, Receipt(request_id, entry, await self._prices(entry.usage))

    async def _written(self, request_id: str, user_id: str | None) -> LedgerEntry | None:
        ids = [charge_id(request_id), void_id(request_id)]
        row = await self.pool.fetchrow(_ENTRY_SQL, ids, user_id)
        return _entry_of(row) if row is not None else None

    async def _pending(self, ledger: Ledger, request_id: str, user_id: str) -> bool:
        """Whether the hold is pending as ``user_id``'s: its progress record is in the
        shard's progress hash (one HGET; see the module) and names a key of ``user_id``'s."""
        record = await ledger.redis.hget(ledger.keys.progress(user_id), request_id)
        key_id = _key_of(record) if record is not None else None
        return key_id is not None and bool(await self.pool.fetchval(_OWN_KEY_SQL, key_id, user_id))

    @staticmethod
    async def _in_stream(ledger: Ledger, request_id: str, user_id: str, admitted: int) -> tuple[LedgerEntry | None, bool]:
        """The settlement in the shard's ledger stream, looked for from the admission on,
        and whether the search reached the stream's end (else it stopped after
        :data:`STREAM_SEARCH_LIMIT` entries: the settlement may be further on)."""
        stream, lower, left = ledger.keys.stream(user_id), f"{max(0, admitted - CLOCK_SKEW_MS)}-0", STREAM_SEARCH_LIMIT
        hold, user = request_id.encode(), user_id.encode()
        while True:
            last = left <= STREAM_PAGE
            ask = left + 1 if last else STREAM_PAGE  # the last page one more: does any entry follow?
            reply = await ledger.redis.xrange(stream, min=lower, max="+", count=ask)
            page = cast(list[tuple[bytes, dict[bytes, bytes]]], reply or [])
            for entry_id, fields in page[:left]:
                if fields.get(b"hold") == hold and fields.get(b"user") == user and fields.get(b"kind") in (b"charge", b"void"):
                    found = decode_entry({text(k): text(v) for k, v in fields.items()}, text(entry_id))
                    assert isinstance(found, LedgerEntry)
                    return found, True
            if len(page) < ask:
                return None, True
            if last:
                return None, False
            left -= len(page)
            lower = "(" + text(page[-1][0])

    async def _prices(self, usage: UsageEvent | None) -> PicoPrices | None:
        """The price set the request paid, from the price version it was admitted under."""
        if usage is None or usage.price_version is None:
            return None
        book = self.config.current.prices
        if book.version != usage.price_version:  # the same content either way: a version is its hash
            try:
                found = await stored_book(self.pool, usage.price_version)
            except ConfigError:
                return None
            if found is None:
                return None
            book = found
        model = book.find(usage.provider, usage.model)
        if model is None:
            return None
        prompt = usage.input_tokens + usage.cached_input_tokens + usage.cache_write_tokens
        return model.prices_for(prompt, usage.service_tier)


def _key_of(record: bytes | str) -> str | None:
    """The key id in a progress record (``"<cost> <tokens> <usage JSON>"``), if it has one."""
    try:
        usage = orjson.loads(text(record).split(" ", 2)[2])
    except (IndexError, orjson.JSONDecodeError):
        return None
    key_id = usage.get("key") if isinstance(usage, dict) else None
    return key_id if isinstance(key_id, str) else None


def _entry_of(row: asyncpg.Record) -> LedgerEntry:
    """A ledger row (with its usage row, for a charge) as the entry the stream carried."""
    usage = None
    if row["provider"] is not None:
        usage = UsageEvent(
            key_id=row["key_id"],
            provider=row["provider"],
            model=row["model"],
            tier=row["tier"],
            input_tokens=row["input_tokens"],
            cached_input_tokens=row["cached_input_tokens"],
            cache_write_tokens=row["cache_write_tokens"],
            output_tokens=row["output_tokens"],
            reasoning_tokens=row["reasoning_tokens"],
            estimated=row["estimated"],
            stream=row["stream"],
            status=row["status"],
            latency_ms=row["latency_ms"],
            cache_write_1h_tokens=row["cache_write_1h_tokens"],
            service_tier=row["service_tier"],
            price_version=row["price_version"],
        )
    return LedgerEntry(
        id=row["id"],
        user_id=row["user_id"],
        kind=EntryKind(row["kind"]),
        amount=row["amount_micro"],
        balance=row["balance_micro"],
        at_ms=round(row["created_at"].timestamp() * 1000),
        order=row["stream_order"],
        hold_id=row["hold_id"],
        reason=row["reason"],
        usage=usage,
    )
