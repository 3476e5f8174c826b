"""What the proxy reads from a request body is checked before anything reaches Redis: token
limits and counts of choices are bounded integers, every field read has its type, and a
wrong one is a 400 in the provider's error shape that costs nothing. The hold covers every
choice a request can produce, with or without a token limit.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
import yaml

from proxy.errors import ProxyError
from proxy.providers.anthropic import AnthropicProvider
from proxy.providers.azure import AzureOpenAIProvider
from proxy.providers.base import Call, Provider
from proxy.providers.bedrock import BedrockProvider
from proxy.providers.fields import MAX_CHOICES, MAX_TOKEN_LIMIT
from proxy.providers.google import GoogleProvider
from proxy.providers.openai import OpenAIProvider

from .support.accounts import account, assert_untouched, held_during_stream
from .support.http import fetch
from .support.mock_google import google_app
from .support.mock_upstreams import RECEIVED, openai_app
from .support.money import ALLOWANCE, micro

OPENAI = OpenAIProvider("openai", "https://api.openai.com", "k")
AZURE = AzureOpenAIProvider("azure", "https://res.openai.azure.com", "k")
ANTHROPIC = AnthropicProvider("anthropic", "https://api.anthropic.com", "k")
GOOGLE = GoogleProvider("google", "https://generativelanguage.googleapis.com", "k")
BEDROCK = BedrockProvider("bedrock", "https://bedrock-runtime.us-east-1.amazonaws.com", "k")

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
CLAUDE = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
GEMINI = {"contents": [{"parts": [{"text": "hi"}]}]}
CONVERSE = {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}
#: JSON values that are no count: too big, zero, negative, fractional, float-typed, text, boolean, containers
NOT_A_COUNT: list[Any] = [9_000_000_000_000_000_000, 0, -1, 1.5, 100.0, 1e300, "100", True, False, [], {}]

#: (provider, tail, a valid body, where the token limit goes, where the number of choices goes)
CASES: list[tuple[Provider, str, dict[str, Any], tuple[str, ...], tuple[str, ...] | None]] = [
    (OPENAI, "v1/chat/completions", CHAT, ("max_tokens",), ("n",)),
    (OPENAI, "v1/chat/completions", CHAT, ("max_completion_tokens",), ("n",)),
    (OPENAI, "v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hi"}, ("max_tokens",), ("best_of",)),
    (OPENAI, "v1/responses", {"model": "gpt-4o-mini", "input": "hi"}, ("max_output_tokens",), None),
    (AZURE, "openai/deployments/prod-mini/chat/completions", {"messages": []}, ("max_tokens",), ("n",)),
    (ANTHROPIC, "v1/messages", CLAUDE, ("max_tokens",), None),
    (GOOGLE, "v1beta/models/gemini-2.5-flash:generateContent", GEMINI, ("generationConfig", "maxOutputTokens"), None),
    (GOOGLE, "v1beta/models/gemini-2.5-flash:generateContent", GEMINI, ("generation_config", "max_output_tokens"), None),
    (BEDROCK, "model/m/converse", CONVERSE, ("inferenceConfig", "maxTokens"), None),
    (BEDROCK, "model/m/invoke", {"messages": []}, ("max_tokens",), ("n",)),
    (BEDROCK, "model/m/invoke", {"prompt": "hi"}, ("max_gen_len",), None),
    (BEDROCK, "model/m/invoke", {"inputText": "hi"}, ("textGenerationConfig", "maxTokenCount"), None),
    (BEDROCK, "model/m/invoke", {"messages": []}, ("inferenceConfig", "max_new_tokens"), None),
]
CHOICE_CASES: list[tuple[Provider, str, dict[str, Any], tuple[str, ...]]] = [
    (OPENAI, "v1/chat/completions", CHAT, ("n",)),
    (OPENAI, "v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hi"}, ("n",)),
    (OPENAI, "v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hi"}, ("best_of",)),
    (AZURE, "openai/v1/chat/completions", CHAT, ("n",)),
    (GOOGLE, "v1beta/models/gemini-2.5-flash:streamGenerateContent", GEMINI, ("generationConfig", "candidateCount")),
    (GOOGLE, "v1/models/gemini-2.5-flash:generateContent", GEMINI, ("generation_config", "candidate_count")),
    (BEDROCK, "model/m/invoke", {"messages": []}, ("n",)),
    (BEDROCK, "model/m/invoke", {"prompt": "hi"}, ("num_generations",)),
]


def with_value(body: dict[str, Any], where: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = orjson.loads(orjson.dumps(body))
    node = out
    for name in where[:-1]:
        node = node.setdefault(name, {})
    node[where[-1]] = value
    return out


def inspect(provider: Provider, tail: str, body: Any) -> Call:
    raw = orjson.dumps(body)
    return provider.inspect("POST", tail, raw, orjson.loads(raw))


def refused(provider: Provider, tail: str, body: Any) -> ProxyError:
    with pytest.raises(ProxyError) as err:
        inspect(provider, tail, body)
    assert err.value.status == 400, err.value.message
    return err.value


@pytest.mark.parametrize(("provider", "tail", "body", "where", "_choices"), CASES)
def test_token_limits_are_bounded_integers(provider, tail, body, where, _choices):
    for good in (1, 4096, MAX_TOKEN_LIMIT):
        assert inspect(provider, tail, with_value(body, where, good)).max_output_tokens == good
    for bad in [*NOT_A_COUNT, MAX_TOKEN_LIMIT + 1]:
        error = refused(provider, tail, with_value(body, where, bad))
        assert error.code == "invalid_max_tokens" and where[-1] in error.message, bad
    if provider is not ANTHROPIC:  # Anthropic requires max_tokens
        assert inspect(provider, tail, with_value(body, where, None)).max_output_tokens is None


@pytest.mark.parametrize(("provider", "tail", "body", "where"), CHOICE_CASES)
def test_choices_are_integers_from_1_to_128_with_or_without_a_token_limit(provider, tail, body, where):
    for good in (1, 2, MAX_CHOICES):
        call = inspect(provider, tail, with_value(body, where, good))
        assert (call.choices, call.max_output_tokens) == (good, None)  # no limit given: the hold uses the model's cap
    assert inspect(provider, tail, with_value(body, where, None)).choices == 1
    assert inspect(provider, tail, body).choices == 1
    for bad in [*NOT_A_COUNT, MAX_CHOICES + 1]:
        error = refused(provider, tail, with_value(body, where, bad))
        assert error.code == "invalid_choices", bad


def test_the_call_carries_the_limit_of_one_choice_and_the_larger_of_two_readings():
    call = inspect(OPENAI, "v1/chat/completions", {**CHAT, "max_tokens": 100, "n": 3})
    assert (call.max_output_tokens, call.choices) == (100, 3)
    call = inspect(OPENAI, "v1/chat/completions", {**CHAT, "max_tokens": 100, "max_completion_tokens": 700})
    assert call.max_output_tokens == 700
    call = inspect(OPENAI, "v1/completions", {"model": "m", "prompt": "", "n": 2, "best_of": 5, "max_tokens": 9})
    assert (call.max_output_tokens, call.choices) == (9, 5)  # every best_of candidate is billed
    gemini = {
        **GEMINI,
        "generationConfig": {"maxOutputTokens": 50, "candidateCount": 2},
        "generation_config": {"candidate_count": 4},
    }
    call = inspect(GOOGLE, "v1beta/models/gemini-2.5-flash:generateContent", gemini)
    assert (call.max_output_tokens, call.choices) == (50, 4)
    call = inspect(GOOGLE, "v1beta/models/gemini-2.5-flash:embedContent", {"generationConfig": {"candidateCount": 3}})
    assert (call.max_output_tokens, call.choices) == (0, 1)
    assert inspect(OPENAI, "v1/embeddings", {"model": "e", "input": "a", "n": 4}).choices == 1
    call = inspect(BEDROCK, "model/m/invoke", {"max_tokens": 10, "max_gen_len": 30, "inferenceConfig": {"max_new_tokens": 20}})
    assert call.max_output_tokens == 30


#: (provider, tail, a valid body, a field the proxy reads, wrong values for it)
WRONG_TYPES: list[tuple[Provider, str, dict[str, Any], tuple[str, ...], list[Any]]] = [
    (OPENAI, "v1/chat/completions", CHAT, ("stream",), ["true", 1, 0, [], {}]),
    (OPENAI, "v1/chat/completions", {**CHAT, "stream": True}, ("stream_options",), ["include_usage", 1, True, []]),
    (OPENAI, "v1/chat/completions", {**CHAT, "stream": True}, ("stream_options", "include_usage"), ["yes", 1, []]),
    (OPENAI, "v1/chat/completions", CHAT, ("service_tier",), [1, True, [], {"tier": "flex"}]),
    (OPENAI, "v1/responses", {"model": "gpt-4o-mini", "input": "hi"}, ("stream",), ["yes", 1]),
    (OPENAI, "v1/embeddings", {"model": "e", "input": "a"}, ("service_tier",), [3]),
    (AZURE, "openai/deployments/d/chat/completions", {"messages": [], "stream": True}, ("stream_options",), ["x"]),
    (ANTHROPIC, "v1/messages", CLAUDE, ("stream",), ["true", 1]),
    (ANTHROPIC, "v1/messages", CLAUDE, ("speed",), [1, True, ["fast"], {"mode": "fast"}]),
    (ANTHROPIC, "v1/messages", CLAUDE, ("inference_geo",), [1, ["us"], {}]),
    (GOOGLE, "v1beta/models/gemini-2.5-flash:generateContent", GEMINI, ("generationConfig",), ["x", 1, [], True]),
    (GOOGLE, "v1beta/models/gemini-2.5-flash:generateContent", GEMINI, ("generation_config",), ["x", [1]]),
    (GOOGLE, "v1beta/models/gemini-2.5-flash:generateContent", GEMINI, ("serviceTier",), [1, [], {"type": "flex"}]),
    (GOOGLE, "v1beta/models/gemini-2.5-flash:generateContent", GEMINI, ("service_tier",), [True]),
    (BEDROCK, "model/m/converse", CONVERSE, ("inferenceConfig",), ["x", 1, []]),
    (BEDROCK, "model/m/converse", CONVERSE, ("performanceConfig",), ["optimized", 1, []]),
    (BEDROCK, "model/m/converse", CONVERSE, ("performanceConfig", "latency"), [1, ["optimized"]]),
    (BEDROCK, "model/m/converse", CONVERSE, ("serviceTier",), ["flex", 1, []]),
    (BEDROCK, "model/m/converse", CONVERSE, ("serviceTier", "type"), [1, {"flex": 1}]),
    (BEDROCK, "model/m/invoke", {"prompt": "hi"}, ("textGenerationConfig",), ["x", 2]),
    (BEDROCK, "model/m/invoke-with-response-stream", {"prompt": "hi"}, ("inferenceConfig",), [[]]),
]


@pytest.mark.parametrize(("provider", "tail", "body", "where", "values"), WRONG_TYPES)
def test_a_field_the_proxy_reads_with_a_wrong_type_is_a_400(provider, tail, body, where, values):
    inspect(provider, tail, body)  # the body as given is fine
    for value in values:
        error = refused(provider, tail, with_value(body, where, value))
        assert error.code == "invalid_field" and where[-1] in error.message, value
        # rendered in the provider's own error shape
        response = provider.error_response(error)
        assert response.status == 400 and response.body


@pytest.mark.parametrize(
    ("provider", "tail"),
    [
        (OPENAI, "v1/chat/completions"),
        (OPENAI, "v1/embeddings"),
        (AZURE, "openai/deployments/d/chat/completions"),
        (ANTHROPIC, "v1/messages"),
        (GOOGLE, "v1beta/models/gemini-2.5-flash:generateContent"),
        (BEDROCK, "model/m/converse"),
        (BEDROCK, "model/m/invoke"),
    ],
)
def test_a_body_that_is_not_an_object_is_a_400(provider, tail):
    for payload in (None, [], [CHAT], "x", 1, 1.5, True):
        with pytest.raises(ProxyError) as err:
            provider.inspect("POST", tail, orjson.dumps(payload), payload)
        assert (err.value.status, err.value.code) == (400, "invalid_body"), payload


def test_models_and_options_keep_their_refusals():
    assert refused(OPENAI, "v1/chat/completions", {**CHAT, "model": 5}).code == "missing_model"
    assert refused(OPENAI, "v1/chat/completions", {**CHAT, "model": ""}).code == "missing_model"
    assert refused(ANTHROPIC, "v1/messages", {**CLAUDE, "max_tokens": None}).code == "missing_max_tokens"
    assert refused(ANTHROPIC, "v1/messages", {**CLAUDE, "speed": "fast"}).code == "unsupported_option"
    assert refused(ANTHROPIC, "v1/messages", {**CLAUDE, "inference_geo": "us"}).code == "unsupported_option"
    assert inspect(ANTHROPIC, "v1/messages", {**CLAUDE, "inference_geo": "global", "speed": None}).max_output_tokens == 10
    responses = {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 10}
    assert refused(OPENAI, "v1/responses", {**responses, "background": True}).code == "unsupported_option"
    assert inspect(OPENAI, "v1/responses", {**responses, "background": False}).max_output_tokens == 10
    for field, value in (("models", ["anthropic/claude-opus-4.6"]), ("route", "fallback"), ("plugins", [{"id": "web"}])):
        assert refused(OPENAI, "v1/chat/completions", {**CHAT, field: value}).code == "unsupported_option", field
        assert refused(OPENAI, "v1/responses", {**responses, field: value}).code == "unsupported_option", field
    perf = {**CONVERSE, "performanceConfig": {"latency": "optimized"}}
    assert refused(BEDROCK, "model/m/converse", perf).code == "unsupported_option"
    both = {**GEMINI, "serviceTier": "flex", "service_tier": "priority"}
    assert refused(GOOGLE, "v1beta/models/gemini-2.5-flash:generateContent", both).code == "invalid_field"
    snake = inspect(GOOGLE, "v1beta/models/gemini-2.5-flash:generateContent", {**GEMINI, "service_tier": "SERVICE_TIER_FLEX"})
    assert snake.service_tier == "flex"
    flex = inspect(BEDROCK, "model/m/converse", {**CONVERSE, "serviceTier": {"type": "flex"}})
    assert flex.service_tier == "flex"


# end to end ----------------------------------------------------------------------------------
@pytest.fixture
async def proxy(start_proxy):
    return await start_proxy({"openai": openai_app(), "google": google_app()}, database=False)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({**CHAT, "stream": True, "stream_options": "include_usage"}, "invalid_field"),
        ({**CHAT, "stream": "yes"}, "invalid_field"),
        ({**CHAT, "max_tokens": 9_000_000_000_000_000_000}, "invalid_max_tokens"),
        ({**CHAT, "n": 9_000_000_000_000_000_000}, "invalid_choices"),
        ({**CHAT, "n": 129}, "invalid_choices"),
        ({**CHAT, "max_tokens": 1e300}, "invalid_max_tokens"),
        ({**CHAT, "service_tier": ["priority"]}, "invalid_field"),
        ([CHAT], "invalid_body"),
    ],
)
async def test_wrong_fields_are_a_400_that_costs_nothing(proxy, make_customer, ledger, body, code):
    customer = await make_customer("starter")
    raw = await fetch(f"{proxy.url}/openai/v1/chat/completions", {"Authorization": f"Bearer {customer.api_key}"}, body)
    assert raw.status == 400, raw.body
    assert raw.json()["error"]["code"] == code and raw.json()["error"]["type"] == "invalid_request_error"
    assert proxy.received("openai") == []
    await assert_untouched(ledger, customer.user_id, ALLOWANCE["starter"])


async def test_n_without_max_tokens_holds_every_choice_at_the_models_cap(proxy, make_customer, ledger):
    """The issue's case: n=128 with no max_tokens on a strict account of 13 credits. The
    worst case is 128 choices × gpt-4o-mini's 16,384 output tokens at 0.6 µ$: refused."""
    customer = await make_customer("free", balance_micro=130_000)
    body = {**CHAT, "n": 128}
    raw = await fetch(f"{proxy.url}/openai/v1/chat/completions", {"Authorization": f"Bearer {customer.api_key}"}, body)
    assert (raw.status, raw.json()["error"]["code"]) == (403, "insufficient_credits"), raw.body
    assert proxy.received("openai") == []
    await assert_untouched(ledger, customer.user_id, 130_000)


