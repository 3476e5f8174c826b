"""``GET /metrics`` exposes traffic, money, refusals, latency and the usage-log lag."""

from __future__ import annotations

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families


async def _scrape(proxy_url: str) -> dict[tuple[str, frozenset], float]:
    async with aiohttp.ClientSession() as http, http.get(f"{proxy_url}/metrics") as resp:
        text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(text) for s in family.samples
    }


async def test_metrics_count_requests_tokens_cost_and_refusals(make_customer, openai_client, proxy_url, usage_log):
    before = await _scrape(proxy_url)
    customer = await make_customer("starter")
    client = openai_client(customer.api_key)
    await client.chat.completions.create(model="gpt-4o-mini", messages=[], max_tokens=5)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=[])
    after = await _scrape(proxy_url)

    def grew(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0) - before.get(key, 0)

    request_labels = {"provider": "openai", "model": "gpt-4o-mini", "tier": "starter"}
    assert grew("costproxy_requests_total", **request_labels, status="200") == 1
    assert grew("costproxy_tokens_total", **request_labels, direction="input") == 1200
    assert grew("costproxy_tokens_total", **request_labels, direction="output") == 300
    assert grew("costproxy_cost_micro_usd_total", **request_labels) == 345
    assert grew("costproxy_refusals_total", provider="openai", reason="model_not_found") == 1
    assert grew("costproxy_upstream_seconds_count", provider="openai") == 1
    assert grew("costproxy_overhead_seconds_count", provider="openai") == 1

    assert await usage_log.lag() >= 2  # the account opening and the charge wait for the worker
    assert (await _scrape(proxy_url))[("costproxy_usage_log_lag_events", frozenset())] >= 2
