"""``REDIS_URL``: one Redis, a Redis Cluster, or a primary that Sentinel manages.

- ``redis://[user:password@]host:port/db``, ``rediss://`` (TLS), ``unix:///path?db=N``
- ``redis+cluster://[user:password@]host:port[,host:port…]`` (seed nodes), ``rediss+cluster://``
- ``redis+sentinel://[user:password@]host:port[,host:port…]/service[/db]`` (the sentinels and
  the name they know the primary by), ``rediss+sentinel://``

The same code runs on all three: every script touches keys of one hash slot, and the
request path's pipelined connection routes each call to the node that serves its slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import parse_qs, unquote

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel

#: a redis-py client for whichever kind of deployment ``REDIS_URL`` names
RedisClient = Redis | RedisCluster


class RedisMode(StrEnum):
    SINGLE = "single"
    CLUSTER = "cluster"
    SENTINEL = "sentinel"


@dataclass(frozen=True, slots=True)
class RedisEndpoint:
    """Where Redis is and how to log in, as ``REDIS_URL`` says."""

    mode: RedisMode
    #: one server, the cluster's seed nodes, or the sentinels
    nodes: tuple[tuple[str, int], ...] = ()
    unix_path: str | None = None
    tls: bool = False
    username: str | None = None
    password: str | None = None
    db: int = 0
    #: the name the sentinels know the primary by
    service: str = ""


def host_port(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``host:port`` (``[v6]:port``; the port defaults to 6379, an empty host — as in a
    ``MOVED 3999 :6381`` reply from a node that does not know its own address — to
    ``default_host``)."""
    host, _, port = text.rpartition(":") if ":" in text.strip("[]") else (text, "", "6379")
    return host.strip("[]") or default_host, int(port or 6379)


def parse_redis_url(url: str) -> RedisEndpoint:
    """The endpoint ``url`` names; ValueError for a URL of no known form."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"REDIS_URL {url!r} has no scheme (redis://, rediss://, unix://, redis+cluster://, redis+sentinel://)")
    if scheme == "unix":
        path, _, query = rest.partition("?")
        db = int((parse_qs(query).get("db") or ["0"])[0])
        return RedisEndpoint(RedisMode.SINGLE, unix_path=path, db=db)
    base, _, kind = scheme.partition("+")
    if base not in ("redis", "rediss") or kind not in ("", "cluster", "sentinel"):
        raise ValueError(f"REDIS_URL scheme {scheme!r} is not one of redis, rediss, unix, redis+cluster, redis+sentinel")
    netloc, _, path = rest.partition("/")
    credentials, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username, password = (unquote(user) or None, unquote(secret)) if colon else (None, unquote(user))
    nodes = tuple(host_port(h) for h in hosts.split(",") if h)
    parts = [p for p in path.split("/") if p]
    mode = RedisMode(kind or "single")
    service = parts.pop(0) if mode is RedisMode.SENTINEL and parts else ""
    if mode is RedisMode.SENTINEL and not service:
        raise ValueError("REDIS_URL: redis+sentinel:// needs the primary's name: redis+sentinel://host:26379/mymaster")
    db = int(parts[0]) if parts else 0
    if mode is RedisMode.CLUSTER and db:
        raise ValueError("REDIS_URL: a Redis Cluster has only database 0")
    return RedisEndpoint(mode, nodes, None, base == "rediss", username, password, db, service)


def redis_client(endpoint: RedisEndpoint, max_connections: int = 64) -> RedisClient:
    """A redis-py client for ``endpoint``; callers wait for a free connection under bursts."""
    user, secret = endpoint.username, endpoint.password
    if endpoint.mode is RedisMode.CLUSTER:
        nodes = [ClusterNode(host, port) for host, port in endpoint.nodes]
        return RedisCluster(
            startup_nodes=nodes, ssl=endpoint.tls, max_connections=max_connections, username=user, password=secret
        )
    if endpoint.mode is RedisMode.SENTINEL:
        primary: Redis = sentinels(endpoint).master_for(
            endpoint.service, ssl=endpoint.tls, db=endpoint.db, username=user, password=secret
        )
        return primary
    if endpoint.unix_path is not None:
        url = f"unix://{endpoint.unix_path}?db={endpoint.db}"
    else:
        host, port = endpoint.nodes[0]
        url = f"{'rediss' if endpoint.tls else 'redis'}://{host}:{port}/{endpoint.db}"
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=10, username=user, password=secret)
    return Redis(connection_pool=pool)


def sentinels(endpoint: RedisEndpoint, timeout: float = 10.0) -> Sentinel:
    """A client of the sentinels ``endpoint`` lists (redis-py's, which finds the primary)."""
    sentinel: Sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        list(endpoint.nodes), sentinel_kwargs={"ssl": endpoint.tls, "socket_timeout": timeout}
    )
    return sentinel