@pytest.mark.parametrize(
    ("extra", "output_tokens"),
    [
        ({"n": 3}, 3 * 16_384),  # no limit: the model's cap for each choice
        ({"n": 2, "max_tokens": 100}, 2 * 100),
        ({"n": 2, "max_tokens": 1_000_000}, 2 * 16_384),  # a limit above the cap holds the cap
    ],
)
async def test_the_hold_covers_every_choice(proxy, make_customer, ledger, extra, output_tokens):
    customer = await make_customer("professional")
    headers = {"Authorization": f"Bearer {customer.api_key}", "x-mock-scenario": "slow"}
    body = {**CHAT, "stream": True, **extra}
    held = await held_during_stream(f"{proxy.url}/openai/v1/chat/completions", headers, body, ledger, customer.user_id)
    sent = proxy.upstreams["openai"].app[RECEIVED][-1].body
    # gpt-4o-mini: every prompt byte (+64) at the dearest input price 0.15, the output at 0.6
    assert held == micro((len(sent) + 64, "0.15"), (output_tokens, "0.6"))
    assert (await account(ledger, customer.user_id)).held == 0


async def test_gemini_candidate_count_without_a_limit_holds_every_candidate(proxy, make_customer, ledger):
    customer = await make_customer("professional")
    body = {**GEMINI, "generationConfig": {"candidateCount": 2}}
    held = await held_during_stream(
        f"{proxy.url}/google/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        {"x-goog-api-key": customer.api_key, "x-mock-scenario": "slow"},
        body,
        ledger,
        customer.user_id,
    )
    sent = proxy.upstreams["google"].app[RECEIVED][-1].body
    # gemini-2.5-flash: dearest input 0.3, output 2.5, max_output_tokens 65,536 per candidate
    assert held == micro((len(sent) + 64, "0.3"), (2 * 65_536, "2.5"))


