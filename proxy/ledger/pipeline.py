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
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import hiredis
from redis.crc import key_slot
from redis.exceptions import (
    BusyLoadingError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..redis_url import RedisEndpoint, RedisMode, host_port, parse_redis_url, sentinels


class NotSentError(RedisConnectionError):
    """No connection could be opened: the command never reached Redis (nothing to undo)."""


class BusyScriptError(TryAgainError):
    """``BUSY``: another script runs past ``busy-reply-threshold``; Redis answers once it ends."""


class NoReplicasError(ReadOnlyError):
    """``NOREPLICAS``: a primary with ``min-replicas-to-write`` set has lost its replicas —
    typically because one of them was just promoted by a failover and this one has not been
    told yet. Like ``READONLY``: connect again, to whatever is primary now."""


class PrimaryDownError(TryAgainError):
    """``CLUSTERDOWN`` or ``MASTERDOWN``: the primary of the keys is gone and no replica has
    taken over yet, a failover in progress."""


# Error replies of a Redis that is starting, failing over or resharding: worth a retry.
_TRANSIENT_REPLIES = {
    "LOADING": BusyLoadingError,
    "READONLY": ReadOnlyError,
    "NOREPLICAS": NoReplicasError,
    "BUSY": BusyScriptError,
    "OOM": OutOfMemoryError,
    "TRYAGAIN": TryAgainError,
    "MASTERDOWN": PrimaryDownError,
    "CLUSTERDOWN": PrimaryDownError,
}
#: what a caller may retry: the connection broke or timed out, or Redis said "not now"
#: (``OOM``: at ``maxmemory`` with ``noeviction`` it refuses writes until memory is freed)
TRANSIENT_ERRORS = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, TryAgainError, OutOfMemoryError)


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
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        self.transport = cast(asyncio.Transport, transport)

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


#: where a node listens: (host, port), or a Unix socket path
Address = tuple[str, int] | str


class NodeConnection:
    """One pipelined connection to one Redis server, opened on first use and again after it
    breaks; ``address`` is asked each time (a Sentinel-managed primary may have moved)."""

    def __init__(
        self,
        address: Callable[[], Awaitable[Address]],
        *,
        tls: bool = False,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        timeout: float = 10.0,
    ):
        self.address = address
        self.tls = tls
        self.username = username
        self.password = password
        self.db = db
        self.timeout = timeout
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):  # a dropped SYN must not hold every caller
                address = await self.address()
                if isinstance(address, str):
                    _, protocol = await loop.create_unix_connection(_Protocol, address)
                else:
                    tls = ssl.create_default_context() if self.tls else None
                    _, protocol = await loop.create_connection(_Protocol, address[0], address[1], ssl=tls)
        except (TimeoutError, OSError, RedisError) as exc:
            raise NotSentError(f"cannot connect to Redis: {exc!r}") from None
        setup: list[tuple[Any, ...]] = []
        if self.password:
            setup.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
        if self.db:
            setup.append(("SELECT", self.db))
        try:
            for command in setup:
                _raise_error(await self._send(protocol, command))
        except BaseException:  # a refused AUTH: close the socket, or every call opens another
            if protocol.transport is not None:
                protocol.transport.abort()
            raise
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

    async def _open(self) -> _Protocol:
        protocol = self._protocol
        if protocol is None or protocol.lost:
            async with self._connecting:
                if self._protocol is None or self._protocol.lost:
                    self._protocol = await self._connect()
                protocol = self._protocol
        return protocol

    async def execute(self, *command: Any) -> Any:
        """Send one command and return its reply (errors raised as redis-py's exceptions)."""
        protocol = await self._open()
        return self._checked(protocol, await self._send(protocol, command))

    async def execute_asking(self, *command: Any) -> Any:
        """``ASKING`` then ``command``, back to back on this connection (a slot being migrated)."""
        protocol = await self._open()
        asking, reply = await asyncio.gather(self._send(protocol, ("ASKING",)), self._send(protocol, command))
        _raise_error(asking)
        return self._checked(protocol, reply)

    @staticmethod
    def _checked(protocol: _Protocol, reply: Any) -> Any:
        try:
            return _raise_error(reply)
        except ReadOnlyError:
            # a primary demoted by a failover: connect again, to whatever is primary now
            protocol.lost = True
            if protocol.transport is not None:
                protocol.transport.close()
            raise

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()


