"""Service tiers on the OpenAI wire: a request is charged at the tier the provider says it
served (the answer's ``service_tier``, which is what it bills), a request naming none is
held at the operator's project default (``default_service_tier``), and a served tier
pricing.yaml cannot price is counted."""

from __future__ import annotations

import openai
import pytest
import yaml
from prometheus_client import REGISTRY

from .support.accounts import held_during_stream, settled
from .support.http import fetch
from .support.mock_upstreams import RECEIVED, openai_app
from .support.money import ALLOWANCE, micro

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
# the mock's usage: 1,000 uncached + 200 cached prompt tokens, 300 output tokens
STANDARD = micro((1000, "0.15"), (200, "0.075"), (300, "0.6"))
PRIORITY = micro((1000, "0.25"), (200, "0.125"), (300, "1"))


def _unpriced() -> float | None:
    labels = {"provider": "openai", "model": "o3-pro", "service_tier": "priority"}
    return REGISTRY.get_sample_value("costproxy_unpriced_service_tier_total", labels)


@pytest.fixture
async def proxy(start_proxy):
    return await start_proxy({"openai": openai_app()}, database=False)


@pytest.mark.parametrize(
    ("asked", "served", "cost"), [("priority", "default", STANDARD), (None, "priority", PRIORITY), ("auto", "priority", PRIORITY)]
)
@pytest.mark.parametrize("stream", [False, True])
async def test_the_charge_follows_the_tier_the_provider_served(proxy, make_customer, ledger, asked, served, cost, stream):
    customer = await make_customer("starter")
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=customer.api_key, max_retries=0)
    extra = {"service_tier": asked} if asked else {}
    answer = await client.chat.completions.create(**CHAT, **extra, stream=stream, extra_headers={"x-mock-served-tier": served})
    if stream:
        assert [chunk.service_tier async for chunk in answer][-1] == served
    assert (await settled(ledger, customer.user_id)).balance == ALLOWANCE["starter"] - cost


async def test_a_request_naming_no_tier_is_held_at_the_projects_default_tier(start_proxy, config_files, make_customer, ledger):
    pricing = yaml.safe_load(config_files[0].read_text())
    pricing["providers"]["openai"]["default_service_tier"] = "priority"
    config_files[0].write_text(yaml.safe_dump(pricing))
    proxy = await start_proxy({"openai": openai_app()}, database=False)
    customer = await make_customer("professional")
    url, auth = f"{proxy.url}/openai/v1/chat/completions", {"Authorization": f"Bearer {customer.api_key}"}
    held = await held_during_stream(
        url, {**auth, "x-mock-scenario": "slow"}, {**CHAT, "max_tokens": 100, "stream": True}, ledger, customer.user_id
    )
    sent = len(proxy.upstreams["openai"].app[RECEIVED][-1].body)
    assert held == micro((sent + 64, "0.25"), (100, "1"))  # priority prices, not 0.15 / 0.6
    # a model without priority prices cannot be served at the project's priority default...
    refused = await fetch(url, auth, {**CHAT, "model": "o3-pro"})
    assert (refused.status, refused.json()["error"]["code"]) == (400, "unsupported_option")
    assert '"service_tier": "default"' in refused.json()["error"]["message"]  # how to get the standard tier
    assert (await fetch(url, auth, {**CHAT, "model": "o3-pro", "service_tier": "default"})).status == 200
    # embeddings have one tier: the project's priority default does not refuse them
    embedding = {"model": "text-embedding-3-small", "input": "hi"}
    assert (await fetch(f"{proxy.url}/openai/v1/embeddings", auth, embedding)).status == 200


async def test_a_served_tier_without_prices_is_counted(proxy, make_customer, ledger):
    customer = await make_customer("professional")
    before = _unpriced() or 0
    raw = await fetch(
        f"{proxy.url}/openai/v1/chat/completions",
        {"Authorization": f"Bearer {customer.api_key}", "x-mock-served-tier": "priority"},
        {**CHAT, "model": "o3-pro"},
    )
    assert raw.status == 200
    await settled(ledger, customer.user_id)
    assert _unpriced() == before + 1
