"""Usage as each wire reports it: stream events, compatible dialects, estimates."""

from __future__ import annotations

import orjson

from proxy.providers.anthropic import AnthropicStreamMeter
from proxy.providers.base import Call
from proxy.providers.openai import OpenAIStreamMeter

TRICKY = 'He said "usage": {"prompt_tokens": 1} — a string, not usage'


def _sse(*events: dict) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)


def _call(usage_injected: bool = False) -> Call:
    return Call(
        model="m",
        endpoint="chat",
        stream=True,
        max_output_tokens=None,
        body=b"{}",
        prompt_upper_bound=40,
        usage_injected=usage_injected,
    )


def _chunk(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}}], "usage": None}


def test_usage_inside_generated_text_is_not_taken_for_usage_and_the_text_is_counted():
    meter = OpenAIStreamMeter(_call(usage_injected=True))
    sent = meter.feed(_sse(_chunk(TRICKY), _chunk("ok")))
    assert meter.usage is None and meter.generated_chars == len(TRICKY) + 2
    without_usage = [{k: v for k, v in _chunk(text).items() if k != "usage"} for text in (TRICKY, "ok")]
    assert sent == _sse(*without_usage)  # what a client that did not ask for usage expects

    usage_only = {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 7}}
    assert meter.feed(_sse(usage_only) + b"data: [DONE]\n\n") == b"data: [DONE]\n\n"  # the injected chunk is dropped
    assert (meter.usage.input_tokens, meter.usage.output_tokens) == (12, 7)


def test_a_claude_stream_cut_short_keeps_its_input_and_estimates_the_output():
    meter = AnthropicStreamMeter(_call())
    meter.feed(
        _sse(
            {"type": "message_start", "message": {"usage": {"input_tokens": 30, "output_tokens": 1}}},
            *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "abcd" * 5}} for _ in range(3)),
        )
    )
    assert meter.usage is None  # no message_delta yet
    estimate = meter.estimate()
    assert (estimate.input_tokens, estimate.output_tokens, estimate.estimated) == (30, 15, True)


def test_compatible_dialects_are_charged_what_they_bill():
    """xAI counts reasoning only in total_tokens; DeepSeek reports cache hits on their own."""
    from pathlib import Path

    from proxy.config import load_config
    from proxy.providers.openai import usage_from_openai

    root = Path(__file__).resolve().parent.parent
    prices = load_config(root / "pricing.yaml", root / "tiers.yaml").prices
    # xAI's published sample: 10,120 in (of which none cached), 1,499 completion + 2,809 reasoning
    xai = usage_from_openai(
        {
            "prompt_tokens": 10120,
            "completion_tokens": 1499,
            "total_tokens": 14428,
            "completion_tokens_details": {"reasoning_tokens": 2809},
        }
    )
    assert (xai.input_tokens, xai.output_tokens, xai.reasoning_tokens) == (10120, 4308, 2809)
    # 10,120 × $2 + 4,308 × $6 per million = 20,240 + 25,848 µ$
    assert prices.find("xai", "grok-4.7").cost_micro(xai) == 46_088
    # OpenAI's own usage: reasoning is inside completion_tokens, total adds nothing
    plain = usage_from_openai(
        {
            "prompt_tokens": 100,
            "completion_tokens": 50,
            "total_tokens": 150,
            "completion_tokens_details": {"reasoning_tokens": 30},
        }
    )
    assert (plain.input_tokens, plain.output_tokens) == (100, 50)

    deepseek = usage_from_openai(
        {
            "prompt_tokens": 10000,
            "completion_tokens": 1000,
            "total_tokens": 11000,
            "prompt_cache_hit_tokens": 8000,
            "prompt_cache_miss_tokens": 2000,
        }
    )
    assert (deepseek.input_tokens, deepseek.cached_input_tokens, deepseek.output_tokens) == (2000, 8000, 1000)
    # 2,000 × $0.3 + 8,000 × $0.006 + 1,000 × $1.2 per million = 600 + 48 + 1,200 µ$
    assert prices.find("deepseek", "deepseek-v4-flash").cost_micro(deepseek) == 1_848


def _counts(usage) -> tuple[int, ...]:
    return (
        usage.input_tokens,
        usage.cached_input_tokens,
        usage.cache_write_tokens,
        usage.cache_write_1h_tokens,
        usage.output_tokens,
        usage.reasoning_tokens,
    )


def test_nonsense_usage_never_makes_a_negative_or_fractional_charge():
    """Negative, fractional, textual or huge counts from an upstream: negative numbers and
    what is no number count 0, decimal text counts (header values are text), fractions
    round up, and huge counts count as 2**31 - 1."""
    from proxy.providers.anthropic import usage_from_anthropic
    from proxy.providers.base import MAX_REPORTED_TOKENS
    from proxy.providers.bedrock_usage import usage_from_converse, usage_from_headers
    from proxy.providers.google import usage_from_gemini
    from proxy.providers.openai import usage_from_openai

    top = MAX_REPORTED_TOKENS
    openai = usage_from_openai(
        {"prompt_tokens": -500, "completion_tokens": 2.5, "total_tokens": "9", "prompt_tokens_details": [1]}
    )
    assert _counts(openai) == (0, 0, 0, 0, 9, 0)  # output: total "9" minus a prompt of 0, over 2.5 → 3
    anthropic = usage_from_anthropic(
        {"input_tokens": 1e300, "output_tokens": -7, "cache_read_input_tokens": True, "cache_creation": "x"}
    )
    assert _counts(anthropic) == (top, 0, 0, 0, 0, 0)
    gemini = usage_from_gemini({"promptTokenCount": 100, "cachedContentTokenCount": 500, "toolUsePromptTokenCount": -50})
    assert _counts(gemini) == (0, 100, 0, 0, 0, 0)  # cached is at most the prompt
    converse = usage_from_converse(
        {
            "inputTokens": "12",
            "outputTokens": 2**80,
            "cacheWriteInputTokens": -3,
            "cacheDetails": [{"ttl": "1h", "inputTokens": 9}],
        }
    )
    assert _counts(converse) == (12, 0, 0, 0, top, 0)  # 1h writes are at most the writes (0)
    headers = usage_from_headers({"x-amzn-bedrock-input-token-count": "31", "x-amzn-bedrock-output-token-count": "-4"})
    assert _counts(headers) == (31, 0, 0, 0, 0, 0)
