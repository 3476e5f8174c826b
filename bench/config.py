"""How the proxy under test is configured: a tiers file whose benchmark tier cannot throttle
it, its environment (backends, Redis prefix, upstreams = the mocks), and the benchmark
account it meters."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from .backends import Backends
from .common import ROOT, SERVERS_DIR
from .processes import run_cli
from .scenarios import OPERATOR_KEY, BenchProvider

# A tier limit below these would throttle a benchmark (thousands of requests a second).
GENEROUS = {"rpm": 10**9, "monthly_requests": 10**12, "monthly_tokens": 10**15}
GRANT_CREDITS = 100_000_000  # $1M: ~345 µ$ a request, never runs out


def bench_tiers(tiers_file: Path, tier: str, providers: list[str], out_dir: Path) -> tuple[Path, list[str]]:
    """The repo's tiers file, or a copy in ``out_dir`` whose ``tier`` cannot throttle the benchmark.

    Also returns what the copy changed (limits lifted, providers added); empty for the repo's file.
    """
    data = yaml.safe_load(tiers_file.read_text())
    if tier not in data.get("tiers", {}):
        raise SystemExit(f"{tiers_file} has no tier {tier!r} (tiers: {', '.join(data.get('tiers', {}))}); pass --tier")
    t = data["tiers"][tier]
    lifted = [f"{k}={t[k]}" for k in GENEROUS if t.get(k) is not None and t[k] < GENEROUS[k]]
    missing = [p for p in providers if p not in t.get("providers", [])]
    if not lifted and not missing and t.get("models") is None:
        return tiers_file, []
    for k in GENEROUS:
        t.pop(k, None)
    t.pop("models", None)
    t["providers"] = sorted(set(t.get("providers", [])) | set(providers))
    path = out_dir / "tiers.yaml"
    path.write_text("# written by bench/run.py: the benchmark tier without limits\n" + yaml.safe_dump(data, sort_keys=False))
    return path, lifted + [f"+provider {p}" for p in missing]


def proxy_env(
    b: Backends, prefix: str, tiers_file: Path, providers: dict[str, BenchProvider], mock_ports: dict[str, int]
) -> dict[str, str]:
    """The environment of ``costproxy`` (serve, worker and the CLI) for this run: its backends
    and Redis prefix, the repo's pricing, ``tiers_file``, and every provider's mock as upstream."""
    env = {
        **os.environ,
        "REDIS_URL": b.redis_url,
        "DATABASE_URL": b.database_url,
        "REDIS_PREFIX": prefix,
        "PRICING_FILE": str(ROOT / "pricing.yaml"),
        "TIERS_FILE": str(tiers_file),
        "DATA_DIR": str(SERVERS_DIR),
        "STOP_GRACE_SECONDS": "0",  # no load balancer to drain for: stop at once at the end
    }
    for name, prov in providers.items():
        env[f"{prov.env}_UPSTREAM_URL"] = f"http://127.0.0.1:{mock_ports[name]}"
        env[f"{prov.env}_API_KEY"] = OPERATOR_KEY
    return env


def create_account(env: dict[str, str], run_id: str, tier: str) -> dict[str, Any]:
    """Create the benchmark user in ``tier`` and grant it credits that never run out; return
    ``costproxy users create --json``'s answer (``user_id``, ``key_id``, ``api_key``, ...)."""
    user: dict[str, Any] = json.loads(
        run_cli(["users", "create", "--email", f"bench-{run_id}@example.com", "--tier", tier, "--json"], env)
    )
    run_cli(["credits", "grant", user["user_id"], "--credits", str(GRANT_CREDITS), "--json"], env)
    return user
