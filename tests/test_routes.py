"""Only known endpoints are forwarded: every provider's table of endpoints, the one reading
of a raw path (``proxy.paths``), and, end to end, that traversal and malformed paths are
refused in the provider's error shape with nothing reaching the upstream.

The mock upstreams get a catch-all route here that records whatever reaches them, so
"received nothing" covers every path, not only those the mock serves.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.errors import ProxyError
from proxy.paths import Endpoint, EndpointTable, PathError, canonical_tail, parse_tail, upstream_url
from proxy.providers.anthropic import AnthropicProvider
from proxy.providers.azure import AzureOpenAIProvider
from proxy.providers.base import Provider
from proxy.providers.bedrock import BedrockProvider
from proxy.providers.google import GoogleProvider
from proxy.providers.openai import OpenAIProvider

from .support.mock_anthropic import anthropic_app
from .support.mock_bedrock import OPERATOR_ACCESS_KEY, OPERATOR_REGION, OPERATOR_SECRET, bedrock_app
from .support.mock_compatible import azure_app, prefixed_openai_app
from .support.mock_google import google_app
from .support.mock_upstreams import RECEIVED, Received, openai_app

ARN = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.meta.llama3-3-70b-instruct-v1:0"
#: the ARN as boto3 puts it in a path: every ":" and "/" percent-encoded
ARN_SENT = "arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.meta.llama3-3-70b-instruct-v1%3A0"
ARN_CANONICAL = "arn:aws:bedrock:us-east-1:123456789012:inference-profile%2Fus.meta.llama3-3-70b-instruct-v1:0"


# proxy.paths -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "segments", "canonical"),
    [
        ("v1/chat/completions", ("v1", "chat", "completions"), "v1/chat/completions"),
        ("v1/models/ft%3Agpt-4o-mini%3Aacme%3A%3Aabc", ("v1", "models", "ft:gpt-4o-mini:acme::abc"), None),
        ("v1/%63hat/completions", ("v1", "chat", "completions"), "v1/chat/completions"),
        ("v1/models/a%20b", ("v1", "models", "a b"), "v1/models/a%20b"),
        ("v1/models/%7Ex%2Dy_z.", ("v1", "models", "~x-y_z."), "v1/models/~x-y_z."),
        ("v1/models/caf%C3%A9", ("v1", "models", "café"), "v1/models/caf%C3%A9"),
        ("v1/models/a[b]", ("v1", "models", "a[b]"), "v1/models/a%5Bb%5D"),
        ("v1/models/...", ("v1", "models", "..."), "v1/models/..."),
        ("v1/models/.a", ("v1", "models", ".a"), "v1/models/.a"),
        (f"model/{ARN_SENT}/converse", ("model", ARN, "converse"), f"model/{ARN_CANONICAL}/converse"),
    ],
)
def test_parse_decodes_each_segment_once_and_canonical_form_is_stable(raw, segments, canonical):
    assert parse_tail(raw) == segments
    tail = canonical_tail(segments)
    assert tail == (canonical or tail)
    assert parse_tail(tail) == segments and canonical_tail(parse_tail(tail)) == tail


REFUSED = [
    ("", "empty"),
    ("v1//models", "empty"),
    ("v1/models/", "empty"),
    ("/v1/models", "empty"),
    ("v1/models/.", "'.' or '..'"),
    ("v1/models/..", "'.' or '..'"),
    ("v1/models/%2e", "'.' or '..'"),
    ("v1/models/%2E%2E", "'.' or '..'"),
    ("v1/models/.%2e", "'.' or '..'"),
    ("v1/models/%2e./x", "'.' or '..'"),
    ("v1/models/..%2F..%2Fv1%2Ffiles", "'.' or '..'"),
    ("v1/models/a%2F%2Fb", "empty"),
    ("v1/models/a%2F", "empty"),
    ("v1/models/a\\b", "backslash"),
    ("v1/models/a%5Cb", "backslash"),
    ("v1/models/a%5cb", "backslash"),
    ("v1/models/a%252Fb", "twice"),
    ("v1/models/%252e%252e", "twice"),
    ("v1/models/a%25", "twice"),
    ("v1/models/a%", "malformed"),
    ("v1/models/a%4", "malformed"),
    ("v1/models/a%zz", "malformed"),
    ("v1/models/a%C0%AFb", "UTF-8"),
    ("v1/models/a%FF", "UTF-8"),
    ("v1/models/a%00b", "control"),
    ("v1/models/a%0Ab", "control"),
    ("v1/models/a%0D%0AHost:x", "control"),
    ("v1/models/a%7Fb", "control"),
    ("v1/models/a%C2%85b", "control"),
    ("v1/models/a%E2%80%AEb", "control"),  # right-to-left override
    ("v1/models/a\x00b", "control"),
]


@pytest.mark.parametrize(("raw", "why"), REFUSED)
def test_malformed_paths_are_refused_before_matching(raw, why):
    with pytest.raises(PathError, match=why):
        parse_tail(raw)


def test_upstream_url_is_sent_as_built():
    url = upstream_url("http://upstream:8000/openai", "v1/models/ft:x%2Fy", "alt=sse&a=b c&p=%&h=#&ok=%26")
    assert isinstance(url, URL)
    # nothing decoded, re-encoded or resolved: the path is the canonical tail, the query only made valid
    assert str(url) == "http://upstream:8000/openai/v1/models/ft:x%2Fy?alt=sse&a=b%20c&p=%25&h=%23&ok=%26"
    assert url.raw_path == "/openai/v1/models/ft:x%2Fy"
    assert str(upstream_url("https://api.openai.com/", "v1/models", "")) == "https://api.openai.com/v1/models"


def test_an_endpoint_matches_whole_segments_only():
    table = EndpointTable(
        [
            Endpoint("GET", "v1/models/{model}", "model", free=True),
            Endpoint("POST", "m/{id}/run", "run", patterns={"id": r"[^/]+|arn:[^/]+(?:/[^/]+)+"}, slashes=frozenset({"id"})),
        ]
    )
    assert table.find("GET", "v1/models/x", "p").tail == "v1/models/x"
    assert table.find("POST", "m/arn%3Aa%2Fb/run", "p").params == {"id": "arn:a/b"}
    for method, raw in [
        ("GET", "v1/models"),
        ("GET", "v1/models/x/y"),
        ("GET", "v1/models/x%2Fy"),  # a "/" only where the endpoint allows it
        ("POST", "v1/models/x"),
        ("GET", "V1/models/x"),
        ("GET", "v1/models/x;y=1/z"),
        ("POST", "m/a%2Fb/run"),  # an encoded "/" only inside an ARN
        ("POST", "m/run"),
    ]:
        with pytest.raises(ProxyError) as err:
            table.find(method, raw, "p")
        assert (err.value.status, err.value.code) == (404, "unsupported_endpoint")
        assert "GET /p/v1/models/{model}" in err.value.message


# every provider's table --------------------------------------------------------------------
def _providers() -> dict[str, Provider]:
    groq = OpenAIProvider("groq", "https://api.groq.com/openai", "k")
    return {
        "openai": OpenAIProvider("openai", "https://api.openai.com", "k"),
        "groq": groq,
        "anthropic": AnthropicProvider("anthropic", "https://api.anthropic.com", "k"),
        "google": GoogleProvider("google", "https://generativelanguage.googleapis.com", "k"),
        "azure": AzureOpenAIProvider("azure", "https://res.openai.azure.com", "k"),
        "bedrock": BedrockProvider("bedrock", "https://bedrock-runtime.us-east-1.amazonaws.com", "k"),
    }


PROVIDERS = _providers()
KNOWN: dict[str, list[tuple[str, str, bool]]] = {
    "openai": [
        ("POST", "v1/chat/completions", False),
        ("POST", "v1/completions", False),
        ("POST", "v1/embeddings", False),
        ("POST", "v1/responses", False),
        ("GET", "v1/models", True),
        ("GET", "v1/models/gpt-4o-mini", True),
        ("GET", "v1/models/ft:gpt-4o-mini-2024-07-18:acme::A1b2", True),
    ],
    "anthropic": [
        ("POST", "v1/messages", False),
        ("POST", "v1/messages/count_tokens", True),
        ("GET", "v1/models", True),
        ("GET", "v1/models/claude-sonnet-4-6", True),
    ],
    "google": [
        *(
            ("POST", f"{version}/models/gemini-2.5-flash:{action}", False)
            for version in ("v1beta", "v1", "v1alpha")
            for action in ("generateContent", "streamGenerateContent", "embedContent", "batchEmbedContents")
        ),
        ("POST", "v1beta/models/gemini-2.5-flash:countTokens", True),
        ("GET", "v1beta/models", True),
        ("GET", "v1/models/gemini-2.5-flash", True),
    ],
    "azure": [
        *(("POST", f"openai/deployments/prod-mini/{path}", False) for path in ("chat/completions", "completions", "embeddings")),
        *(
            ("POST", f"{prefix}/{path}", False)
            for prefix in ("openai/v1", "openai")
            for path in ("chat/completions", "completions", "embeddings", "responses")
        ),
        *(
            ("GET", f"{prefix}/{kind}{rest}", True)
            for prefix in ("openai", "openai/v1")
            for kind in ("models", "deployments")
            for rest in ("", "/x-1")
        ),
    ],
    "bedrock": [
        *(
            ("POST", f"model/{model}/{action}", False)
            for model in ("us.anthropic.claude-sonnet-4-6", ARN_CANONICAL)
            for action in ("converse", "converse-stream", "invoke", "invoke-with-response-stream")
        ),
        ("POST", f"model/{ARN_CANONICAL}/count-tokens", True),
    ],
}
KNOWN["groq"] = KNOWN["openai"]
UNKNOWN: dict[str, list[tuple[str, str]]] = {
    "openai": [
        ("GET", "v1/files"),
        ("DELETE", "v1/models/ft:gpt-4o-mini:acme::A1b2"),  # deleting the operator's fine-tune
        ("POST", "v1/models"),
        ("GET", "v1/chat/completions"),
        ("POST", "v1/fine_tuning/jobs"),
        ("POST", "v1/chat/completions/x"),
        ("GET", "v1/models/a/b"),
        ("POST", "v1/batches"),
        ("HEAD", "v1/models"),
    ],
    "anthropic": [
        ("POST", "v1/messages/batches"),
        ("GET", "v1/messages/batches/msgbatch_1"),
        ("GET", "v1/files"),
        ("POST", "v1/complete"),
        ("GET", "v1/messages"),
        ("GET", "v1/models/a/b"),
    ],
    "google": [
        ("GET", "v1beta/files"),
        ("POST", "v1beta/cachedContents"),
        ("POST", "v1beta/models/gemini-2.5-flash:batchGenerateContent"),
        ("POST", "v1beta/models/gemini-2.5-flash:predict"),
        ("POST", "v2/models/gemini-2.5-flash:generateContent"),
        ("GET", "v1beta/models/gemini-2.5-flash:generateContent"),
        ("POST", "v1beta/tunedModels/x:generateContent"),
        ("GET", "v1beta/models/a:b"),
    ],
    "azure": [
        ("POST", "openai/deployments/x/images/generations"),
        ("GET", "openai/v1/files"),
        ("POST", "v1/chat/completions"),
        ("POST", "openai/v1/deployments/x/chat/completions"),
        ("POST", "openai/deployments/x/responses"),
        ("GET", "openai/deployments/a/b"),
    ],
    "bedrock": [
        ("POST", "async-invoke"),
        ("GET", "model/m/converse"),
        ("POST", "model/m/apply-guardrail"),
        ("POST", "guardrail/g/version/1/apply"),
        ("POST", "model/a%2Fb/converse"),  # an encoded "/" only inside an ARN
        ("POST", "model/m/x/converse"),
    ],
}
UNKNOWN["groq"] = UNKNOWN["openai"]


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_known_endpoints_route_in_canonical_form(name):
    provider = PROVIDERS[name]
    for method, tail, free in KNOWN[name]:
        route = provider.route(method, tail)
        assert (route.tail, route.free) == (tail, free), (method, tail)
        assert provider.route(method, route.tail) == route  # canonical in, canonical out


@pytest.mark.parametrize("name", sorted(UNKNOWN))
def test_unknown_endpoints_are_404_listing_the_known_ones(name):
    provider = PROVIDERS[name]
    for method, tail in UNKNOWN[name]:
        with pytest.raises(ProxyError) as err:
            provider.route(method, tail)
        assert (err.value.status, err.value.code) == (404, "unsupported_endpoint"), (method, tail)
        assert f"{method} /{name}/{tail} is not available" in err.value.message
        assert "metered endpoints are POST " in err.value.message


def test_the_404_names_every_endpoint():
    message = PROVIDERS["openai"].endpoints.not_found("GET", "v1/files", "openai").message
    assert message == (
        "GET /openai/v1/files is not available through this gateway; metered endpoints are "
        "POST /openai/v1/chat/completions, POST /openai/v1/completions, POST /openai/v1/embeddings, "
        "POST /openai/v1/responses; free endpoints are GET /openai/v1/models, GET /openai/v1/models/{model}."
    )
    google = PROVIDERS["google"].endpoints.not_found("GET", "v1beta/files", "google").message
    assert "POST /google/{version}/models/{model}:generateContent" in google
    assert google.endswith("{version} is v1beta, v1 or v1alpha.")
    refused = PROVIDERS["anthropic"].endpoints.find
    with pytest.raises(ProxyError, match=r"\(it has a '\.' or '\.\.' path segment\)"):
        refused("GET", "v1/models/%2e%2e", "anthropic")


def test_bedrock_arn_is_signed_and_sent_with_its_slash_encoded(monkeypatch):
    for name, value in {"AWS_SECRET_ACCESS_KEY": OPERATOR_SECRET, "AWS_REGION": OPERATOR_REGION}.items():
        monkeypatch.setenv(name, value)
    bedrock = BedrockProvider("bedrock", "http://127.0.0.1:1", OPERATOR_ACCESS_KEY)
    route = bedrock.route("POST", f"model/{ARN_SENT}/invoke")
    assert route.tail == f"model/{ARN_CANONICAL}/invoke"
    assert bedrock.inspect("POST", route.tail, b"{}", {}).model == "us.meta.llama3-3-70b-instruct-v1:0"
    url, headers = bedrock.prepare("POST", route.tail, "", CIMultiDictProxy(CIMultiDict()), b"{}")
    assert url.raw_path == f"/model/{ARN_CANONICAL}/invoke"
    assert headers["Authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={OPERATOR_ACCESS_KEY}/")
    for bad in (
        f"model/{ARN_SENT}%2F..%2F..%2Fasync-invoke/invoke",
        "model/arn%3Aaws%3Abedrock%2F%2Fx/invoke",
        "model/arn%3Aaws%3Abedrock%2F%2e/invoke",
        "model/arn%3Aaws%3Abedrock%2F/invoke",
        "model/arn%3Aaws%5Cx/invoke",
        "model/arn%3Aaws%2F%252F/invoke",
    ):
        with pytest.raises(ProxyError) as err:
            bedrock.route("POST", bad)
        assert err.value.status == 404, bad


# end to end: nothing reaches an upstream ------------------------------------------------------
async def _record_anything(request: web.Request) -> web.Response:
    body = await request.read()
    headers = {str(k): v for k, v in request.headers.items()}
    raw_path = request.raw_path.partition("?")[0]
    request.app[RECEIVED].append(Received(request.method, request.path, request.query_string, headers, body, raw_path))
    return web.json_response({"error": "not a route of this mock"}, status=404)


def recording_everything(app: web.Application) -> web.Application:
    """``app`` with a last route that records any request its own routes do not serve."""
    app.router.add_route("*", "/{anything:.*}", _record_anything)
    return app


def _openai_shape(raw: SimpleNamespace) -> None:
    assert raw.json["error"]["code"] == "unsupported_endpoint"
    assert raw.json["error"]["type"] == "invalid_request_error"


def _anthropic_shape(raw: SimpleNamespace) -> None:
    assert raw.json["type"] == "error" and raw.json["error"]["type"] == "not_found_error"


def _google_shape(raw: SimpleNamespace) -> None:
    error = raw.json["error"]
    assert (error["code"], error["status"], error["details"][0]["reason"]) == (404, "NOT_FOUND", "UNSUPPORTED_ENDPOINT")


def _bedrock_shape(raw: SimpleNamespace) -> None:
    assert raw.headers["x-amzn-ErrorType"] == "ResourceNotFoundException" and set(raw.json) == {"message"}


#: provider -> (mock upstream, env, base path, legit path with {} for a model-like segment, its method, shape check)
E2E: dict[str, tuple[Callable[[], web.Application], dict[str, str], str, str, str, Callable[[SimpleNamespace], None]]] = {
    "openai": (openai_app, {}, "", "v1/models/{}", "GET", _openai_shape),
    "groq": (
        lambda: prefixed_openai_app("/openai"),
        {"GROQ_API_KEY": "gsk-operator"},
        "/openai",
        "v1/models/{}",
        "GET",
        _openai_shape,
    ),
    "anthropic": (anthropic_app, {}, "", "v1/models/{}", "GET", _anthropic_shape),
    "google": (google_app, {}, "", "v1beta/models/{}", "GET", _google_shape),
    "azure": (
        azure_app,
        {"AZURE_OPENAI_API_KEY": "azure-operator"},
        "",
        "openai/deployments/{}/chat/completions",
        "POST",
        _openai_shape,
    ),
    "bedrock": (
        bedrock_app,
        {"AWS_ACCESS_KEY_ID": OPERATOR_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": OPERATOR_SECRET, "AWS_REGION": OPERATOR_REGION},
        "",
        "model/{}/converse",
        "POST",
        _bedrock_shape,
    ),
}
#: a model-like segment that must never be forwarded, on any provider
BAD_SEGMENTS = [
    "..",
    ".",
    "%2e%2e",
    "%2E%2E",
    ".%2E",
    "%2e",
    "..%2F..%2Fv1%2Ffiles",
    "..%2f..%2fv1%2ffiles",
    "a%2Fb",
    "a%2F..%2F..%2Fx",
    "a%5Cb",
    "a\\b",
    "..\\..\\x",
    "a%252Fb",
    "%252e%252e",
    "a%00b",
    "a%0Ab",
    "a%0D%0AX-Injected:%201",
    "a%7F",
    "a%zz",
    "a%",
    "a%C0%AFb",
]
#: provider -> traversals towards endpoints that must not be reached
TRAVERSALS = {
    "openai": [
        ("GET", "v1/models/../../v1/files"),
        ("GET", "v1/models/..%2F..%2Fv1%2Ffiles"),
        ("GET", "v1/models/ft%3Agpt-4o%3Aacme%2F..%2F..%2F..%2Fv1%2Ffine_tuning%2Fjobs"),
        ("DELETE", "v1/models/ft:gpt-4o-mini:acme::A1b2"),
        ("POST", "v1/chat/completions/../../files"),
        ("POST", "v1/chat/completions%2F..%2F..%2Ffiles"),
        ("GET", "v1/files"),
        ("POST", "v1/fine_tuning/jobs"),
    ],
    "anthropic": [
        ("GET", "v1/models/..%2F..%2Fv1%2Ffiles"),
        ("GET", "v1/models/../messages/batches"),
        ("GET", "v1/models/%2E%2E/messages/batches"),
        ("POST", "v1/messages/batches"),
        ("POST", "v1/messages/count_tokens/..%2Fbatches"),
        ("GET", "v1/files"),
    ],
    "google": [
        ("GET", "v1beta/models/..%2F..%2Fv1beta%2Ffiles"),
        ("GET", "v1beta/models/../files"),
        ("POST", "v1beta/models/gemini-2.5-flash%2F..%2F..%2FcachedContents:generateContent"),
        ("POST", "v1beta/models/..%2FtunedModels%2Fx:generateContent"),
        ("POST", "v1beta/cachedContents"),
        ("GET", "v1beta/files"),
    ],
    "azure": [
        ("POST", "openai/deployments/..%2F..%2Fopenai%2Ffiles/chat/completions"),
        ("GET", "openai/models/..%2Ffiles"),
        ("GET", "openai/deployments/../files"),
        ("GET", "openai/v1/files"),
        ("POST", "openai/deployments/x/images/generations"),
    ],
    "bedrock": [
        ("POST", "model/..%2F..%2Fasync-invoke/converse"),
        ("POST", f"model/{ARN_SENT}%2F..%2F..%2Fasync-invoke/converse"),
        ("POST", "model/arn%3Aaws%3Abedrock%2F%2Fx/converse"),
        ("POST", "model/x%2Fy/converse"),
        ("POST", "model/m/converse%2F..%2F..%2Fasync-invoke"),
        ("POST", "model/m/../../async-invoke"),
        ("POST", "async-invoke"),
    ],
}
TRAVERSALS["groq"] = TRAVERSALS["openai"]


def _structural(path: str) -> list[str]:
    """The path with an empty segment, a trailing or leading slash, dot segments around it."""
    head = path.split("/", 1)[0]
    return [path + "/", "/" + path, path.replace("/", "//", 1), path + "/.", path + "/..", "./" + path, f"{head}/../{path}"]


async def _send(url: str, method: str, headers: dict[str, str]) -> SimpleNamespace:
    """One request with its path sent exactly as written (no client-side normalisation)."""
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, URL(url, encoded=True), data=b"{}", headers=headers) as resp,
    ):
        body = await resp.read()
        parsed = orjson.loads(body) if body.startswith(b"{") else None
        return SimpleNamespace(status=resp.status, headers=resp.headers, body=body, json=parsed)


@pytest.mark.parametrize("name", sorted(E2E))
async def test_traversal_and_malformed_paths_reach_no_upstream(name, start_proxy, make_customer):
    make_app, env, base_path, template, method, check_shape = E2E[name]
    proxy = await start_proxy({name: recording_everything(make_app())}, env=env, base_paths={name: base_path}, database=False)
    customer = await make_customer("enterprise")
    headers = {"Authorization": f"Bearer {customer.api_key}", "Content-Type": "application/json"}
    cases = [(method, template.format(seg)) for seg in BAD_SEGMENTS]
    cases += [(method, tail) for tail in _structural(template.format("m"))]
    cases += TRAVERSALS[name]
    for verb, tail in cases:
        raw = await _send(f"{proxy.url}/{name}/{tail}", verb, headers)
        assert raw.status == 404, (verb, tail, raw.status, raw.body)
        # every refusal in the provider's error shape, a decoded newline (%0A, %0D) included:
        # app.py's "{tail:[\s\S]*}" hands it to the handler, not to aiohttp's plain-text 404
        assert raw.json is not None, (verb, tail, raw.body)
        check_shape(raw)
        assert proxy.received(name) == [], (verb, tail)
    assert proxy.received(name) == []


async def test_legitimate_paths_are_forwarded_in_canonical_form(start_proxy, make_customer):
    """Free paths (no body, no pricing) on each provider: the upstream gets the canonical
    path, as sent, and answers; the Bedrock ARN keeps its encoded "/" and its signature
    verifies."""
    customer = await make_customer("enterprise")
    headers = {"Authorization": f"Bearer {customer.api_key}", "Content-Type": "application/json"}
    cases: list[tuple[str, str, str, str, Any]] = [
        ("openai", "GET", "v1/models/ft%3Agpt-4o-mini%3Aacme%3A%3AA1b2", "/v1/models/ft:gpt-4o-mini:acme::A1b2", None),
        ("openai", "GET", "v1/%6Dodels", "/v1/models", 200),
        ("groq", "GET", "v1/models", "/openai/v1/models", 200),
        ("anthropic", "GET", "v1/models/claude%2Dsonnet%2D4%2D6", "/v1/models/claude-sonnet-4-6", None),
        ("google", "GET", "v1beta/models", "/v1beta/models", 200),
        ("google", "GET", "v1beta/models/gemini%202", "/v1beta/models/gemini%202", None),
        ("azure", "GET", "openai/v1/models", "/openai/v1/models", 200),
        ("bedrock", "POST", f"model/{ARN_SENT}/count-tokens", f"/model/{ARN_CANONICAL}/count-tokens", 200),
    ]
    apps = {name: recording_everything(E2E[name][0]()) for name in {case[0] for case in cases}}
    env = {k: v for spec in E2E.values() for k, v in spec[1].items()}
    proxy = await start_proxy(apps, env=env, base_paths={"groq": "/openai"}, database=False)
    for name, method, tail, upstream_path, status in cases:
        before = len(proxy.received(name))
        raw = await _send(f"{proxy.url}/{name}/{tail}", method, headers)
        if status is not None:
            assert raw.status == status, (name, tail, raw.body)
        assert len(proxy.received(name)) == before + 1, (name, tail, raw.status, raw.body)  # this very request, once
        sent = proxy.received(name)[-1]
        # the path exactly as it went on the wire: encoded once, neither decoded twice nor
        # encoded again (the Bedrock mock records the raw path as ``path``)
        wire = sent.raw_path or sent.path
        assert wire == upstream_path, (name, tail, wire)
        assert sent.path == (upstream_path if name == "bedrock" else URL(upstream_path, encoded=True).path), (name, sent.path)
