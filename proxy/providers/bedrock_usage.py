"""Usage from Amazon Bedrock answers: Converse JSON, InvokeModel bodies and headers, event streams.

Bedrock counts ``inputTokens`` without the prompt tokens read from or written to the prompt
cache (``cacheReadInputTokens`` / ``cacheWriteInputTokens``, split by TTL in
``cacheDetails``), as Anthropic does; each kind is billed at its own price.

Streams (``application/vnd.amazon.eventstream``) are binary: each message has a prelude,
headers (``:message-type``, ``:event-type``) and a JSON payload. ConverseStream ends with a
``metadata`` event carrying the usage; InvokeModelWithResponseStream wraps the model's own
chunks in base64 (``{"bytes": ...}``), the last one with ``amazon-bedrock-invocationMetrics``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import orjson

from ..pricing import Usage
from .anthropic import ClaudeStreamUsage, usage_from_anthropic
from .base import Call, StreamMeter, as_list, token_count
from .openai import usage_from_openai

# (input, output, cache read, cache write) under each naming Bedrock uses
_CONVERSE = ("inputTokens", "outputTokens", "cacheReadInputTokens", "cacheWriteInputTokens")
_NOVA = ("inputTokens", "outputTokens", "cacheReadInputTokenCount", "cacheWriteInputTokenCount")
_METRICS = ("inputTokenCount", "outputTokenCount", "cacheReadInputTokenCount", "cacheWriteInputTokenCount")
_HEADERS = tuple(f"x-amzn-bedrock-{kind}-token-count" for kind in ("input", "output", "cache-read-input", "cache-write-input"))
_LLAMA = ("prompt_token_count", "generation_token_count")


def _counted(source: Mapping[str, Any], names: tuple[str, ...], write_1h: int = 0) -> Usage | None:
    """Usage from four (or two) counters named ``names``; None unless the input count is
    there. Every count through :func:`~.base.token_count`: never negative nor fractional
    (header values are decimal text)."""
    if names[0] not in source:
        return None
    inp, out, *cache = (token_count(source.get(name)) for name in names)
    read, write = cache or (0, 0)
    write_1h = min(write_1h, write)
    return Usage(
        input_tokens=inp,
        output_tokens=out,
        cached_input_tokens=read,
        cache_write_tokens=write - write_1h,
        cache_write_1h_tokens=write_1h,
    )


def usage_from_converse(usage: Any) -> Usage | None:
    """Usage from a Converse ``usage`` object (also ConverseStream's ``metadata`` event)."""
    if not isinstance(usage, dict):
        return None
    details = as_list(usage.get("cacheDetails"))
    write_1h = sum(token_count(d.get("inputTokens")) for d in details if isinstance(d, dict) and d.get("ttl") == "1h")
    return _counted(usage, _CONVERSE, write_1h)


def usage_from_invoke(payload: Any) -> Usage | None:
    """Usage from an InvokeModel body, for the model families that report it there."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if isinstance(usage, dict):
        if "input_tokens" in usage:  # Anthropic Claude
            return usage_from_anthropic(usage)
        if "prompt_tokens" in usage:  # OpenAI-format models (gpt-oss)
            return usage_from_openai(usage)
        return _counted(usage, _NOVA)  # Amazon Nova
    return _counted(payload, _LLAMA)


def usage_from_headers(headers: Mapping[str, str]) -> Usage | None:
    """Usage from InvokeModel's ``x-amzn-bedrock-*-token-count`` response headers (every model)."""
    return _counted({name: headers[name] for name in _HEADERS if name in headers}, _HEADERS)


def _text_length(*texts: Any) -> int:
    return sum(len(t) for t in texts if isinstance(t, str))


def get_in(obj: Any, *names: str) -> Any:
    """``obj[names[0]][names[1]]...``, or None where a level is missing or not an object."""
    for name in names:
        obj = obj.get(name) if isinstance(obj, dict) else None
    return obj


def _delta_chars(delta: Any) -> int:
    """Text generated in a ConverseStream ``contentBlockDelta``."""
    return _text_length(get_in(delta, "text"), get_in(delta, "toolUse", "input"), get_in(delta, "reasoningContent", "text"))


def _chunk_chars(chunk: dict[str, Any]) -> int:
    """Text generated in a model-native stream chunk (Claude, Llama, Titan)."""
    delta = chunk.get("delta")
    return _text_length(
        chunk.get("generation"), chunk.get("outputText"), *(get_in(delta, f) for f in ("text", "thinking", "partial_json"))
    )


class EventStreamMeter(StreamMeter):
    """Usage from a binary AWS event stream, passed on byte for byte.

    For InvokeModelWithResponseStream of a Claude model the Anthropic events inside count
    (``message_start`` has the input and cache writes split by TTL, ``message_delta`` the
    output); for other models the closing ``amazon-bedrock-invocationMetrics``. A stream
    that cannot be parsed is still relayed; its usage is then estimated.
    """

    def __init__(self, call: Call):
        from botocore.eventstream import EventStreamBuffer

        super().__init__(call)
        self._buffer: EventStreamBuffer | None = EventStreamBuffer()
        self._claude = ClaudeStreamUsage()
        self._metrics: Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        from botocore.eventstream import ParserError

        if self._buffer is not None:
            self._buffer.add_data(chunk)
            try:
                for message in self._buffer:
                    self._on_message(message.headers, message.payload)
            except ParserError:
                self._buffer = None
        return chunk

    def finish(self) -> bytes:
        return b""

    def _on_message(self, headers: dict[str, Any], payload: bytes) -> None:
        if headers.get(":message-type") != "event":
            return
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict):
            return
        kind = headers.get(":event-type")
        if kind == "metadata":
            self.usage = usage_from_converse(event.get("usage")) or self.usage
        elif kind == "contentBlockDelta":
            self.generated_chars += _delta_chars(event.get("delta"))
        elif kind == "chunk":
            self._on_chunk(event.get("bytes"))

    def _on_chunk(self, encoded: Any) -> None:
        try:
            chunk = orjson.loads(base64.b64decode(encoded or "", validate=True))
        except (binascii.Error, ValueError, TypeError):
            return
        if not isinstance(chunk, dict):
            return
        metrics = chunk.get("amazon-bedrock-invocationMetrics")
        if isinstance(metrics, dict):
            self._metrics = _counted(metrics, _METRICS)
        self._claude.observe(chunk)
        self.generated_chars += _chunk_chars(chunk)
        self.usage = self._claude.usage() or self._metrics

    def estimate(self) -> Usage:
        """A Claude stream cut short keeps its exact input side; the output is estimated."""
        return self._claude.estimate(self.generated_chars) or super().estimate()
