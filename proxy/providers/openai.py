"""OpenAI wire format: chat completions, completions, embeddings and the Responses API.

Also the wire of every OpenAI-compatible provider configured with ``wire: openai``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from ..errors import ProxyError
from ..paths import Endpoint, EndpointTable
from ..pricing import ProviderPricing, ServiceTier, Usage, known_service_tier, priced_service_tier
from .base import Call, Provider, StreamMeter, as_list, as_object, prompt_upper_bound, token_count
from .fields import choice_count, optional_bool, optional_object, optional_str, require_model, require_object, token_limit
from .sse import event_data

#: the OpenAI wire's endpoints, also those of every OpenAI-compatible provider
ENDPOINTS = EndpointTable(
    [
        Endpoint("POST", "v1/chat/completions", "chat"),
        Endpoint("POST", "v1/completions", "completions"),
        Endpoint("POST", "v1/embeddings", "embeddings"),
        Endpoint("POST", "v1/responses", "responses"),
        Endpoint("GET", "v1/models", "models", free=True),
        # fine-tuned model ids hold ":" (ft:gpt-4o-mini:org::id)
        Endpoint("GET", "v1/models/{model}", "model", free=True),
    ]
)
#: Body fields by which an OpenAI-compatible router (OpenRouter) may answer with a model
#: other than ``model`` (``models`` fallbacks, ``route``) or add per-use fees (``plugins``,
#: e.g. web search): the usage it reports would be priced as the wrong model.
UNPRICED_ROUTING = ("models", "route", "plugins")
# Stream events of the Responses API that carry the final usage.
_RESPONSE_DONE = frozenset({"response.completed", "response.incomplete", "response.failed"})
# What OpenAI adds to every chunk once include_usage is on; removed when we added it.
_NULL_USAGE = b',"usage":null'


def usage_from_openai(usage: Any) -> Usage | None:
    """Usage from either OpenAI naming (``prompt_tokens`` or ``input_tokens``), and from
    the OpenAI-compatible dialects that count differently: xAI leaves reasoning out of
    ``completion_tokens`` (but not out of ``total_tokens``), DeepSeek reports cache hits as
    ``prompt_cache_hit_tokens``. Every count goes through :func:`~.base.token_count`, so
    nonsense (negative, fractional, text) never makes a negative or fractional charge."""
    if not isinstance(usage, dict):
        return None

    def first(*names: str) -> int:
        return token_count(next((usage[n] for n in names if usage.get(n) is not None), 0))

    prompt = first("prompt_tokens", "input_tokens")
    output = max(first("completion_tokens", "output_tokens"), token_count(usage.get("total_tokens")) - prompt)
    in_details = as_object(usage.get("prompt_tokens_details") or usage.get("input_tokens_details"))
    out_details = as_object(usage.get("completion_tokens_details") or usage.get("output_tokens_details"))
    cached = min(token_count(in_details.get("cached_tokens")) or token_count(usage.get("prompt_cache_hit_tokens")), prompt)
    return Usage(
        input_tokens=prompt - cached,
        cached_input_tokens=cached,
        output_tokens=output,
        reasoning_tokens=min(token_count(out_details.get("reasoning_tokens")), output),
    )


def _text_length(value: Any) -> int:
    return len(value) if isinstance(value, str) else 0


def _generated_chars(chunk: dict[str, Any]) -> int:
    delta = chunk.get("delta")
    if isinstance(delta, str):  # Responses API text/argument deltas
        return len(delta)
    total = 0
    for choice in as_list(chunk.get("choices")):
        choice = as_object(choice)
        d = as_object(choice.get("delta"))
        total += _text_length(d.get("content")) + _text_length(d.get("reasoning_content")) + _text_length(choice.get("text"))
        for call in as_list(d.get("tool_calls")):
            total += _text_length(as_object(as_object(call).get("function")).get("arguments"))
    return total


def _served(usage: Usage | None, answer: dict[str, Any]) -> Usage | None:
    """``usage`` with the service tier the answer (a response, chunk or Responses object)
    says it was served at: what the provider bills, whatever the request asked for."""
    if usage is not None:
        usage.service_tier = known_service_tier(answer.get("service_tier"))
    return usage


class OpenAIStreamMeter(StreamMeter):
    """Usage from chat/completions chunks or Responses API events.

    When the proxy itself turned on ``include_usage``, the extra usage chunk and the
    ``"usage":null`` fields it causes are removed, so the client sees what it asked for.
    """

    def __init__(self, call: Call):
        super().__init__(call)
        self._strip = call.usage_injected

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
        if self._read(event):
            return b""
        return event.replace(_NULL_USAGE, b"")

    def on_event(self, event: bytes) -> None:
        self._read(event)

    def _read(self, event: bytes) -> bool:
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
        kind = chunk.get("type")
        if isinstance(kind, str) and kind in _RESPONSE_DONE:
            response = as_object(chunk.get("response"))
            self.usage = _served(usage_from_openai(response.get("usage")), response) or self.usage
            return False
        usage = _served(usage_from_openai(chunk.get("usage")), chunk)
        if usage is None:
            return False
        self.usage = usage
        return not chunk.get("choices")


class OpenAIProvider(Provider):
    """OpenAI and OpenAI-compatible APIs."""

    wire = "openai"
    endpoints = ENDPOINTS
    # The caller's organization/project headers name *their* OpenAI account, which the
    # operator's key does not belong to: forwarding them would fail every request.
    credential_headers: ClassVar[tuple[str, ...]] = ("authorization", "openai-organization", "openai-project")
    #: add ``stream_options.include_usage`` to streamed chat requests (``stream_usage: ask``)
    ask_stream_usage = True

    #: the tier a request naming none (or ``auto``) is served at (``default_service_tier``)
    default_service_tier: ServiceTier | None = None

    def configure(self, entry: ProviderPricing) -> None:
        self.ask_stream_usage = entry.stream_usage == "ask"
        self.default_service_tier = entry.default_service_tier if entry.default_service_tier.priced_apart else None

    def inspect(self, method: str, tail: str, body: bytes, payload: Any) -> Call:
        return self.describe(self.metered(method, tail).endpoint.name, body, payload)

    def _service_tier(self, requested: str | None) -> ServiceTier | None:
        """The priced tier a request asks for (None: the standard prices): ``flex`` or
        ``priority`` as named; none or ``auto`` is the project's default tier; anything
        else (``default``, unknown names) standard. Only known names are ever recorded."""
        if requested is None or requested == "auto":
            return self.default_service_tier
        return priced_service_tier(requested)

    def _chat_limit_field(self, payload: dict[str, Any]) -> str:
        """The chat field that sets the output limit, for advice on it: the one the body
        gives (the larger if both: the hold reads that one), else OpenAI's own
        ``max_completion_tokens`` or, on a compatible provider, the ``max_tokens`` they take."""
        given = {name: payload[name] for name in ("max_completion_tokens", "max_tokens") if isinstance(payload.get(name), int)}
        if given:
            return max(given, key=lambda name: given[name])
        return "max_completion_tokens" if self.name == "openai" or self.wire == "azure" else "max_tokens"

    def describe(self, endpoint: str, body: bytes, payload: Any, model: str | None = None) -> Call:
        """The call a request body makes on ``endpoint`` (``chat``, ``completions``,
        ``embeddings``, ``responses``); ``model`` if the path names it (Azure deployments).

        Read and checked (:mod:`.fields`): ``model``, ``stream``, ``service_tier``; for
        chat and completions ``max_completion_tokens`` / ``max_tokens`` (the larger),
        ``n`` (and ``best_of`` for completions: every candidate is billed), and
        ``stream_options`` with its ``include_usage``; for Responses ``max_output_tokens`` and
        ``background`` (refused: its output is generated after the request ends).
        """
        payload = require_object(payload)
        model = model or require_model(payload)
        if unpriced := [name for name in UNPRICED_ROUTING if name in payload]:
            raise ProxyError(
                400,
                "unsupported_option",
                f"{', '.join(unpriced)}: fallback models, routes and plugins let another model than "
                f"{model!r} answer or add fees per use, which this gateway cannot price; leave them out.",
            )
        stream = optional_bool(payload, "stream")
        requested = optional_str(payload, "service_tier")
        # embeddings have one tier: a priority project default does not apply to them
        tier = None if endpoint == "embeddings" else self._service_tier(requested)
        choices, injected, limit_field = 1, False, "max_tokens"
        if endpoint == "embeddings":
            max_out: int | None = 0
        elif endpoint == "responses":
            max_out, limit_field = token_limit(payload, "max_output_tokens"), "max_output_tokens"
            if optional_bool(payload, "background"):
                # answered "queued" with no usage; the output, billed later, never passes here
                raise ProxyError(
                    400,
                    "unsupported_option",
                    "Background responses (background: true) are generated after the request ends and "
                    "cannot be metered by this gateway; leave the option out.",
                )
        else:
            max_out = token_limit(payload, "max_completion_tokens", "max_tokens")
            if endpoint == "completions":
                choices = choice_count(payload, "n", "best_of")
            else:
                choices, limit_field = choice_count(payload, "n"), self._chat_limit_field(payload)
            options = optional_object(payload, "stream_options")
            asked = optional_bool(options, "include_usage", "stream_options.")
            if stream and self.ask_stream_usage and not asked:
                body = orjson.dumps({**payload, "stream_options": {**options, "include_usage": True}})
                injected = True
        return Call(
            model=model,
            endpoint=endpoint,
            stream=stream,
            max_output_tokens=max_out,
            body=body,
            prompt_upper_bound=prompt_upper_bound(body),
            service_tier=tier,
            usage_injected=injected,
            choices=choices,
            limit_field=limit_field,
        )

    def usage_from_body(self, call: Call, payload: Any) -> Usage | None:
        return _served(usage_from_openai(payload.get("usage")), payload) if isinstance(payload, dict) else None

    def stream_meter(self, call: Call) -> StreamMeter:
        return OpenAIStreamMeter(call)

    def error_payload(self, error: ProxyError) -> dict[str, Any]:
        # OpenAI's own out-of-quota type: frameworks (pydantic-ai, ...) read it as "credits
        # used up", not as a bad key (403) or a rate limit to wait out (429).
        kind = (
            "insufficient_quota"
            if error.quota_spent
            else {
                400: "invalid_request_error",
                401: "invalid_request_error",
                403: "permission_error",
                404: "invalid_request_error",
                413: "invalid_request_error",
                429: "rate_limit_error",
            }.get(error.status, "api_error")
        )
        return {"error": {"message": error.message, "type": kind, "param": None, "code": error.code}}
