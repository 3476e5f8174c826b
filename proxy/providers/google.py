"""Google Gemini API (``generativelanguage.googleapis.com``) under ``/google/v1beta/...`` and ``/google/v1/...``.

The model comes from the path (``models/{model}:{method}``). ``promptTokenCount`` includes
the tokens read from the context cache (``cachedContentTokenCount``); thinking tokens
(``thoughtsTokenCount``) are billed as output, tool-use prompt tokens as input.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_plus

import orjson
from aiohttp import web
from multidict import CIMultiDict

from ..pricing import Usage
from .base import Call, Provider, ProxyError, StreamMeter, optional_int, prompt_upper_bound
from .jsonarray import JSONArraySplitter
from .sse import event_data

_MODEL_CALL = re.compile(r"^v1(?:beta|alpha)?/models/([^/:]+):([A-Za-z]+)$")
_MODEL_INFO = re.compile(r"^v1(?:beta|alpha)?/models(?:/[^/:]+)?$")
_GENERATE = frozenset({"generateContent", "streamGenerateContent"})
_EMBED = frozenset({"embedContent", "batchEmbedContents"})
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    409: "ABORTED", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
    500: "INTERNAL", 501: "UNIMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}
_SERVICE_TIERS = frozenset({"flex", "priority"})


def usage_from_gemini(meta: Any) -> Usage | None:
    """Billable usage from a ``usageMetadata`` object."""
    if not isinstance(meta, dict):
        return None
    prompt = meta.get("promptTokenCount") or 0
    cached = min(meta.get("cachedContentTokenCount") or 0, prompt)
    thoughts = meta.get("thoughtsTokenCount") or 0
    answer = meta.get("candidatesTokenCount") or meta.get("responseTokenCount") or 0
    return Usage(
        input_tokens=prompt - cached + (meta.get("toolUsePromptTokenCount") or 0),
        cached_input_tokens=cached,
        output_tokens=answer + thoughts,
        reasoning_tokens=thoughts,
    )


def _service_tier(payload: dict[str, Any]) -> str | None:
    raw = payload.get("serviceTier")
    if not isinstance(raw, str):
        return None
    tier = raw.lower().removeprefix("service_tier_")
    return tier if tier in _SERVICE_TIERS else None


def _text_chars(chunk: dict[str, Any]) -> int:
    total = 0
    for candidate in chunk.get("candidates") or ():
        for part in (candidate.get("content") or {}).get("parts") or ():
            text = part.get("text")
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
                    self._splitter = JSONArraySplitter()  # type: ignore[assignment]
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
    credential_headers = ("authorization", "x-goog-api-key")

    def caller_key(self, request: web.Request) -> str | None:
        return request.headers.get("x-goog-api-key") or request.query.get("key") or super().caller_key(request)

    def add_credential(self, headers: CIMultiDict[str]) -> None:
        headers["x-goog-api-key"] = self.api_key

    def upstream_url(self, tail: str, query_string: str) -> str:
        """The caller's ``?key=`` is their proxy key: never forward it."""
        kept = "&".join(p for p in query_string.split("&") if p and unquote_plus(p.partition("=")[0]) != "key")
        return super().upstream_url(tail, kept)

    def is_free(self, method: str, tail: str) -> bool:
        if method == "GET":
            return _MODEL_INFO.match(tail) is not None
        found = _MODEL_CALL.match(tail)
        return method == "POST" and found is not None and found.group(2) == "countTokens"

    def inspect(self, method: str, tail: str, body: bytes, payload: Any) -> Call:
        found = _MODEL_CALL.match(tail)
        if method != "POST" or found is None or found.group(2) not in _GENERATE | _EMBED:
            raise ProxyError(
                404, "unsupported_endpoint",
                f"{method} /{self.name}/{tail} is not available through this gateway; metered endpoints are "
                f"POST /{self.name}/v1beta/models/{{model}}:generateContent, :streamGenerateContent, "
                ":embedContent and :batchEmbedContents (also under /v1).",
            )
        if not isinstance(payload, dict):
            raise ProxyError(400, "invalid_request", "The request body must be a JSON object.")
        model, action = found.groups()
        if action in _EMBED:
            max_out: int | None = 0
        else:
            config = payload.get("generationConfig")
            config = config if isinstance(config, dict) else {}
            # Gemini counts thinking tokens against maxOutputTokens, so it bounds both.
            max_out = optional_int(config, "maxOutputTokens")
            if max_out is not None:
                max_out *= optional_int(config, "candidateCount") or 1
        return Call(
            model=model,
            stream=action == "streamGenerateContent",
            max_output_tokens=max_out,
            body=body,
            prompt_upper_bound=prompt_upper_bound(body),
            service_tier=_service_tier(payload),
            options={"endpoint": action},
        )

    def usage_from_body(self, call: Call, payload: Any) -> Usage | None:
        return usage_from_gemini(payload.get("usageMetadata")) if isinstance(payload, dict) else None

    def stream_meter(self, call: Call) -> StreamMeter:
        return GoogleStreamMeter(call)

    def error_payload(self, status: int, code: str, message: str) -> dict[str, Any]:
        name = _STATUS_NAMES.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION")
        info = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": code.upper(), "domain": "costproxy"}
        return {"error": {"code": status, "message": message, "status": name, "details": [info]}}
