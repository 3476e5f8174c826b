"""OpenAI wire format: chat completions, completions, embeddings and the Responses API.

Also the wire of every OpenAI-compatible provider configured with ``wire: openai``.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..pricing import ProviderPricing, Usage
from .base import Call, Provider, ProxyError, StreamMeter, optional_int, prompt_upper_bound, require_model
from .sse import event_data

_METERED = {
    "v1/chat/completions": "chat",
    "v1/completions": "completions",
    "v1/embeddings": "embeddings",
    "v1/responses": "responses",
}
# Stream events of the Responses API that carry the final usage.
_RESPONSE_DONE = frozenset({"response.completed", "response.incomplete", "response.failed"})
# What OpenAI adds to every chunk once include_usage is on; removed when we added it.
_NULL_USAGE = b',"usage":null'


def usage_from_openai(usage: Any) -> Usage | None:
    """Usage from either OpenAI naming (``prompt_tokens`` or ``input_tokens``), and from
    the OpenAI-compatible dialects that count differently: xAI leaves reasoning out of
    ``completion_tokens`` (but not out of ``total_tokens``), DeepSeek reports cache hits as
    ``prompt_cache_hit_tokens``."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens")) or 0
    output = usage.get("completion_tokens", usage.get("output_tokens")) or 0
    output = max(output, (usage.get("total_tokens") or 0) - prompt)
    in_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    out_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
    cached = min(in_details.get("cached_tokens") or usage.get("prompt_cache_hit_tokens") or 0, prompt)
    return Usage(
        input_tokens=prompt - cached,
        cached_input_tokens=cached,
        output_tokens=output,
        reasoning_tokens=out_details.get("reasoning_tokens") or 0,
    )


def _generated_chars(chunk: dict[str, Any]) -> int:
    total = 0
    delta = chunk.get("delta")
    if isinstance(delta, str):  # Responses API text/argument deltas
        return len(delta)
    for choice in chunk.get("choices") or ():
        d = choice.get("delta") or {}
        for text in (d.get("content"), d.get("reasoning_content"), choice.get("text")):
            if isinstance(text, str):
                total += len(text)
        for call in d.get("tool_calls") or ():
            total += len((call.get("function") or {}).get("arguments") or "")
    return total


class OpenAIStreamMeter(StreamMeter):
    """Usage from chat/completions chunks or Responses API events.

    When the proxy itself turned on ``include_usage``, the extra usage chunk and the
    ``"usage":null`` fields it causes are removed, so the client sees what it asked for.
    """

    def __init__(self, call: Call):
        super().__init__(call)
        self._strip = call.options.get("usage_injected", False)

    def feed(self, chunk: bytes) -> bytes:
        if not self._strip:
            return super().feed(chunk)
        return b"".join(self._filter(event) for event in self._splitter.feed(chunk))

    def finish(self) -> bytes:
        if not self._strip:
            return super().finish()
        rest = self._splitter.rest()
        return self._filter(rest) if rest.strip() else b""

    def _filter(self, event: bytes) -> bytes:
        if self.on_event(event):
            return b""
        return event.replace(_NULL_USAGE, b"")

    def on_event(self, event: bytes) -> bool:
        """Record usage and generated text; True if this is a usage-only chunk."""
        data = event_data(event)
        if not data or data == b"[DONE]":
            return False
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(chunk, dict):
            return False
        self.generated_chars += _generated_chars(chunk)
        if chunk.get("type") in _RESPONSE_DONE:
            self.usage = usage_from_openai((chunk.get("response") or {}).get("usage")) or self.usage
            return False
        usage = usage_from_openai(chunk.get("usage"))
        if usage is None:
            return False
        self.usage = usage
        return not chunk.get("choices")


class OpenAIProvider(Provider):
    """OpenAI and OpenAI-compatible APIs."""

    wire = "openai"
    # The caller's organization/project headers name *their* OpenAI account, which the
    # operator's key does not belong to: forwarding them would fail every request.
    credential_headers = ("authorization", "openai-organization", "openai-project")
    #: add ``stream_options.include_usage`` to streamed chat requests (``stream_usage: ask``)
    ask_stream_usage = True

    def configure(self, entry: ProviderPricing) -> None:
        self.ask_stream_usage = entry.stream_usage == "ask"

    def is_free(self, method: str, tail: str) -> bool:
        return method == "GET" and (tail == "v1/models" or tail.startswith("v1/models/"))

    def inspect(self, method: str, tail: str, body: bytes, payload: Any) -> Call:
        endpoint = _METERED.get(tail)
        if endpoint is None or method != "POST":
            raise ProxyError(
                404, "unsupported_endpoint",
                f"{method} /{self.name}/{tail} is not available through this gateway; "
                f"metered endpoints are {', '.join('/' + self.name + '/' + p for p in _METERED)}.",
            )
        model = require_model(payload)
        stream = payload.get("stream") is True
        options: dict[str, Any] = {"endpoint": endpoint}
        if endpoint == "embeddings":
            max_out: int | None = 0
        elif endpoint == "responses":
            max_out = optional_int(payload, "max_output_tokens")
        else:
            max_out = optional_int(payload, "max_completion_tokens", "max_tokens")
            if max_out is not None:
                max_out *= optional_int(payload, "n") or 1
            if stream and self.ask_stream_usage and not (payload.get("stream_options") or {}).get("include_usage"):
                payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
                body = orjson.dumps(payload)
                options["usage_injected"] = True
        tier = payload.get("service_tier")
        return Call(
            model=model,
            stream=stream,
            max_output_tokens=max_out,
            body=body,
            prompt_upper_bound=prompt_upper_bound(body),
            service_tier=tier if isinstance(tier, str) else None,
            options=options,
        )

    def usage_from_body(self, call: Call, payload: Any) -> Usage | None:
        return usage_from_openai(payload.get("usage")) if isinstance(payload, dict) else None

    def stream_meter(self, call: Call) -> StreamMeter:
        return OpenAIStreamMeter(call)

    def error_payload(self, status: int, code: str, message: str) -> dict[str, Any]:
        kind = {
            400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
            404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
        }.get(status, "api_error")
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}
