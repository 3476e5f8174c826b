"""A real three-master Redis Cluster on loopback ports, started by the tests themselves
(``redis-server --cluster-enabled yes`` and ``redis-cli --cluster create``), moving a slot
from one node to another while traffic runs, and a replica taking over a dead primary."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis as redis_sync

from .redis_server import redis_binary


def _free_cluster_port() -> int:
    """A port whose cluster bus port (10,000 higher) is free too, both on loopback."""
    while True:
        port = random.randint(20_000, 45_000)
        try:
            for candidate in (port, port + 10_000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


@dataclass
class Cluster:
    """The running cluster: its nodes' ports and the ``REDIS_URL`` that names it."""

    ports: list[int]
    processes: dict[int, subprocess.Popen[bytes]]
    directory: Path

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports[:2])

    def node(self, port: int) -> redis_sync.Redis:
        return redis_sync.Redis(port=port, socket_timeout=5)

    def owner(self, slot: int) -> int:
        """The port of the primary serving ``slot``."""
        alive = next(port for port in self.ports if self.processes[port].poll() is None)
        for first, last, primary, *_ in self.node(alive).execute_command("CLUSTER SLOTS"):
            if first <= slot <= last:
                return int(primary[1])
        raise LookupError(slot)

    def node_id(self, port: int) -> str:
        return str(self.node(port).execute_command("CLUSTER MYID").decode())

    def add_replica(self, of_port: int) -> int:
        """Start one more node as the replica of the primary on ``of_port``; its port once synced."""
        port = _free_cluster_port()
        self.processes[port] = _start_node(port, self.directory)
        replica = self.node(port)
        _wait(replica.ping)
        replica.execute_command("CLUSTER MEET", "127.0.0.1", of_port)
        primary_id = self.node_id(of_port)
        _wait(lambda: primary_id in str(replica.execute_command("CLUSTER NODES")))
        replica.execute_command("CLUSTER REPLICATE", primary_id)
        _wait(lambda: replica.info("replication").get("master_link_status") == "up")
        return port

    def take_over(self, dead_port: int, replica_port: int) -> None:
        """Kill the primary on ``dead_port`` (as a crash does) and have its replica take its slots."""
        self.processes[dead_port].kill()
        self.processes[dead_port].wait(10)
        self.node(replica_port).execute_command("CLUSTER FAILOVER", "TAKEOVER")
        _wait(lambda: self.node(replica_port).info("replication")["role"] == "master")

    def migrate(self, slot: int, to_port: int, keys_per_step: int = 2, pause: float = 0.02) -> int:
        """Move ``slot`` to the node on ``to_port`` the way ``redis-cli --cluster reshard``
        does (IMPORTING / MIGRATING, MIGRATE a few keys at a time, SETSLOT NODE); returns
        the keys moved. Clients meanwhile meet ASK and TRYAGAIN replies."""
        from_port = self.owner(slot)
        source, target = self.node(from_port), self.node(to_port)
        source_id, target_id = self.node_id(from_port), self.node_id(to_port)
        target.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        source.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        moved = 0
        while keys := source.execute_command("CLUSTER GETKEYSINSLOT", slot, keys_per_step):
            source.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            time.sleep(pause)  # traffic goes on between the steps
        for port in self.ports:
            self.node(port).execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
        return moved


def _start_node(port: int, directory: Path) -> subprocess.Popen[bytes]:
    home = directory / str(port)
    home.mkdir(parents=True)
    return subprocess.Popen(
        [redis_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
         "--cluster-config-file", "nodes.conf", "--appendonly", "yes", "--save", "", "--dir", str(home),
         "--logfile", str(home / "redis.log")],
    )  # fmt: skip


@contextmanager
def redis_cluster(directory: Path) -> Iterator[Cluster]:
    """Three masters, no replicas, AOF on, until the block ends."""
    ports = [_free_cluster_port() for _ in range(3)]
    cluster = Cluster(ports, {port: _start_node(port, directory) for port in ports}, directory)
    try:
        for port in ports:
            _wait(lambda port=port: cluster.node(port).ping())
        subprocess.run(
            [redis_binary("redis-cli"), "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0",
             "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        _wait(lambda: all(cluster.node(p).execute_command("CLUSTER INFO")["cluster_state"] == "ok" for p in ports))
        yield cluster
    finally:
        for process in cluster.processes.values():
            process.kill()
            process.wait(10)


def _wait(ready: Callable[[], object], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            if ready():
                return
        except redis_sync.exceptions.RedisError:
            pass
        assert time.monotonic() < deadline, "the Redis Cluster did not come up"
        time.sleep(0.05)
