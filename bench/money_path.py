"""Micro-benchmark: the money path's own Python work for one request, without any I/O.

Per request it does what the proxy computes around its two script calls: at admission the
price lookup, the worst case and the first progress record (:func:`proxy.gate.describe`,
:func:`proxy.ledger.progress_record`); at settlement the bounded usage, its cost, the
usage event and the script's arguments (:func:`proxy.ledger.resolve.post_call`, which
encodes the event); and the answer's headers (:func:`proxy.forward._client_headers`). The
figure is the median of ``--rounds`` runs of ``--n`` requests, in µs per request: compare
it across commits (e.g. in a ``git worktree`` of the older one) to price a change.

    .venv/bin/python -m bench.money_path [--n 20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import orjson
from multidict import CIMultiDict

from proxy.config import load_config
from proxy.forward import _client_headers
from proxy.gate import Ticket, Visit, describe
from proxy.keys import Identity
from proxy.ledger import Admission, Hold, KeyLayout, new_id, progress_record
from proxy.ledger.resolve import post_call
from proxy.pricing import Usage
from proxy.providers.base import estimate_usage
from proxy.providers.registry import build_providers
from proxy.settings import Settings

from .common import ROOT

CHAT = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300}'
UPSTREAM_HEADERS = {"Content-Type": "application/json", "x-request-id": "req_abc", "openai-processing-ms": "120"}


def one_round(n: int) -> float:
    """µs per request over ``n`` requests."""
    config = load_config(ROOT / "pricing.yaml", ROOT / "tiers.yaml")
    provider = build_providers(Settings(), config.prices)["openai"]
    tier = config.tiers.tiers["starter"]
    identity = Identity("usr_bench", "key_bench", "starter", "0" * 64)
    call = provider.inspect("POST", "v1/chat/completions", CHAT, orjson.loads(CHAT))
    layout = KeyLayout("bench:")
    usage = Usage(input_tokens=1000, cached_input_tokens=200, output_tokens=300, reasoning_tokens=50)
    started = time.perf_counter()
    for _ in range(n):
        visit = Visit(provider, "v1/chat/completions", 0.0, identity, tier)
        model = config.prices.find("openai", call.model)
        assert model is not None
        hold = Hold(new_id("hold"), identity.user_id, model.worst_case_micro(call.prompt_upper_bound, 300, call.service_tier))
        prompt_only = estimate_usage(call)
        progress_record(model.cost_micro(prompt_only, call.service_tier), describe(visit, model, call, prompt_only))
        ticket = Ticket(visit, call, model, hold, Admission())
        bounded = ticket.bound(usage)
        cost = ticket.cost(bounded)
        post_call(layout, hold, cost=cost, usage=ticket.describe(bounded, status=200, latency_ms=5), limits=tier.limits, now=0)
        _client_headers(CIMultiDict(UPSTREAM_HEADERS), ticket)
    return (time.perf_counter() - started) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    figures = [one_round(args.n) for _ in range(args.rounds)]
    median, best = statistics.median(figures), min(figures)
    print(f"money path, per request: median {median:.2f} µs (min {best:.2f}) over {args.rounds} rounds")


if __name__ == "__main__":
    main()
