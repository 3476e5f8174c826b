"""Property tests (hypothesis) of everything a provider module reads from outside.

Requests: random methods and paths into ``route`` and random JSON bodies (and valid
bodies with a wrong value in each field the provider reads) into ``inspect``, for every
provider: either a :class:`Route` / :class:`Call` or a 4xx :class:`ProxyError`, never
another exception; a Call's counts are bounded integers.

Answers: the usage parsers and stream meters of every wire fed random usage objects,
random bytes and valid streams cut at random places: they never raise, and usage is
made of integers ≥ 0 that price to an integer ≥ 0.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.errors import ProxyError
from proxy.pricing import PicoPrices, PricedModel, Usage
from proxy.providers.anthropic import AnthropicProvider, AnthropicStreamMeter, usage_from_anthropic
from proxy.providers.azure import AzureOpenAIProvider
from proxy.providers.base import MAX_REPORTED_TOKENS, Call, Provider, Route, StreamMeter, token_count
from proxy.providers.bedrock import BedrockProvider
from proxy.providers.bedrock_usage import EventStreamMeter, usage_from_converse, usage_from_headers, usage_from_invoke
from proxy.providers.fields import MAX_CHOICES, MAX_TOKEN_LIMIT
from proxy.providers.google import GoogleProvider, GoogleStreamMeter, usage_from_gemini
from proxy.providers.openai import OpenAIProvider, OpenAIStreamMeter, usage_from_openai

from .support.mock_bedrock import encode_message

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

_mistral = OpenAIProvider("mistral", "https://api.mistral.ai", "k")
_mistral.ask_stream_usage = False  # stream_usage: always
PROVIDERS: list[Provider] = [
    OpenAIProvider("openai", "https://api.openai.com", "k"),
    OpenAIProvider("groq", "https://api.groq.com/openai", "k"),
    _mistral,
    AnthropicProvider("anthropic", "https://api.anthropic.com", "k"),
    GoogleProvider("google", "https://generativelanguage.googleapis.com", "k"),
    AzureOpenAIProvider("azure", "https://res.openai.azure.com", "k"),
    BedrockProvider("bedrock", "https://bedrock-runtime.us-east-1.amazonaws.com", "k"),
]
ARN = "arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fus.meta.llama3-3-70b-instruct-v1%3A0"
#: provider name -> metered tails, and for each the fields its inspect reads (paths into the body)
METERED: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "openai": [
        ("v1/chat/completions", {"model": "gpt-4o-mini", "messages": [], "max_tokens": 5, "n": 2, "stream": True}),
        ("v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "x", "best_of": 2, "n": 1}),
        ("v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}),
        ("v1/responses", {"model": "gpt-4o-mini", "input": "x", "max_output_tokens": 9, "stream": True}),
    ],
    "anthropic": [("v1/messages", {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [], "stream": True})],
    "google": [
        ("v1beta/models/gemini-2.5-flash:generateContent", {"contents": [], "generationConfig": {"maxOutputTokens": 5}}),
        ("v1/models/gemini-2.5-flash:streamGenerateContent", {"contents": [], "generation_config": {"candidate_count": 2}}),
        ("v1beta/models/gemini-2.5-flash:embedContent", {"content": {"parts": []}}),
        ("v1alpha/models/gemini-2.5-flash:batchEmbedContents", {"requests": []}),
    ],
    "azure": [
        ("openai/deployments/prod-mini/chat/completions", {"messages": [], "stream": True, "max_tokens": 3}),
        ("openai/v1/responses", {"model": "gpt-4o-mini", "input": "x"}),
        ("openai/deployments/emb/embeddings", {"input": "x"}),
    ],
    "bedrock": [
        ("model/us.anthropic.claude-sonnet-4-6/converse", {"messages": [], "inferenceConfig": {"maxTokens": 5}}),
        (f"model/{ARN}/converse-stream", {"messages": [], "serviceTier": {"type": "flex"}, "performanceConfig": {}}),
        ("model/m/invoke", {"max_tokens": 5, "messages": [], "n": 1}),
        ("model/m/invoke-with-response-stream", {"prompt": "x", "textGenerationConfig": {"maxTokenCount": 5}}),
    ],
}
for _name in ("groq", "mistral"):
    METERED[_name] = METERED["openai"]
#: every field some provider reads, by path; a mutation puts a random value at one of them
READ_FIELDS: list[tuple[str, ...]] = [
    ("model",),
    ("stream",),
    ("stream_options",),
    ("stream_options", "include_usage"),
    ("service_tier",),
    ("max_tokens",),
    ("max_completion_tokens",),
    ("max_output_tokens",),
    ("n",),
    ("best_of",),
    ("speed",),
    ("inference_geo",),
    ("generationConfig",),
    ("generationConfig", "maxOutputTokens"),
    ("generationConfig", "candidateCount"),
    ("generation_config",),
    ("generation_config", "max_output_tokens"),
    ("generation_config", "candidate_count"),
    ("serviceTier",),
    ("serviceTier", "type"),
    ("service_tier",),
    ("performanceConfig",),
    ("performanceConfig", "latency"),
    ("inferenceConfig",),
    ("inferenceConfig", "maxTokens"),
    ("inferenceConfig", "max_new_tokens"),
    ("textGenerationConfig",),
    ("textGenerationConfig", "maxTokenCount"),
    ("max_gen_len",),
    ("max_new_tokens",),
    ("num_generations",),
]

# JSON values: what orjson can write and read back (64-bit integers, finite floats, UTF-8 text)
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False) | _text
json_values = st.recursive(
    _scalars
    | st.sampled_from([0, 1, -1, 128, 129, 2**31 - 1, 2**31, 9 * 10**18, 1.0, 0.5, "1", "", "true", "fast", "global", "flex"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=12,
)
METHODS = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
# path characters that matter: separators, escapes, dots, backslashes, controls, plus plain ones
_PATH_ALPHABET = [
    *"/%.\\:;@=+~-_aAzZ09vV1mM",
    "%2F",
    "%2f",
    "%2e",
    "%2E",
    "%5C",
    "%25",
    "%00",
    "%0A",
    "%C0%AF",
    "\x00",
    "\t",
]
random_paths = st.lists(st.sampled_from(_PATH_ALPHABET), max_size=30).map("".join)


def _known_tails() -> list[str]:
    tails = [tail for cases in METERED.values() for tail, _ in cases]
    return [*tails, "v1/models", "v1/models/gpt-4o-mini", "v1/messages/count_tokens", "v1beta/models", "openai/deployments"]


@st.composite
def mutated_paths(draw: st.DrawFn) -> str:
    """A known tail with random characters inserted, replaced or removed."""
    tail = draw(st.sampled_from(_known_tails()))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(tail)))
        piece = draw(st.sampled_from(_PATH_ALPHABET))
        action = draw(st.sampled_from(["insert", "replace", "cut"]))
        if action == "insert":
            tail = tail[:at] + piece + tail[at:]
        elif action == "replace":
            tail = tail[:at] + piece + tail[at + 1 :]
        else:
            tail = tail[:at] + tail[at + 1 :]
    return tail


def check_call(call: Call) -> None:
    """A Call holds only bounded integers where the hold reads counts."""
    assert isinstance(call, Call)
    assert isinstance(call.model, str) and call.model
    assert type(call.stream) is bool and type(call.usage_injected) is bool
    assert call.max_output_tokens is None or type(call.max_output_tokens) is int
    assert call.max_output_tokens is None or 0 <= call.max_output_tokens <= MAX_TOKEN_LIMIT
    assert type(call.choices) is int and 1 <= call.choices <= MAX_CHOICES
    assert type(call.prompt_upper_bound) is int and call.prompt_upper_bound == len(call.body) + 64
    assert call.service_tier is None or isinstance(call.service_tier, str)
    orjson.loads(call.body)  # still JSON


def route_and_inspect(provider: Provider, method: str, tail: str, payload: Any) -> Route | Call | None:
    """What the handler does with a request: route, then inspect a metered one. A refusal
    must be a 4xx ProxyError; anything else raised fails the test."""
    body = orjson.dumps(payload)
    try:
        route = provider.route(method, tail)
        if route.free:
            assert isinstance(route.tail, str)
            return route
        call = provider.inspect(method, route.tail, body, orjson.loads(body))
    except ProxyError as error:
        assert 400 <= error.status < 500, (error.status, error.message)
        assert error.code and error.message
        provider.error_response(error)  # renders in the provider's shape
        return None
    check_call(call)
    return call


@FUZZ
@given(provider=st.sampled_from(PROVIDERS), method=METHODS, tail=random_paths | mutated_paths(), payload=json_values)
def test_random_requests_are_routed_or_refused_with_a_4xx(provider, method, tail, payload):
    route_and_inspect(provider, method, tail, payload)


@FUZZ
@given(provider=st.sampled_from(PROVIDERS), data=st.data())
def test_random_bodies_on_metered_endpoints(provider, data):
    tail, _ = data.draw(st.sampled_from(METERED[provider.name]))
    route_and_inspect(provider, "POST", tail, data.draw(json_values))


def _mutate(payload: dict[str, Any], where: tuple[str, ...], value: Any, delete: bool = False) -> None:
    node = payload
    for name in where[:-1]:
        node = node.setdefault(name, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict):
        if delete:
            node.pop(where[-1], None)
        else:
            node[where[-1]] = value


@FUZZ
@given(data=st.data())
@pytest.mark.parametrize("provider", PROVIDERS, ids=[p.name for p in PROVIDERS])
def test_valid_bodies_with_random_values_in_the_fields_the_provider_reads(provider, data):
    tail, body = data.draw(st.sampled_from(METERED[provider.name]))
    payload = orjson.loads(orjson.dumps(body))
    assert isinstance(route_and_inspect(provider, "POST", tail, payload), Call)  # valid as given
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate(payload, data.draw(st.sampled_from(READ_FIELDS)), data.draw(json_values), delete=data.draw(st.booleans()))
    route_and_inspect(provider, "POST", tail, payload)


#: one value of every JSON type, and the numbers at the edges of the bounds
EVERY_KIND: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    128,
    129,
    2**31,
    2**64 - 1,
    1.0,
    0.5,
    -1e300,
    "",
    "x",
    "1",
    [],
    [1],
    {},
    {"a": 1},
]


@pytest.mark.parametrize("provider", PROVIDERS, ids=[p.name for p in PROVIDERS])
def test_every_field_read_with_every_kind_of_value(provider):
    """Exhaustive where the fuzzer samples: each metered body, each field any provider
    reads, each kind of JSON value there."""
    for tail, body in METERED[provider.name]:
        for where in READ_FIELDS:
            for value in EVERY_KIND:
                payload = orjson.loads(orjson.dumps(body))
                _mutate(payload, where, value)
                route_and_inspect(provider, "POST", tail, payload)


# answers ---------------------------------------------------------------------------------
MODEL = PricedModel(
    provider="p",
    name="m",
    max_output_tokens=1000,
    base=PicoPrices(input=3_000_000, output=15_000_000, cached_input=300_000, cache_write=3_750_000, cache_write_1h=6_000_000),
    long_context=(200_000, PicoPrices(6_000_000, 22_500_000, 600_000, 7_500_000, 12_000_000)),
    service_tiers={"flex": PicoPrices(1_500_000, 7_500_000, 150_000, 1_875_000, 3_000_000)},
)
_USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
)


def check_usage(usage: Usage | None) -> None:
    if usage is None:
        return
    assert isinstance(usage, Usage)
    for field in _USAGE_FIELDS:
        value = getattr(usage, field)
        assert type(value) is int and 0 <= value <= 3 * MAX_REPORTED_TOKENS, (field, value)
    for tier in (None, "flex"):
        cost = MODEL.cost_micro(usage, tier)
        assert type(cost) is int and cost >= 0


# token counts as an upstream might (mis)report them: any Python value a JSON parser or a
# header can give, plus huge and non-finite numbers
counts = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.sampled_from([-1, -(2**80), 2**80, 1e300, -1e300, float("inf"), float("nan"), "12", "-3", "1e3", " 7 ", "x", "9" * 40])
    | _text
    | st.lists(st.integers(), max_size=2)
    | st.dictionaries(_text, st.integers(), max_size=2)
)
_USAGE_KEYS = [
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "input_tokens",
    "output_tokens",
    "prompt_cache_hit_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "promptTokenCount",
    "candidatesTokenCount",
    "responseTokenCount",
    "cachedContentTokenCount",
    "thoughtsTokenCount",
    "toolUsePromptTokenCount",
    "inputTokens",
    "outputTokens",
    "cacheReadInputTokens",
    "cacheWriteInputTokens",
    "cacheReadInputTokenCount",
    "cacheWriteInputTokenCount",
    "inputTokenCount",
    "outputTokenCount",
    "prompt_token_count",
    "generation_token_count",
]
_DETAIL_KEYS = ["cached_tokens", "reasoning_tokens", "thinking_tokens", "ephemeral_1h_input_tokens", "inputTokens", "ttl"]
_DETAIL_PARENTS = [
    "prompt_tokens_details",
    "input_tokens_details",
    "completion_tokens_details",
    "output_tokens_details",
    "cache_creation",
]


def usage_objects_of(count: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Usage objects of every wire's naming with values drawn from ``count``, nested details and cacheDetails."""
    details = st.dictionaries(st.sampled_from(_DETAIL_KEYS), count | st.just("1h"), max_size=4) | count
    flat = st.dictionaries(st.sampled_from([*_USAGE_KEYS, *_DETAIL_PARENTS]), count | details, max_size=8)
    return flat | st.builds(lambda d, items: {**d, "cacheDetails": items}, flat, st.lists(details, max_size=3))


