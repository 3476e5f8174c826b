"""A pipelined Redis connection for the two scripts on the request path.

Every request costs two script calls (admit, then post). Through redis-py's asyncio client
each costs about 200 µs of CPU (stream reader, pool lock, per-call parsing); on one
connection where every call is written at once and replies are matched in order, with
hiredis packing and parsing, it costs about 40 µs alone and 11 µs under concurrency
(measured here with a trivial script). Everything else keeps using redis-py.

The connection is opened on first use and again after it breaks; calls in flight when it
breaks fail with redis-py's ``ConnectionError``, so callers handle one kind of error.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import BusyLoadingError, NoScriptError, ReadOnlyError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Error replies of a Redis that is starting, failing over or resharding: worth a retry.
_TRANSIENT_REPLIES = {"LOADING": BusyLoadingError, "READONLY": ReadOnlyError, "TRYAGAIN": TryAgainError,
                      "MASTERDOWN": TryAgainError, "CLUSTERDOWN": TryAgainError}
#: what a caller may retry: the connection broke or timed out, or Redis said "not now"
TRANSIENT_ERRORS = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, TryAgainError)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._outgoing: list[bytes] = []

    def send(self, packed: bytes) -> None:
        """Queue a command; everything queued in one loop iteration goes out in one write."""
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append(packed)

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if self.transport is not None and not self.lost:
            self.transport.write(b"".join(outgoing))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(RedisConnectionError(f"Redis connection lost: {exc or 'closed'}"))


class RedisPipeline:
    """One pipelined connection to the Redis at ``url`` (``redis://``, ``rediss://``, ``unix://``)."""

    def __init__(self, url: str, timeout: float = 10.0):
        self.url = urlsplit(url)
        self.timeout = timeout
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        u = self.url
        try:
            async with asyncio.timeout(self.timeout):  # a dropped SYN must not hold every caller
                if u.scheme == "unix":
                    _, protocol = await loop.create_unix_connection(_Protocol, u.path)
                else:
                    tls = ssl.create_default_context() if u.scheme == "rediss" else None
                    _, protocol = await loop.create_connection(_Protocol, u.hostname or "127.0.0.1", u.port or 6379, ssl=tls)
        except (OSError, asyncio.TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc!r}") from None
        setup: list[tuple[Any, ...]] = []
        if u.password:
            setup.append(("AUTH", unquote(u.username), unquote(u.password)) if u.username else ("AUTH", unquote(u.password)))
        database = u.path.strip("/") if u.scheme != "unix" else dict(p.split("=", 1) for p in u.query.split("&") if "=" in p).get("db", "")
        if database and database != "0":
            setup.append(("SELECT", database))
        for command in setup:
            _raise_error(await self._send(protocol, command))
        return protocol

    async def _send(self, protocol: _Protocol, command: tuple[Any, ...]) -> Any:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        protocol.waiting.append(waiter)
        protocol.send(hiredis.pack_command(command))
        # A timer handle is much cheaper than asyncio.timeout() on this path.
        deadline = loop.call_later(self.timeout, _expire, waiter, protocol, self.timeout)
        try:
            return await waiter
        finally:
            deadline.cancel()

    async def execute(self, *command: Any) -> Any:
        """Send one command and return its reply (errors raised as redis-py's exceptions)."""
        protocol = self._protocol
        if protocol is None or protocol.lost:
            async with self._connecting:
                if self._protocol is None or self._protocol.lost:
                    self._protocol = await self._connect()
                protocol = self._protocol
        return _raise_error(await self._send(protocol, command))

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()


def _expire(waiter: asyncio.Future[Any], protocol: _Protocol, timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(RedisTimeoutError(f"no reply from Redis within {timeout} s"))
        # Later replies would no longer match calls: drop this connection now, unsent bytes
        # too (close() would wait for a stalled server to read them), and use a new one.
        protocol.lost = True
        protocol.transport.abort()  # type: ignore[union-attr]


def _raise_error(reply: Any) -> Any:
    if isinstance(reply, hiredis.ReplyError):
        message = str(reply)
        prefix = message.split(" ", 1)[0]
        raise (NoScriptError if prefix == "NOSCRIPT" else _TRANSIENT_REPLIES.get(prefix, ResponseError))(message)
    return reply


class PipelinedScript:
    """A Lua script called through a :class:`RedisPipeline`, like redis-py's ``Script``:
    ``await script(keys=[...], args=[...])``; loaded again if Redis lost it."""

    def __init__(self, pipeline: RedisPipeline, source: str):
        self.pipeline = pipeline
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: list[Any], args: list[Any]) -> Any:
        try:
            return await self.pipeline.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.pipeline.execute("SCRIPT", "LOAD", self.source)
            return await self.pipeline.execute("EVALSHA", self.sha, len(keys), *keys, *args)