async def test_priority_processing_a_model_has_no_prices_for_is_refused_and_costs_nothing(proxy, make_customer, ledger):
    """OpenAI bills priority above its standard prices; o3-pro has no priority prices in
    pricing.yaml, so the request cannot be charged what it costs and is refused."""
    customer = await make_customer("professional")
    body = {**CHAT, "model": "o3-pro", "service_tier": "priority"}
    raw = await fetch(f"{proxy.url}/openai/v1/chat/completions", {"Authorization": f"Bearer {customer.api_key}"}, body)
    assert (raw.status, raw.json()["error"]["code"]) == (400, "unsupported_option"), raw.body
    assert raw.json()["error"]["type"] == "invalid_request_error"
    assert proxy.received("openai") == []
    await assert_untouched(ledger, customer.user_id, ALLOWANCE["professional"])
    for tier in ("flex", "default", "auto"):  # cheaper or standard: charged at standard prices
        raw = await fetch(
            f"{proxy.url}/openai/v1/chat/completions",
            {"Authorization": f"Bearer {customer.api_key}"},
            {**body, "service_tier": tier},
        )
        assert raw.status == 200, (tier, raw.body)
    assert len(proxy.received("openai")) == 3


@pytest.fixture
async def capped_proxy(start_proxy, config_files):
    """A proxy whose starter tier allows 0.5 credits (5,000 µ$) per request."""
    tiers = yaml.safe_load(config_files[1].read_text())
    tiers["tiers"]["starter"]["max_request_credits"] = 0.5
    config_files[1].write_text(yaml.safe_dump(tiers))
    return await start_proxy({"openai": openai_app(), "google": google_app()}, database=False)