usage_objects = usage_objects_of(counts)
#: the same, with only what JSON can carry (what a stream's bytes can hold)
json_counts = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([-1, 2**64 - 1, 1e300, -1e300, 0.5, "12", "-3", "x"])
    | _text
)
json_usage_objects = usage_objects_of(json_counts)


@FUZZ
@given(usage=usage_objects | json_values)
@example(usage={"prompt_tokens": -5, "completion_tokens": 2.5, "total_tokens": "x"})
@example(usage={"input_tokens": 1e300, "output_tokens": -(2**80), "cache_creation_input_tokens": -1})
@example(usage={"promptTokenCount": float("nan"), "cachedContentTokenCount": 10, "toolUsePromptTokenCount": -7})
@example(usage={"inputTokens": "-3", "outputTokens": [1], "cacheDetails": [{"ttl": "1h", "inputTokens": -9}, "x"]})
def test_usage_parsers_never_raise_and_count_non_negative_integers(usage):
    for parse in (usage_from_openai, usage_from_anthropic, usage_from_gemini, usage_from_converse, usage_from_invoke):
        check_usage(parse(usage))
    check_usage(usage_from_invoke({"usage": usage}))
    check_usage(usage_from_invoke({"amazon-bedrock-invocationMetrics": usage, **(usage if isinstance(usage, dict) else {})}))
    headers = {f"x-amzn-bedrock-{k}-token-count": str(v) for k, v in zip(("input", "output"), (usage, usage), strict=True)}
    check_usage(usage_from_headers(headers))


