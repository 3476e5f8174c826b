"""Google Gemini API (``generativelanguage.googleapis.com``) under ``/google/v1beta/...`` and ``/google/v1/...``.

The model comes from the path (``models/{model}:{method}``). ``promptTokenCount`` includes
the tokens read from the context cache (``cachedContentTokenCount``); thinking tokens
(``thoughtsTokenCount``) are billed as output, tool-use prompt tokens as input.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_plus

import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ..errors import ProxyError
from ..paths import Endpoint, EndpointTable
from ..pricing import ServiceTier, Usage, priced_service_tier
from .base import Call, Provider, StreamMeter, as_list, as_object, prompt_upper_bound, token_count
from .fields import choice_count, optional_object, optional_str, require_object, token_limit
from .jsonarray import JSONArraySplitter
from .sse import event_data

# {version} is v1beta, v1 or v1alpha; a model id holds no ":" (it ends the model's part)
_PARAMS = {"version": "v1beta|v1|v1alpha", "model": "[^:]+"}
ENDPOINTS = EndpointTable(
    [
        *(
            Endpoint("POST", f"{{version}}/models/{{model}}:{action}", action, patterns=_PARAMS)
            for action in ("generateContent", "streamGenerateContent", "embedContent", "batchEmbedContents")
        ),
        Endpoint("POST", "{version}/models/{model}:countTokens", "countTokens", free=True, patterns=_PARAMS),
        Endpoint("GET", "{version}/models", "models", free=True, patterns=_PARAMS),
        Endpoint("GET", "{version}/models/{model}", "model", free=True, patterns=_PARAMS),
    ],
    note="{version} is v1beta, v1 or v1alpha.",
)
_EMBED = frozenset({"embedContent", "batchEmbedContents"})
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def usage_from_gemini(meta: Any) -> Usage | None:
    """Billable usage from a ``usageMetadata`` object; every count through
    :func:`~.base.token_count` (never negative nor fractional)."""
    if not isinstance(meta, dict):
        return None
    prompt = token_count(meta.get("promptTokenCount"))
    cached = min(token_count(meta.get("cachedContentTokenCount")), prompt)
    thoughts = token_count(meta.get("thoughtsTokenCount"))
    answer = token_count(meta.get("candidatesTokenCount")) or token_count(meta.get("responseTokenCount"))
    return Usage(
        input_tokens=prompt - cached + token_count(meta.get("toolUsePromptTokenCount")),
        cached_input_tokens=cached,
        output_tokens=answer + thoughts,
        reasoning_tokens=thoughts,
    )


def _either(section: dict[str, Any], camel: str, snake: str) -> list[str]:
    """The names of a field the section gives: Gemini's JSON takes both ``camelCase`` and
    the proto's ``snake_case`` spelling, so the proxy reads both (a request may not
    escape the hold by spelling a field the other way)."""
    return [name for name in (camel, snake) if section.get(name) is not None]


def _service_tier(payload: dict[str, Any]) -> ServiceTier | None:
    """The priced service tier (``flex``, ``priority``) asked for, if any; a 400 if the
    field is not a string or its two spellings disagree."""
    given = {optional_str(payload, name) for name in _either(payload, "serviceTier", "service_tier")}
    tiers = {raw.lower().removeprefix("service_tier_") for raw in given if raw is not None}
    if len(tiers) > 1:
        raise ProxyError(400, "invalid_field", "serviceTier and service_tier disagree; give one of them.")
    return priced_service_tier(tiers.pop()) if tiers else None


def _generation_limits(payload: dict[str, Any]) -> tuple[int | None, int]:
    """(maxOutputTokens, candidateCount) of ``generationConfig``: the largest given under
    either spelling, each checked (:mod:`.fields`)."""
    limits: list[int] = []
    counts: list[int] = [1]
    for section in _either(payload, "generationConfig", "generation_config"):
        config = optional_object(payload, section)
        limit = token_limit(config, "maxOutputTokens", "max_output_tokens", within=f"{section}.")
        if limit is not None:
            limits.append(limit)
        counts.append(choice_count(config, "candidateCount", "candidate_count", within=f"{section}."))
    return (max(limits) if limits else None), max(counts)


def _text_chars(chunk: dict[str, Any]) -> int:
    total = 0
    for candidate in as_list(chunk.get("candidates")):
        for part in as_list(as_object(as_object(candidate).get("content")).get("parts")):
            text = as_object(part).get("text")
            if isinstance(text, str):
                total += len(text)
    return total


class GoogleStreamMeter(StreamMeter):
    """Usage from ``streamGenerateContent``, as SSE (``alt=sse``) or as a streamed JSON array.

    The format is told from the first byte of the body; every chunk repeats the usage so
    far, so the last one seen counts.
    """

    def __init__(self, call: Call):
        super().__init__(call)
        self._sniffed = False

    def feed(self, chunk: bytes) -> bytes:
        if not self._sniffed:
            first = chunk.lstrip()[:1]
            if first:
                self._sniffed = True
                if first == b"[":
                    self._splitter = JSONArraySplitter()
        return super().feed(chunk)

    def on_event(self, event: bytes) -> None:
        data = event if event[:1] == b"{" else event_data(event)
        try:
            chunk = orjson.loads(data) if data else None
        except orjson.JSONDecodeError:
            return
        if not isinstance(chunk, dict):
            return
        self.generated_chars += _text_chars(chunk)
        self.usage = usage_from_gemini(chunk.get("usageMetadata")) or self.usage


class GoogleProvider(Provider):
    """The Gemini Developer API, reached with ``google-genai``'s ``http_options.base_url``."""

    wire = "google"
    endpoints = ENDPOINTS
    credential_headers = ("authorization", "x-goog-api-key")

    def caller_key(self, request: web.Request) -> str | None:
        return request.headers.get("x-goog-api-key") or request.query.get("key") or super().caller_key(request)

    def add_credential(self, headers: CIMultiDict[str]) -> None:
        headers["x-goog-api-key"] = self.api_key

    def upstream_url(self, tail: str, query_string: str) -> URL:
        """The caller's ``?key=`` is their proxy key: never forward it."""
        kept = "&".join(p for p in query_string.split("&") if p and unquote_plus(p.partition("=")[0]) != "key")
        return super().upstream_url(tail, kept)

    def inspect(self, method: str, tail: str, body: bytes, payload: Any) -> Call:
        """``models/{model}:generateContent`` (also ``streamGenerateContent``,
        ``embedContent``, ``batchEmbedContents``). Read and checked (:mod:`.fields`):
        ``generationConfig`` with ``maxOutputTokens`` and ``candidateCount``, and
        ``serviceTier``, each under its ``snake_case`` spelling too."""
        found = self.metered(method, tail)
        payload = require_object(payload)
        action = found.endpoint.name
        max_out: int | None = 0
        choices = 1
        if action not in _EMBED:
            # Gemini counts thinking tokens against maxOutputTokens, so it bounds both.
            max_out, choices = _generation_limits(payload)
        return Call(
            model=found.params["model"],
            endpoint=action,
            stream=action == "streamGenerateContent",
            max_output_tokens=max_out,
            body=body,
            prompt_upper_bound=prompt_upper_bound(body),
            service_tier=_service_tier(payload),
            choices=choices,
            limit_field="generationConfig.maxOutputTokens",
        )

    def usage_from_body(self, call: Call, payload: Any) -> Usage | None:
        return usage_from_gemini(payload.get("usageMetadata")) if isinstance(payload, dict) else None

    def stream_meter(self, call: Call) -> StreamMeter:
        return GoogleStreamMeter(call)

    def error_payload(self, error: ProxyError) -> dict[str, Any]:
        status = error.status
        name = _STATUS_NAMES.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION")
        info = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": error.code.upper(), "domain": "costproxy"}
        return {"error": {"code": status, "message": error.message, "status": name, "details": [info]}}