def _largest_fitting_limit(error: dict[str, Any]) -> int:
    found = re.search(r"Set (\S+) to ([\d,]+) or less", error["message"])
    assert found, error["message"]
    return int(found.group(2).replace(",", ""))


@pytest.mark.parametrize("choices", [1, 3])
async def test_a_request_over_the_tiers_cap_is_refused_with_the_limit_that_fits(capped_proxy, make_customer, ledger, choices):
    """No max_tokens on gpt-4o-mini holds 16,384 output tokens (~9,830 µ$ each choice): over
    the 5,000 µ$ cap, refused before anything is held or forwarded, naming the largest
    max_completion_tokens that fits; that limit is admitted and one token more is not."""
    customer = await make_customer("starter")
    url, headers = f"{capped_proxy.url}/openai/v1/chat/completions", {"Authorization": f"Bearer {customer.api_key}"}
    raw = await fetch(url, headers, {**CHAT, "n": choices})
    assert (raw.status, raw.json()["error"]["code"]) == (403, "request_too_expensive"), raw.body
    error = raw.json()["error"]
    assert error["type"] == "permission_error", error
    assert "0.5000 credits per request" in error["message"] and "max_completion_tokens" in error["message"]
    assert raw.headers.get("x-should-retry") == "false"
    assert capped_proxy.received("openai") == []
    await assert_untouched(ledger, customer.user_id, ALLOWANCE["starter"])
    fits = _largest_fitting_limit(error)
    body = {**CHAT, "n": choices, "max_completion_tokens": fits}
    sent = len(orjson.dumps(body)) + 64  # the prompt bound: every byte of the body (+64) at 0.15 µ$ a token
    assert micro((sent, "0.15"), (choices * fits, "0.6")) <= 5_000  # the advice fits once the field is in the body
    assert micro((sent, "0.15"), (choices * (fits + 20), "0.6")) > 5_000  # and is the largest, within a few bytes' room
    over = await fetch(url, headers, {**body, "max_completion_tokens": fits + 20})
    assert (over.status, over.json()["error"]["code"]) == (403, "request_too_expensive")
    assert (await fetch(url, headers, body)).status == 200
    assert len(capped_proxy.received("openai")) == 1