@FUZZ
@given(value=counts)
def test_token_count_is_a_bounded_non_negative_integer(value):
    count = token_count(value)
    assert type(count) is int and 0 <= count <= MAX_REPORTED_TOKENS


def _call(endpoint: str = "chat", injected: bool = False) -> Call:
    return Call(
        model="m",
        endpoint=endpoint,
        stream=True,
        max_output_tokens=None,
        body=b"{}",
        prompt_upper_bound=66,
        usage_injected=injected,
    )


def _meters() -> list[StreamMeter]:
    return [
        OpenAIStreamMeter(_call()),
        OpenAIStreamMeter(_call(injected=True)),
        OpenAIStreamMeter(_call("responses")),
        AnthropicStreamMeter(_call("messages")),
        GoogleStreamMeter(_call("streamGenerateContent")),
        EventStreamMeter(_call("converse-stream")),
    ]


def run_meter(meter: StreamMeter, chunks: list[bytes]) -> bytes:
    out = b"".join(meter.feed(chunk) for chunk in chunks) + meter.finish()
    check_usage(meter.usage)
    estimate = meter.estimate()
    check_usage(estimate)
    assert type(meter.generated_chars) is int and meter.generated_chars >= 0
    return out


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` in pieces cut at ``points``."""
    edges = sorted({p % (len(data) + 1) for p in points})
    pieces, start = [], 0
    for edge in [*edges, len(data)]:
        pieces.append(data[start:edge])
        start = edge
    return pieces


@FUZZ
@given(data=st.binary(max_size=400), points=st.lists(st.integers(0, 400), max_size=6))
@example(data=b'data: {"usage": {"prompt_tokens": -4}}\n\n', points=[])
@example(data=b'[{"usageMetadata": {"promptTokenCount": "x"}},', points=[3])
@example(data=b"\x00\x00\x00\x10\x00\x00\x00\x00" + b"\x00" * 8, points=[])
def test_stream_meters_take_random_bytes(data, points):
    for meter in _meters():
        out = run_meter(meter, cut(data, points))
        if not getattr(meter, "_strip", False):
            assert out == data  # relayed byte for byte


def _sse(events: list[Any], event_names: list[str] | None = None) -> bytes:
    parts = []
    for i, event in enumerate(events):
        head = f"event: {event_names[i]}\n".encode() if event_names else b""
        parts.append(head + b"data: " + orjson.dumps(event) + b"\n\n")
    return b"".join(parts)


@st.composite
def valid_streams(draw: st.DrawFn) -> tuple[str, bytes]:
    """A well-formed stream of one wire with random texts and random usage objects."""
    kind = draw(st.sampled_from(["chat", "responses", "anthropic", "gemini-sse", "gemini-array", "converse", "invoke"]))
    words = draw(st.lists(_text, max_size=4))
    usage = draw(json_usage_objects)
    if kind == "chat":
        events = [{"choices": [{"index": 0, "delta": {"content": w}}], "usage": None} for w in words]
        return kind, _sse([*events, {"choices": [], "usage": usage}]) + b"data: [DONE]\n\n"
    if kind == "responses":
        events = [{"type": "response.output_text.delta", "delta": w} for w in words]
        done = {"type": draw(st.sampled_from(["response.completed", "response.incomplete"])), "response": {"usage": usage}}
        return kind, _sse([*events, done], [e["type"] for e in [*events, done]])
    if kind == "anthropic":
        events: list[Any] = [{"type": "message_start", "message": {"usage": usage}}]
        events += [{"type": "content_block_delta", "delta": {"type": "text_delta", "text": w}} for w in words]
        events.append({"type": "message_delta", "usage": draw(json_usage_objects)})
        return kind, _sse(events, [e["type"] for e in events])
    if kind.startswith("gemini"):
        chunks = [{"candidates": [{"content": {"parts": [{"text": w}]}}], "usageMetadata": usage} for w in words or [""]]
        if kind == "gemini-sse":
            return kind, _sse(chunks)
        return kind, b"[" + b",\r\n".join(orjson.dumps(c) for c in chunks) + b"]"
    if kind == "converse":
        messages = [
            encode_message({":message-type": "event", ":event-type": "contentBlockDelta"}, orjson.dumps({"delta": {"text": w}}))
            for w in words
        ]
        messages.append(encode_message({":message-type": "event", ":event-type": "metadata"}, orjson.dumps({"usage": usage})))
        return kind, b"".join(messages)
    natives = [{"type": "content_block_delta", "delta": {"text": w}} for w in words]
    natives.append({"amazon-bedrock-invocationMetrics": usage, "type": "message_delta", "usage": draw(json_usage_objects)})
    encoded = [orjson.dumps({"bytes": base64.b64encode(orjson.dumps(n)).decode()}) for n in natives]
    return kind, b"".join(encode_message({":message-type": "event", ":event-type": "chunk"}, e) for e in encoded)


_METER_OF = {
    "chat": lambda: OpenAIStreamMeter(_call(injected=True)),
    "responses": lambda: OpenAIStreamMeter(_call("responses")),
    "anthropic": lambda: AnthropicStreamMeter(_call("messages")),
    "gemini-sse": lambda: GoogleStreamMeter(_call("streamGenerateContent")),
    "gemini-array": lambda: GoogleStreamMeter(_call("streamGenerateContent")),
    "converse": lambda: EventStreamMeter(_call("converse-stream")),
    "invoke": lambda: EventStreamMeter(_call("invoke-with-response-stream")),
}


@FUZZ
@given(stream=valid_streams(), points=st.lists(st.integers(0, 2000), max_size=8))
def test_valid_streams_cut_anywhere_give_the_same_sane_usage(stream, points):
    kind, data = stream
    whole = _METER_OF[kind]()
    run_meter(whole, [data])
    pieces = _METER_OF[kind]()
    out = run_meter(pieces, cut(data, points))
    assert pieces.usage == whole.usage and pieces.generated_chars == whole.generated_chars
    if kind != "chat":
        assert out == data


#: keys the stream meters read, and the event types they look for: random events built
#: from them have the shape of real ones with wrong types anywhere
_EVENT_KEYS = [
    "choices", "delta", "content", "reasoning_content", "text", "tool_calls", "function", "arguments", "usage",
    "response", "type", "message", "candidates", "parts", "usageMetadata", "bytes", "amazon-bedrock-invocationMetrics",
    "thinking", "partial_json", "generation", "outputText", "toolUse", "input", "reasoningContent", *_USAGE_KEYS[:6],
]  # fmt: skip
_EVENT_TYPES = [
    "response.completed", "response.incomplete", "response.output_text.delta", "message_start", "message_delta",
    "content_block_delta", "[DONE]",
]  # fmt: skip
shaped = st.recursive(
    json_counts | st.sampled_from(_EVENT_TYPES),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(_EVENT_KEYS), children, max_size=4),
    max_leaves=8,
)


_USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 1}}
_CLAUDE_USAGE = {"input_tokens": 5, "output_tokens": 2, "cache_creation": {"ephemeral_1h_input_tokens": 1}}
_CONVERSE_USAGE = {"inputTokens": 5, "outputTokens": 2, "cacheDetails": [{"ttl": "1h", "inputTokens": 1}]}
#: meter kind -> real events (for Bedrock: (event type, payload); "chunk" payloads are wrapped in base64)
SKELETONS: dict[str, list[Any]] = {
    "chat": [
        {"choices": [{"delta": {"content": "a", "reasoning_content": "b", "tool_calls": [{"function": {"arguments": "x"}}]}}]},
        {"choices": [{"text": "t"}], "usage": None},
        {"choices": [], "usage": {**_USAGE, "completion_tokens_details": {"reasoning_tokens": 1}}},
    ],
    "responses": [
        {"type": "response.output_text.delta", "delta": "x"},
        {"type": "response.completed", "response": {"usage": {"input_tokens": 3, "input_tokens_details": {"cached_tokens": 1}}}},
    ],
    "anthropic": [
        {"type": "message_start", "message": {"usage": _CLAUDE_USAGE}},
        {"type": "content_block_delta", "delta": {"text": "x", "thinking": "y", "partial_json": "z"}},
        {"type": "message_delta", "usage": {"output_tokens": 3, "output_tokens_details": {"thinking_tokens": 1}}},
    ],
    "gemini-sse": [{"candidates": [{"content": {"parts": [{"text": "x"}]}}], "usageMetadata": {"promptTokenCount": 4}}],
    "converse": [
        ("contentBlockDelta", {"delta": {"text": "x", "toolUse": {"input": "y"}, "reasoningContent": {"text": "z"}}}),
        ("metadata", {"usage": _CONVERSE_USAGE}),
    ],
    "invoke": [
        ("chunk", {"type": "message_start", "message": {"usage": _CLAUDE_USAGE}}),
        ("chunk", {"type": "content_block_delta", "delta": {"text": "x"}, "generation": "g", "outputText": "o"}),
        (
            "chunk",
            {"type": "message_delta", "usage": {"output_tokens": 3}, "amazon-bedrock-invocationMetrics": {"inputTokenCount": 3}},
        ),
    ],
}
SKELETONS["gemini-array"] = SKELETONS["gemini-sse"]


def _paths(node: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON tree, as the keys and indexes that lead there."""
    found = [at]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*at, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*at, index))
    return found


def _replaced(node: Any, at: tuple[Any, ...], value: Any) -> Any:
    if not at:
        return value
    copy = dict(node) if isinstance(node, dict) else list(node)
    copy[at[0]] = _replaced(node[at[0]], at[1:], value)
    return copy


@st.composite
def shaped_streams(draw: st.DrawFn, kind: str) -> bytes:
    """A stream of ``kind`` made of its real events with random values put anywhere in them."""
    events = draw(st.lists(st.sampled_from(SKELETONS[kind]), min_size=1, max_size=5))
    mutated = []
    for event in events:
        name, payload = event if isinstance(event, tuple) else ("", event)
        for _ in range(draw(st.integers(1, 2))):
            payload = _replaced(payload, draw(st.sampled_from(_paths(payload))), draw(json_counts | shaped))
        mutated.append((name, payload))
    if kind == "gemini-array":
        return b"[" + b",".join(orjson.dumps(p) for _, p in mutated) + b"]"
    if kind in ("converse", "invoke"):
        messages = []
        for name, payload in mutated:
            if name == "chunk":
                payload = {"bytes": base64.b64encode(orjson.dumps(payload)).decode()}
            messages.append(encode_message({":message-type": "event", ":event-type": name}, orjson.dumps(payload)))
        return b"".join(messages)
    return _sse([p for _, p in mutated])


@FUZZ
@given(data=st.data(), points=st.lists(st.integers(0, 2000), max_size=4))
@pytest.mark.parametrize("kind", sorted(SKELETONS))
def test_stream_meters_take_events_of_the_right_shape_with_wrong_types(kind, data, points):
    run_meter(_METER_OF[kind](), cut(data.draw(shaped_streams(kind)), points))


@FEW
@given(
    headers=st.dictionaries(
        st.sampled_from([":message-type", ":event-type", ":content-type", "x"]),
        st.sampled_from(["event", "exception", "metadata", "chunk", "contentBlockDelta", "messageStop", ""]) | _text,
        max_size=3,
    ),
    payload=json_values | st.binary(max_size=40),
)
def test_bedrock_event_payloads(headers, payload):
    """Decoded event-stream messages with random headers and payloads (JSON or not),
    straight into the meter and encoded into a stream."""
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    meter = EventStreamMeter(_call("converse-stream"))
    meter._on_message(headers, raw)
    if isinstance(payload, (dict, list, str)) or payload is None:
        meter._on_message({":message-type": "event", ":event-type": "chunk"}, orjson.dumps({"bytes": payload}))
        wrapped = base64.b64encode(raw).decode()
        meter._on_message({":message-type": "event", ":event-type": "chunk"}, orjson.dumps({"bytes": wrapped}))
    check_usage(meter.usage)
    stream = encode_message({k: v for k, v in headers.items() if v}, raw)
    assert run_meter(EventStreamMeter(_call("converse-stream")), [stream]) == stream