class RedisPipeline:
    """The pipelined connection of the request path for one Redis server (or a Sentinel-
    managed primary): every call goes to it. ``key`` (the script's first key) is ignored."""

    def __init__(self, node: NodeConnection):
        self.node = node

    @classmethod
    def from_url(cls, url: str, timeout: float = 10.0) -> RedisPipeline:
        """The connection to the one server ``url`` (``redis://``, ``rediss://``, ``unix://``) names."""
        pipeline = request_pipeline(parse_redis_url(url), timeout)
        if not isinstance(pipeline, RedisPipeline):
            raise ValueError(f"{url!r} names a cluster: use request_pipeline()")
        return pipeline

    async def execute(self, *command: Any, key: str = "") -> Any:
        """Send one command and return its reply (errors raised as redis-py's exceptions)."""
        return await self.node.execute(*command)

    def close(self) -> None:
        self.node.close()


#: redirections a call may follow before it gives up (a slot migrating twice over)
_MAX_REDIRECTS = 5
#: how long a call keeps retrying ``TRYAGAIN``: a reshard moves a slot's keys a few at a
#: time, and every account of a shard shares its slot, so the split lasts until the last
#: key has moved (on the order of a second for thousands of keys)
_TRYAGAIN_SECONDS = 3.0


class ClusterPipeline:
    """The pipelined connection of the request path on a Redis Cluster: one connection per
    primary, each call sent to the node that serves the slot of its ``key``; a ``MOVED``
    reply refreshes the slot map and goes to the new node, an ``ASK`` reply (a slot half
    migrated) asks the target node once, ``TRYAGAIN`` (the keys of one script split by a
    migration) is retried after a moment. ``on_failover`` is called when a call follows a
    dead primary's slots to the replica that took them over."""

    def __init__(
        self, seeds: Sequence[tuple[str, int]], *, tls: bool, username: str | None, password: str | None, timeout: float
    ):
        self.on_failover: Callable[[], None] | None = None
        self.seeds = list(seeds)
        self._options: dict[str, Any] = {"tls": tls, "username": username, "password": password, "timeout": timeout}
        self._nodes: dict[tuple[str, int], NodeConnection] = {}
        self._slots: list[tuple[str, int] | None] = [None] * 16384
        self._refreshing: asyncio.Lock = asyncio.Lock()

    def _node(self, address: tuple[str, int]) -> NodeConnection:
        node = self._nodes.get(address)
        if node is None:

            async def fixed() -> Address:
                return address

            node = self._nodes[address] = NodeConnection(fixed, **self._options)
        return node

    async def refresh(self) -> None:
        """Read the slot map (``CLUSTER SLOTS``) from the first node that answers."""
        async with self._refreshing:
            failure: Exception | None = None
            for address in [*self._nodes, *self.seeds]:
                try:
                    ranges = await self._node(address).execute("CLUSTER", "SLOTS")
                except RedisError as exc:
                    failure = exc
                    continue
                for first, last, primary, *_ in ranges:
                    owner = (primary[0].decode() if isinstance(primary[0], bytes) else primary[0], int(primary[1]))
                    self._slots[first : last + 1] = [owner] * (last - first + 1)
                return
            raise RedisConnectionError(f"no cluster node answered CLUSTER SLOTS: {failure!r}")

    async def execute(self, *command: Any, key: str = "") -> Any:
        """Send ``command`` to the node serving ``key``'s slot, following redirections and,
        once, a failover (a primary that died answers no ``MOVED``: the slot map is read
        again and the call goes to the replica that took the slot over; every script is
        safe to repeat). :class:`NotSentError` only if no attempt reached a node."""
        slot = key_slot(key.encode())
        address = await self._owner(slot)
        asking, failed_over, maybe_ran = False, False, False
        redirects, waited = 0, 0.0
        while redirects < _MAX_REDIRECTS:
            node = self._node(address)
            try:
                return await (node.execute_asking(*command) if asking else node.execute(*command))
            except (RedisConnectionError, RedisTimeoutError) as exc:
                maybe_ran = maybe_ran or not isinstance(exc, NotSentError)
                moved_to = None if failed_over else await self._owner_after_failover(slot)
                if moved_to is None or moved_to == address:
                    if maybe_ran and isinstance(exc, NotSentError):
                        raise RedisConnectionError(str(exc)) from None
                    raise
                address, asking, failed_over = moved_to, False, True
                if self.on_failover is not None:
                    self.on_failover()
            except TryAgainError:
                # The script's keys are split between two nodes while the slot migrates. A
                # TRYAGAIN from the node an ASK sent us to is asked again (going back to the
                # source would only earn another ASK); one from the owner goes to the owner.
                waited += await _pause_while_split(waited)
                if not asking:
                    address = self._slots[slot] or address
            except ResponseError as exc:
                redirect = str(exc).split()
                if redirect[0] not in ("MOVED", "ASK"):
                    raise
                address, asking = host_port(redirect[2], default_host=address[0]), redirect[0] == "ASK"
                redirects += 1
                if not asking:
                    await self.refresh()
        raise TryAgainError(f"TRYAGAIN slot {slot} redirected more than {_MAX_REDIRECTS} times")

    async def _owner(self, slot: int) -> tuple[str, int]:
        """The slot's owner by the slot map, read first if it has no owner yet."""
        address = self._slots[slot]
        if address is None:
            await self.refresh()
            address = self._slots[slot]
            if address is None:
                raise PrimaryDownError(f"CLUSTERDOWN no node serves slot {slot}")
        return address

    async def _owner_after_failover(self, slot: int) -> tuple[str, int] | None:
        """The slot's owner by a fresh slot map; None if no node answers."""
        try:
            await self.refresh()
        except RedisConnectionError:
            return None
        return self._slots[slot]

    def close(self) -> None:
        for node in self._nodes.values():
            node.close()


