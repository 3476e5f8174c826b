"""Starting the services a run measures: the mock upstreams, the floor and the contract floor,
the proxies (``costproxy serve``, with one or more workers each) and the usage worker; and
one sanity request per scenario through each proxy."""

from __future__ import annotations

import itertools
import os
import urllib.error
import urllib.request
from typing import Any

from .common import PY, log
from .driver import Endpoints
from .processes import Processes, costproxy_cmd, free_port, wait_http
from .scenarios import BenchProvider, Scenario
from .targets import TargetSpec, one_per_listener, serve_listener

FLOOR_KINDS = ("floor", "ledger-floor")


def start_mocks(procs: Processes, providers: dict[str, BenchProvider]) -> dict[str, int]:
    """Start the mock upstreams, one listener per provider, in one process; return their ports."""
    ports = {name: free_port() for name in providers}
    argv = [PY, "-m", "bench.mock_server"]
    for name, prov in providers.items():
        argv += ["--listen", f"{ports[name]}={prov.mock}"]
    procs.start("mock", argv)
    for name in providers:
        # any answer (404 too) means the listener is up; /v1/models exists on the OpenAI mock
        wait_http(procs, "mock", f"http://127.0.0.1:{ports[name]}/v1/models", any_answer=True)
    return ports


def start_floors(
    procs: Processes, mock_ports: dict[str, int], redis_url: str, prefix: str, account: dict[str, Any], tier: str
) -> dict[tuple[str, str], int]:
    """Start the floor and the contract floor (whose ledger work is for ``account``), one listener
    each per provider, in one process; return their ports by (provider, kind)."""
    ports = {(name, kind): free_port() for name in mock_ports for kind in FLOOR_KINDS}
    argv = [PY, "-m", "bench.floor"]
    for (name, kind), port in ports.items():
        argv += ["--listen", f"{port}={'ledger+' if kind == 'ledger-floor' else ''}http://127.0.0.1:{mock_ports[name]}"]
    procs.start(
        "floor",
        argv,
        {
            **os.environ,
            "BENCH_REDIS_URL": redis_url,
            "BENCH_REDIS_PREFIX": prefix,
            "BENCH_USER": account["user_id"],
            "BENCH_KEY_ID": account["key_id"],
            "BENCH_TIER": tier,
        },
    )
    for port in ports.values():
        wait_http(procs, "floor", f"http://127.0.0.1:{port}/v1/models", any_answer=True)
    return ports


def start_proxies(procs: Processes, env: dict[str, str], serve_workers: list[int], with_worker: bool) -> dict[str, int]:
    """Start one ``costproxy serve --workers N`` per count in ``serve_workers`` and, ``with_worker``,
    ``costproxy worker``; return the proxies' ports by listener name (``proxy``, ``proxy-2w``, ...)."""
    ports = {serve_listener(n): start_serve(procs, env, n) for n in serve_workers}
    if with_worker:
        worker_port = free_port()
        procs.start("worker", [*costproxy_cmd(), "worker", "--port", str(worker_port)], env)
        wait_http(procs, "worker", f"http://127.0.0.1:{worker_port}/healthz")
    return ports


def start_serve(procs: Processes, env: dict[str, str], workers: int) -> int:
    """Start ``costproxy serve --workers workers`` (process ``serve_listener(workers)``); return its port.

    Several workers share one Prometheus directory in the run's log directory."""
    name, port = serve_listener(workers), free_port()
    argv = [*costproxy_cmd(), "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    if workers > 1:
        env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(procs.log_dir / f"metrics-{name}")}
    procs.start(name, argv, env)
    wait_http(procs, name, f"http://127.0.0.1:{port}/readyz")
    return port


def target_endpoints(
    mock_ports: dict[str, int],
    floor_ports: dict[tuple[str, str], int],
    proxy_ports: dict[str, int],
    api_key: str,
    targets: dict[str, TargetSpec],
) -> Endpoints:
    """Every listener's base URL per provider, from the ports the services listen on."""
    proxies = {name: f"http://127.0.0.1:{port}" for name, port in proxy_ports.items()}
    bases = {
        name: {
            "direct": f"http://127.0.0.1:{mock_ports[name]}",
            "floor": f"http://127.0.0.1:{floor_ports[name, 'floor']}",
            "ledger-floor": f"http://127.0.0.1:{floor_ports[name, 'ledger-floor']}",
            **proxies,
        }
        for name in mock_ports
    }
    return Endpoints(proxies["proxy"], bases, api_key, targets)


def sanity_check(scenarios: list[Scenario], endpoints: Endpoints) -> None:
    """One request per scenario through every proxy: charged, and the stream as the client asked."""
    proxies = [t for t in one_per_listener(endpoints.targets) if endpoints.targets[t].kind == "proxy"]
    for s, target in itertools.product(scenarios, proxies):
        url, headers = endpoints.url(s, target)
        req = urllib.request.Request(url, data=s.body_bytes(), headers=headers, method=s.method)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                body, charged = resp.read(), resp.headers.get("x-credits-charged")
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{s.name} via {target}: HTTP {exc.code}: {exc.read()[:300]!r}") from None
        if s.stream:
            if s.done_marker and not body.rstrip().endswith(s.done_marker.encode()):
                raise RuntimeError(f"{s.name} via {target}: stream did not end with {s.done_marker!r}: {body[-200:]!r}")
        elif charged is None:
            raise RuntimeError(f"{s.name} via {target}: no x-credits-charged header")
        log(f"sanity {s.name} via {target}: ok" + (f" (charged {charged} credits)" if charged else ""))
