"""Price versions: every distinct ``pricing.yaml`` content a process loads, kept in Postgres.

A version is the first 16 hex digits of the file's SHA-256 (:func:`proxy.pricing.price_version`);
every price the proxy applies carries the version it came from (:attr:`PricedModel.version`),
and so do the usage events and rows it writes. :func:`record_versions` stores each version a
process loads, with its content, in the background (at start and after every reload, retried
while Postgres is away: the request path never waits on it, and a proxy without Postgres
still serves). :func:`stored_book` gives back the prices of a stored version, for receipts;
:func:`list_versions` lists them (``costproxy config versions``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from .config import ConfigStore, parse_price_book
from .db import POSTGRES_UNAVAILABLE
from .pricing import PriceBook

log = logging.getLogger("costproxy.price_versions")

_STORE_SQL = """
INSERT INTO price_versions (version, content, models, first_loaded_at, last_loaded_at)
VALUES ($1, $2, $3, $4, $4)
ON CONFLICT (version) DO UPDATE SET
    first_loaded_at = LEAST(price_versions.first_loaded_at, excluded.first_loaded_at),
    last_loaded_at = GREATEST(price_versions.last_loaded_at, excluded.last_loaded_at)
"""
#: parsed stored versions kept per process (they never change: a version is its content's hash)
_BOOKS_KEPT = 32
_books: OrderedDict[str, PriceBook] = OrderedDict()


@dataclass(frozen=True, slots=True)
class PriceVersionInfo:
    """One stored price version, as ``costproxy config versions`` lists it."""

    version: str
    #: the earliest time a process reported loading it
    first_loaded_at: datetime
    #: the latest time a process reported loading it
    last_loaded_at: datetime
    #: models priced, over every provider
    models: int
    #: the version loaded most recently: the one the gateway runs now
    current: bool

    def as_json(self) -> dict[str, Any]:
        """JSON-ready, times in ISO 8601."""
        return {
            "version": self.version,
            "first_loaded_at": self.first_loaded_at.isoformat(),
            "last_loaded_at": self.last_loaded_at.isoformat(),
            "models": self.models,
            "current": self.current,
        }


async def store_version(pool: asyncpg.Pool, book: PriceBook, loaded_at: datetime) -> None:
    """Store ``book``'s version with its content (once: a version already stored only
    widens its first and last load times)."""
    content = book.source.decode("utf-8")  # the config loader accepted it as UTF-8
    await pool.execute(_STORE_SQL, book.version, content, book.model_count, loaded_at)


async def record_versions(store: ConfigStore, pool: asyncpg.Pool, every: float) -> None:
    """Store every price version ``store`` loads (:attr:`ConfigStore.price_loads`), checking
    every ``every`` seconds until cancelled; a failed write is retried, backing off to 30 s."""
    recorded: dict[str, datetime] = {}
    backoff = every
    while True:
        try:
            for version, (book, loaded_at) in list(store.price_loads.items()):
                if recorded.get(version) != loaded_at:
                    await store_version(pool, book, loaded_at)
                    recorded[version] = loaded_at
            backoff = every
        except POSTGRES_UNAVAILABLE as exc:
            log.warning("could not store the price version in Postgres, retrying in %.1f s: %s", backoff, exc)
            backoff = min(max(backoff, 0.5) * 2, 30.0)
        await asyncio.sleep(backoff)


async def stored_book(pool: asyncpg.Pool, version: str) -> PriceBook | None:
    """The prices of a stored version (parsed once per process, off the event loop as the
    config watcher parses), or None if it is not stored or its content is not that version;
    :class:`proxy.config.ConfigError` if its content does not validate (a release's newer format)."""
    book = _books.get(version)
    if book is None:
        content = await pool.fetchval("SELECT content FROM price_versions WHERE version = $1", version)
        if content is None:
            return None
        book = await asyncio.to_thread(parse_price_book, content.encode("utf-8"), f"price version {version}")
        if book.version != version:  # a row edited by hand: its prices are not the version's
            return None
        _books[version] = book
        while len(_books) > _BOOKS_KEPT:
            _books.popitem(last=False)
    _books.move_to_end(version)
    return book


async def list_versions(pool: asyncpg.Pool) -> list[PriceVersionInfo]:
    """Every stored price version, newest first load first; ``current`` marks the one
    loaded most recently."""
    rows = await pool.fetch(
        "SELECT version, first_loaded_at, last_loaded_at, models FROM price_versions ORDER BY first_loaded_at DESC, version"
    )
    latest = max(rows, key=lambda r: r["last_loaded_at"], default=None)
    return [
        PriceVersionInfo(
            version=r["version"],
            first_loaded_at=r["first_loaded_at"],
            last_loaded_at=r["last_loaded_at"],
            models=r["models"],
            current=r is latest,
        )
        for r in rows
    ]
