"""Stream meters: usage from the events that carry it, text counted for estimates."""

from __future__ import annotations

import orjson

from proxy.providers.anthropic import AnthropicStreamMeter
from proxy.providers.base import Call
from proxy.providers.openai import OpenAIStreamMeter

TRICKY = 'He said "usage": {"prompt_tokens": 1} — a string, not usage'


def _sse(*events: dict) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)


def _call(**options) -> Call:
    return Call(model="m", stream=True, max_output_tokens=None, body=b"{}", prompt_upper_bound=40, options=options)


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
    meter.feed(_sse(
        {"type": "message_start", "message": {"usage": {"input_tokens": 30, "output_tokens": 1}}},
        *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "abcd" * 5}} for _ in range(3)),
    ))
    assert meter.usage is None  # no message_delta yet
    estimate = meter.estimate()
    assert (estimate.input_tokens, estimate.output_tokens, estimate.estimated) == (30, 15, True)

