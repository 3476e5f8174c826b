"""What the benchmark sends: providers (route + mock upstream) and scenarios (one request shape).

A scenario is one request shape against one provider. Each is sent three ways:

``direct``  straight to the provider's mock upstream:     ``<mock>``  + ``path``
``floor``   through the bare aiohttp pass-through:         ``<floor>`` + ``path``
``proxy``   through costproxy:                             ``<proxy>/<provider.route>`` + ``path``

Adding a provider (Anthropic, Gemini, ...) means one :class:`BenchProvider` (its mock app
factory, the env var names the proxy reads for its upstream and operator key, and how its
SDK sends the caller's key) plus the scenarios that use it; ``run.py`` starts one mock
listener and one floor listener per provider used by the selected scenarios.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def x_api_key(key: str) -> dict[str, str]:  # Anthropic SDK style
    return {"x-api-key": key}


def x_goog_api_key(key: str) -> dict[str, str]:  # Gemini SDK style
    return {"x-goog-api-key": key}


@dataclass(frozen=True)
class BenchProvider:
    """One upstream provider as the benchmark drives it."""

    name: str  # the proxy's route name: /<name>/... (and the pricing.yaml provider name)
    mock: str  # "module:factory" returning the mock upstream's aiohttp Application
    env: str  # prefix of the proxy's <ENV>_UPSTREAM_URL / <ENV>_API_KEY variables
    caller_auth: Callable[[str], dict[str, str]] = bearer  # headers carrying the proxy key
    operator_auth: Callable[[str], dict[str, str]] = bearer  # what direct/floor send upstream


OPENAI = BenchProvider(name="openai", mock="tests.support.mock_upstreams:openai_app", env="OPENAI")
ANTHROPIC = BenchProvider("anthropic", "tests.support.mock_anthropic:anthropic_app", "ANTHROPIC", x_api_key, x_api_key)
GEMINI = BenchProvider("google", "tests.support.mock_google:google_app", "GOOGLE", x_goog_api_key, x_goog_api_key)

OPERATOR_KEY = "sk-bench"


@dataclass(frozen=True)
class Scenario:
    """One request shape sent to one provider."""

    name: str
    provider: BenchProvider
    path: str  # upstream path (with query, if any), e.g. "/v1/chat/completions"
    body: dict[str, Any]
    stream: bool
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    done_marker: str = ""  # a complete stream ends with this (after trailing whitespace); "" = don't check

    def body_bytes(self) -> bytes:
        return orjson.dumps(self.body)

    def request(self, kind: str, base: str, proxy_key: str) -> tuple[str, dict[str, str]]:
        """(url, headers) of this scenario for a target of ``kind`` (direct | floor | ledger-floor |
        proxy) listening at ``base``."""
        headers = {"Content-Type": "application/json", **self.headers}
        if kind == "proxy":
            return f"{base}/{self.provider.name}{self.path}", {**headers, **self.provider.caller_auth(proxy_key)}
        # direct and floor carry the operator key, as the proxy does upstream
        return f"{base}{self.path}", {**headers, **self.provider.operator_auth(OPERATOR_KEY)}


_CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("openai-chat", OPENAI, "/v1/chat/completions", _CHAT, stream=False),
        # no stream_options: the proxy injects include_usage and strips the usage chunk again
        Scenario(
            "openai-chat-stream",
            OPENAI,
            "/v1/chat/completions",
            {**_CHAT, "stream": True},
            stream=True,
            done_marker="data: [DONE]",
        ),
        Scenario(
            "anthropic-messages-stream",
            ANTHROPIC,
            "/v1/messages",
            {
                "model": "claude-haiku-4-5",
                "max_tokens": 16,
                "stream": True,
                "messages": [{"role": "user", "content": "Say hello."}],
            },
            stream=True,
            headers={"anthropic-version": "2023-06-01"},
        ),
        Scenario(
            "gemini-stream",
            GEMINI,
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            {"contents": [{"role": "user", "parts": [{"text": "Say hello."}]}], "generationConfig": {"maxOutputTokens": 16}},
            stream=True,
        ),
    )
}