async def _pause_while_split(waited: float) -> float:
    """Wait a moment before retrying a ``TRYAGAIN`` (re-raised once ``waited`` used up the
    budget); returns the seconds waited."""
    if waited >= _TRYAGAIN_SECONDS:
        raise TryAgainError(f"TRYAGAIN for {waited:.1f} s: the slot is still migrating")
    pause = min(0.05, 0.01 + waited / 4)
    await asyncio.sleep(pause)
    return pause


#: the request path's pipelined connection, whatever Redis deployment it talks to
RequestPipeline = RedisPipeline | ClusterPipeline


def request_pipeline(endpoint: RedisEndpoint, timeout: float = 10.0) -> RequestPipeline:
    """The pipelined connection for ``REDIS_URL``'s deployment."""
    auth = {"username": endpoint.username, "password": endpoint.password}
    if endpoint.mode is RedisMode.CLUSTER:
        return ClusterPipeline(endpoint.nodes, tls=endpoint.tls, timeout=timeout, **auth)
    if endpoint.mode is RedisMode.SENTINEL:
        sentinel = sentinels(endpoint, timeout)

        async def primary() -> Address:
            host, port = await sentinel.discover_master(endpoint.service)
            return str(host), int(port)

        return RedisPipeline(NodeConnection(primary, tls=endpoint.tls, db=endpoint.db, timeout=timeout, **auth))
    fixed: Address = endpoint.unix_path if endpoint.unix_path is not None else endpoint.nodes[0]

    async def address() -> Address:
        return fixed

    return RedisPipeline(NodeConnection(address, tls=endpoint.tls, db=endpoint.db, timeout=timeout, **auth))


def _expire(waiter: asyncio.Future[Any], protocol: _Protocol, timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(RedisTimeoutError(f"no reply from Redis within {timeout} s"))
        # Later replies would no longer match calls: drop this connection now, unsent bytes
        # too (close() would wait for a stalled server to read them), and use a new one.
        protocol.lost = True
        if protocol.transport is not None:
            protocol.transport.abort()


def _raise_error(reply: Any) -> Any:
    if isinstance(reply, hiredis.ReplyError):
        message = str(reply)
        prefix = message.split(" ", 1)[0]
        raise (NoScriptError if prefix == "NOSCRIPT" else _TRANSIENT_REPLIES.get(prefix, ResponseError))(message)
    return reply


class PipelinedScript:
    """A Lua script called through a request pipeline, like redis-py's ``Script``:
    ``await script(keys=[...], args=[...])``, sent to the node of its first key; loaded
    again if that node does not have it."""

    def __init__(self, pipeline: RequestPipeline, source: str):
        self.pipeline = pipeline
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: list[Any], args: list[Any]) -> Any:
        route = str(keys[0]) if keys else ""
        try:
            return await self.pipeline.execute("EVALSHA", self.sha, len(keys), *keys, *args, key=route)
        except NoScriptError:
            await self.pipeline.execute("SCRIPT", "LOAD", self.source, key=route)
            return await self.pipeline.execute("EVALSHA", self.sha, len(keys), *keys, *args, key=route)
