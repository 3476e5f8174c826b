"""Out-of-credit refusals as the agent frameworks on top of the official SDKs see them.

The proxy keeps its 403 ``insufficient_credits`` (429 for a spent monthly limit) but words
the body as each provider words its own out-of-quota error — OpenAI's ``insufficient_quota``
type, Anthropic's ``billing_error`` — so frameworks that special-case those (pydantic-ai)
report "quota exhausted" instead of "check your API key", and say when to come back with
``retry-after`` while ``x-should-retry: false`` keeps the SDKs from retrying.
"""

from __future__ import annotations

import anthropic
import openai
import pytest
from agents import Agent as OpenAIAgent
from agents import OpenAIChatCompletionsModel, Runner, set_tracing_disabled
from langchain_openai import ChatOpenAI
from pydantic_ai import Agent
from pydantic_ai.exceptions import ModelQuotaExceededError
from pydantic_ai.models.anthropic import AnthropicModel
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.anthropic import AnthropicProvider
from pydantic_ai.providers.openai import OpenAIProvider

from proxy import metrics
from proxy.ledger import now_ms

from .support.accounts import account
from .support.http import fetch
from .support.mock_anthropic import anthropic_app
from .support.mock_upstreams import openai_app

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
set_tracing_disabled(True)  # openai-agents would export traces to OpenAI


@pytest.fixture
async def proxy(start_proxy):
    return await start_proxy({"openai": openai_app(), "anthropic": anthropic_app()}, database=False)


def _refused(reason: str) -> float:
    return sum(
        sample.value
        for family in metrics.REFUSALS.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels.get("reason") == reason
    )


async def test_pydantic_ai_reports_spent_credits_as_quota_not_a_bad_key(proxy, make_customer):
    customer = await make_customer("professional", balance_micro=0)
    model = OpenAIChatModel("gpt-4o-mini", provider=OpenAIProvider(base_url=f"{proxy.url}/openai/v1", api_key=customer.api_key))
    with pytest.raises(ModelQuotaExceededError) as err:
        await Agent(model).run("hi")
    assert err.value.status_code == 403 and "credits are used up" in str(err.value.body)

    claude = AnthropicModel(
        "claude-haiku-4-5", provider=AnthropicProvider(base_url=f"{proxy.url}/anthropic", api_key=customer.api_key)
    )
    with pytest.raises(ModelQuotaExceededError):
        await Agent(claude).run("hi")
    assert proxy.received("openai") == [] and proxy.received("anthropic") == []


async def test_pydantic_ai_reports_a_spent_monthly_limit_as_quota_not_a_rate_limit(proxy, make_customer, ledger):
    customer = await make_customer("starter")
    await ledger.redis.hset(ledger.keys.account(customer.user_id), "requests", 2000)  # the starter limit
    model = OpenAIChatModel("gpt-4o-mini", provider=OpenAIProvider(base_url=f"{proxy.url}/openai/v1", api_key=customer.api_key))
    with pytest.raises(ModelQuotaExceededError) as err:
        await Agent(model).run("hi")
    assert err.value.status_code == 429


async def test_langchain_and_openai_agents_say_credits_are_used_up_and_do_not_retry(proxy, make_customer):
    customer = await make_customer("starter", balance_micro=0)
    before = _refused("insufficient_credits")
    chat = ChatOpenAI(model="gpt-4o-mini", base_url=f"{proxy.url}/openai/v1", api_key=customer.api_key, max_retries=3)
    with pytest.raises(openai.PermissionDeniedError) as err:
        await chat.ainvoke("hi")
    assert "Your credits are used up" in str(err.value) and err.value.code == "insufficient_credits"
    assert err.value.type == "insufficient_quota"

    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=customer.api_key, max_retries=3)
    agent = OpenAIAgent(name="a", model=OpenAIChatCompletionsModel(model="gpt-4o-mini", openai_client=client))
    with pytest.raises(openai.PermissionDeniedError) as err:
        await Runner.run(agent, "hi")
    assert "Your credits are used up" in err.value.message
    assert _refused("insufficient_credits") - before == 2  # one request each: max_retries=3 retried nothing


@pytest.mark.parametrize(("balance", "requests", "status"), [(0, 0, 403), (None, 2000, 429)])
async def test_quota_refusals_say_when_the_cycle_renews(proxy, make_customer, ledger, balance, requests, status):
    customer = await make_customer("starter", balance_micro=balance)
    await ledger.redis.hset(ledger.keys.account(customer.user_id), "requests", requests)
    raw = await fetch(f"{proxy.url}/openai/v1/chat/completions", {"Authorization": f"Bearer {customer.api_key}"}, CHAT)
    assert raw.status == status, raw.body
    assert raw.json()["error"]["type"] == "insufficient_quota"
    assert raw.headers["x-should-retry"] == "false"
    until_renewal = ((await account(ledger, customer.user_id)).cycle_end - now_ms()) / 1000
    assert abs(int(raw.headers["retry-after"]) - until_renewal) <= 2, (raw.headers["retry-after"], until_renewal)


async def test_the_official_anthropic_sdk_sees_a_billing_error_and_does_not_retry(proxy, make_customer):
    customer = await make_customer("professional", balance_micro=0)
    before = _refused("insufficient_credits")
    client = anthropic.AsyncAnthropic(base_url=f"{proxy.url}/anthropic", api_key=customer.api_key, max_retries=3)
    with pytest.raises(anthropic.PermissionDeniedError) as err:
        await client.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["error"]["type"] == "billing_error"
    assert err.value.response.headers["retry-after"].isdigit()
    assert _refused("insufficient_credits") - before == 1
