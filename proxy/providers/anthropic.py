"""Anthropic Messages API: ``/anthropic/v1/messages`` metered, token counting and model listing free.

Anthropic reports ``input_tokens`` *without* the prompt tokens read from or written to the
prompt cache; those come as ``cache_read_input_tokens`` and ``cache_creation_input_tokens``
(split by TTL in ``cache_creation``), each billed at its own price.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from ..errors import ProxyError
from ..paths import Endpoint, EndpointTable
from ..pricing import Usage
from .base import BYTES_PER_TOKEN, Call, Provider, StreamMeter, as_object, prompt_upper_bound, token_count
from .fields import optional_bool, optional_str, require_model, require_object, token_limit
from .sse import event_data

ENDPOINTS = EndpointTable(
    [
        Endpoint("POST", "v1/messages", "messages"),
        Endpoint("POST", "v1/messages/count_tokens", "count_tokens", free=True),
        Endpoint("GET", "v1/models", "models", free=True),
        Endpoint("GET", "v1/models/{model}", "model", free=True),
    ]
)
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def usage_from_anthropic(usage: Any) -> Usage | None:
    """Billable usage from an Anthropic ``usage`` object (message or cumulative delta);
    every count through :func:`~.base.token_count` (never negative nor fractional)."""
    if not isinstance(usage, dict):
        return None
    writes = token_count(usage.get("cache_creation_input_tokens"))
    write_1h = min(token_count(as_object(usage.get("cache_creation")).get("ephemeral_1h_input_tokens")), writes)
    output = token_count(usage.get("output_tokens"))
    thinking = token_count(as_object(usage.get("output_tokens_details")).get("thinking_tokens"))
    return Usage(
        input_tokens=token_count(usage.get("input_tokens")),
        cached_input_tokens=token_count(usage.get("cache_read_input_tokens")),
        # Writes not broken down by TTL are 5-minute writes, Anthropic's default.
        cache_write_tokens=writes - write_1h,
        cache_write_1h_tokens=write_1h,
        output_tokens=output,
        reasoning_tokens=min(thinking, output),
    )


class ClaudeStreamUsage:
    """The usage a Messages stream reports piecewise, from its decoded events.

    ``message_start`` carries the input and cache tokens (and a first output count);
    every ``message_delta`` carries cumulative counts, so the last one is final. Also
    used for Claude streams relayed by other wires (Bedrock).
    """

    __slots__ = ("_reported", "final")

    def __init__(self) -> None:
        self._reported: dict[str, Any] = {}
        self.final = False

    def observe(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message_start":
            self._merge(as_object(event.get("message")).get("usage"))
        elif kind == "message_delta":
            self._merge(event.get("usage"))
            self.final = True

    def _merge(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self._reported.update((k, v) for k, v in usage.items() if v is not None)

    def usage(self) -> Usage | None:
        """The final usage, once a ``message_delta`` has been seen."""
        return usage_from_anthropic(self._reported) if self.final else None

    def estimate(self, generated_chars: int) -> Usage | None:
        """For a stream cut short: the exact input side, output estimated from the text generated."""
        reported = usage_from_anthropic(self._reported) if self._reported else None
        if reported is not None:
            reported.output_tokens = max(reported.output_tokens, math.ceil(generated_chars / BYTES_PER_TOKEN))
            reported.estimated = True
        return reported


def content_delta_chars(event: dict[str, Any]) -> int:
    """Characters of text, thinking or tool input a ``content_block_delta`` event adds."""
    if event.get("type") != "content_block_delta":
        return 0
    delta = as_object(event.get("delta"))
    for field in ("text", "thinking", "partial_json"):
        value = delta.get(field)
        if isinstance(value, str):
            return len(value)
    return 0


class AnthropicStreamMeter(StreamMeter):
    """Usage from a Messages stream (see :class:`ClaudeStreamUsage`)."""

    def __init__(self, call: Call):
        super().__init__(call)
        self._claude = ClaudeStreamUsage()

    def on_event(self, event: bytes) -> None:
        data = event_data(event)
        try:
            payload = orjson.loads(data) if data else None
        except orjson.JSONDecodeError:
            return
        if not isinstance(payload, dict):
            return
        self.generated_chars += content_delta_chars(payload)
        self._claude.observe(payload)
        self.usage = self._claude.usage()

    def estimate(self) -> Usage:
        return self._claude.estimate(self.generated_chars) or super().estimate()


class AnthropicProvider(Provider):
    """The Anthropic API, reached with the official ``anthropic`` SDK's ``base_url``."""

    wire = "anthropic"
    endpoints = ENDPOINTS
    credential_headers = ("authorization", "x-api-key")

    def caller_key(self, request: web.Request) -> str | None:
        return super().caller_key(request) or request.headers.get("x-api-key") or None

    def add_credential(self, headers: CIMultiDict[str]) -> None:
        headers["x-api-key"] = self.api_key

    def inspect(self, method: str, tail: str, body: bytes, payload: Any) -> Call:
        """``POST /v1/messages``. Read and checked (:mod:`.fields`): ``model``,
        ``max_tokens`` (required: an integer from 1 to 2**31 - 1), ``stream``, and the
        options priced above the standard rate, ``speed`` and ``inference_geo`` (strings)."""
        self.metered(method, tail)
        payload = require_object(payload)
        model = require_model(payload)
        max_tokens = token_limit(payload, "max_tokens")
        if max_tokens is None:
            raise ProxyError(400, "missing_max_tokens", "max_tokens: Field required (a positive integer).")
        stream = optional_bool(payload, "stream")
        # pricing.yaml cannot express these surcharges yet (US-only inference 1.1x, fast mode
        # a multiple): refused rather than billed at the standard price.
        if optional_str(payload, "speed") == "fast" or optional_str(payload, "inference_geo") not in (None, "global"):
            raise ProxyError(
                400,
                "unsupported_option",
                'Fast mode (speed: "fast") and regional inference (inference_geo) are priced above the '
                "standard rate and are not available through this gateway; leave them out.",
            )
        return Call(
            model=model,
            endpoint="messages",
            stream=stream,
            max_output_tokens=max_tokens,  # thinking counts towards it: the hold is exact
            body=body,
            prompt_upper_bound=prompt_upper_bound(body),
        )

    def usage_from_body(self, call: Call, payload: Any) -> Usage | None:
        return usage_from_anthropic(payload.get("usage")) if isinstance(payload, dict) else None

    def stream_meter(self, call: Call) -> StreamMeter:
        return AnthropicStreamMeter(call)

    def error_payload(self, error: ProxyError) -> dict[str, Any]:
        if error.quota_spent:
            kind = "billing_error"  # Anthropic's own: credits used up
        else:
            kind = _ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": error.message}}
