"""Proxy keys: generation, hashing, the Redis mirror and the hot-path lookup cache.

Postgres is the record of keys; Redis holds a mirror (``<prefix>key:<sha256>``) that the
proxy reads, so serving a request never touches Postgres. Each proxy process caches
lookups for ``KEY_CACHE_SECONDS``: a revoked key stops working everywhere within that.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass, replace

from .ledger import Ledger
from .ledger.scripts import text
from .redis_url import RedisClient

KEY_PREFIX = "cpk-"
_CACHE_LIMIT = 100_000
#: what every key generate_key() issues looks like; anything else is unknown without a lookup
_KEY_SHAPE = re.compile(r"cpk-[A-Za-z0-9_-]{43}")


def generate_key() -> str:
    """A new proxy key: 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """How a key is stored and looked up (a fast hash suffices for 256-bit random keys)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a key belongs to, and the tier their account had when last looked up."""

    user_id: str
    key_id: str
    tier: str
    #: the hash the key is cached and mirrored under
    key_hash: str


class KeyMirror:
    """The Redis copy of active keys, written by the account service."""

    def __init__(self, redis: RedisClient, prefix: str):
        self.redis = redis
        self.prefix = prefix

    def _key(self, key_hash: str) -> str:
        return f"{self.prefix}key:{key_hash}"

    async def put(self, key_hash: str, user_id: str, key_id: str) -> None:
        await self.redis.hset(self._key(key_hash), mapping={"user": user_id, "key": key_id})

    async def remove(self, *key_hashes: str) -> None:
        if key_hashes:
            await self.redis.delete(*map(self._key, key_hashes))

    async def get(self, key_hash: str) -> tuple[str, str] | None:
        found = await self.redis.hmget(self._key(key_hash), "user", "key")
        return (text(found[0]), text(found[1])) if found[0] and found[1] else None

    async def expire(self, key_hash: str, after_ms: int) -> None:
        """Let a key's entry lapse after ``after_ms`` (the end of a rotation's overlap)."""
        await self.redis.pexpire(self._key(key_hash), after_ms)


class KeyCache:
    """Per-process cache of key → identity, misses included, for ``ttl`` seconds."""

    def __init__(self, mirror: KeyMirror, ledger: Ledger, ttl: float):
        self.mirror = mirror
        self.ledger = ledger
        self.ttl = ttl
        self._entries: dict[str, tuple[float, Identity | None]] = {}

    async def lookup(self, key: str) -> Identity | None:
        """The identity of a proxy key, or None if it is unknown or revoked. A string that
        is not shaped like an issued key (any bytes a caller sends) is unknown at once: no
        Redis call, no cache entry."""
        if not _KEY_SHAPE.fullmatch(key):
            return None
        key_hash = hash_key(key)
        now = time.monotonic()
        hit = self._entries.get(key_hash)
        if hit is not None and hit[0] > now:
            return hit[1]
        identity = None
        owner = await self.mirror.get(key_hash)
        if owner is not None:
            tier = await self.ledger.redis.hget(self.ledger.keys.account(owner[0]), "tier")
            if tier is not None:
                identity = Identity(user_id=owner[0], key_id=owner[1], tier=text(tier), key_hash=key_hash)
        if len(self._entries) >= _CACHE_LIMIT:  # the oldest entry goes, not every entry
            del self._entries[next(iter(self._entries))]
        self._entries[key_hash] = (now + self.ttl, identity)
        return identity

    def retier(self, identity: Identity, tier: str) -> Identity:
        """Remember that the account's tier changed (learned from the admission script)."""
        updated = replace(identity, tier=tier)
        self._entries[identity.key_hash] = (time.monotonic() + self.ttl, updated)
        return updated