async def test_a_prompt_over_the_cap_on_its_own_is_told_to_shorten(capped_proxy, make_customer, ledger):
    customer = await make_customer("starter")
    long_prompt = {**CHAT, "messages": [{"role": "user", "content": "x" * 40_000}], "max_tokens": 1}  # ~40k tokens at 0.15
    raw = await fetch(
        f"{capped_proxy.url}/openai/v1/chat/completions", {"Authorization": f"Bearer {customer.api_key}"}, long_prompt
    )
    assert (raw.status, raw.json()["error"]["code"]) == (403, "request_too_expensive")
    assert "Shorten the prompt" in raw.json()["error"]["message"]
    await assert_untouched(ledger, customer.user_id, ALLOWANCE["starter"])


async def test_an_uncapped_tier_is_not_limited_per_request(capped_proxy, make_customer):
    customer = await make_customer("professional")
    raw = await fetch(
        f"{capped_proxy.url}/openai/v1/chat/completions", {"Authorization": f"Bearer {customer.api_key}"}, {**CHAT, "n": 3}
    )
    assert raw.status == 200, raw.body


def test_the_refusal_names_each_apis_own_limit_field():
    assert inspect(OPENAI, "v1/responses", {"model": "gpt-4o-mini", "input": "x"}).limit_field == "max_output_tokens"
    assert inspect(OPENAI, "v1/chat/completions", CHAT).limit_field == "max_completion_tokens"
    assert inspect(ANTHROPIC, "v1/messages", CLAUDE).limit_field == "max_tokens"
    gemini = inspect(GOOGLE, "v1beta/models/gemini-2.5-flash:generateContent", GEMINI)
    assert gemini.limit_field == "generationConfig.maxOutputTokens"
    assert inspect(BEDROCK, "model/m/converse", CONVERSE).limit_field == "inferenceConfig.maxTokens"
