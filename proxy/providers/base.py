"""What every provider module supplies, and the parts they share.

A provider module describes one wire format: where the caller's key sits, where the
operator's key goes, which requests are metered and for which model, how usage is read
from a JSON body or an event stream, and the provider's own error shape. The gate,
forwarder and ledger never look inside a provider's payloads themselves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from ..pricing import ProviderPricing, Usage
from .sse import SSESplitter

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
        "Transfer-Encoding", "Upgrade", "Host", "Content-Length", "Content-Encoding",
    )
)
# Sent upstream by aiohttp itself; a client's own Accept-Encoding would make the proxy
# read compressed bytes it then has to decode anyway.
_CLIENT_ONLY = frozenset({"accept-encoding", "cookie"})
# Average bytes per token, used only for estimates after a stream lost its usage.
BYTES_PER_TOKEN = 4
# Tokens a chat template adds around a request beyond its text (role markers etc.).
TEMPLATE_OVERHEAD_TOKENS = 64


class ProxyError(Exception):
    """A refusal the proxy answers itself, rendered in the route's provider error shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        reason: str | None = None,
        should_retry: bool = False,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason or code
        self.should_retry = should_retry
        self.headers = headers or {}


@dataclass(slots=True)
class Call:
    """A metered request as the provider module understood it."""

    model: str
    stream: bool
    max_output_tokens: int | None
    body: bytes
    prompt_upper_bound: int
    service_tier: str | None = None
    batch: bool = False
    options: dict[str, Any] = field(default_factory=dict)


class StreamMeter:
    """Reads usage from a response stream while passing it on; one per streamed response.

    ``feed`` returns the bytes to send to the client for each upstream chunk. The base
    class passes chunks through untouched and hands whole SSE events to :meth:`on_event`.
    """

    def __init__(self, call: Call):
        self.call = call
        self.usage: Usage | None = None
        self.generated_chars = 0
        self._splitter = SSESplitter()

    def feed(self, chunk: bytes) -> bytes:
        for event in self._splitter.feed(chunk):
            self.on_event(event)
        return chunk

    def finish(self) -> bytes:
        rest = self._splitter.rest()
        if rest.strip():
            self.on_event(rest)
        return b""

    def on_event(self, event: bytes) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def estimate(self) -> Usage:
        """Usage guessed from what was generated, for a stream that never reported it."""
        return estimate_usage(self.call, self.generated_chars)


def estimate_usage(call: Call, generated_chars: int = 0) -> Usage:
    """Usage guessed at ``BYTES_PER_TOKEN`` from the prompt's size and the text generated,
    for an answer that did not report its own; marked ``estimated``."""
    return Usage(
        input_tokens=math.ceil(call.prompt_upper_bound / BYTES_PER_TOKEN),
        output_tokens=math.ceil(generated_chars / BYTES_PER_TOKEN),
        estimated=True,
    )


class Provider:
    """Base class of provider modules; one instance per configured provider name."""

    wire: ClassVar[str]
    #: header names that may carry the caller's proxy key (removed before forwarding)
    credential_headers: ClassVar[tuple[str, ...]] = ("authorization",)

    def __init__(self, name: str, base_url: str, api_key: str):
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key

    def configure(self, entry: ProviderPricing) -> None:
        """Take provider options from its ``pricing.yaml`` entry; called once after construction."""

    # credentials ------------------------------------------------------------------------
    def caller_key(self, request: web.Request) -> str | None:
        """The proxy key the caller sent, wherever this provider's SDK puts it."""
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip() or None
        return None

    def upstream_headers(self, incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
        """The caller's headers minus hop-by-hop ones and credentials, plus the operator's key."""
        drop = HOP_BY_HOP | _CLIENT_ONLY | set(self.credential_headers)
        out = CIMultiDict((k, v) for k, v in incoming.items() if k.lower() not in drop)
        self.add_credential(out)
        return out

    def add_credential(self, headers: CIMultiDict[str]) -> None:
        headers["Authorization"] = f"Bearer {self.api_key}"

    def upstream_url(self, tail: str, query_string: str) -> str:
        """Where the request goes: base URL + the path after the route prefix + the query."""
        return f"{self.base_url}/{tail}" + (f"?{query_string}" if query_string else "")

    def prepare(
        self, method: str, tail: str, query_string: str, incoming: CIMultiDictProxy[str], body: bytes
    ) -> tuple[str, CIMultiDict[str]]:
        """URL and headers of the upstream request; override to sign requests (e.g. SigV4)."""
        return self.upstream_url(tail, query_string), self.upstream_headers(incoming)

    # requests ----------------------------------------------------------------------------
    def is_free(self, method: str, tail: str) -> bool:
        """Requests passed through unmetered (model listings, token counting)."""
        return False

    def inspect(self, method: str, tail: str, body: bytes, payload: Any) -> Call:
        """Describe a metered request, or raise :class:`ProxyError` if it is not one."""
        raise NotImplementedError

    # responses ---------------------------------------------------------------------------
    def usage_from_body(self, call: Call, payload: Any) -> Usage | None:
        raise NotImplementedError

    def usage_from_response(self, call: Call, body: bytes, headers: Mapping[str, str]) -> Usage | None:
        """Usage of a whole (non-streamed) answer; by default read from its JSON body.

        Override where the provider reports usage in response headers (Bedrock InvokeModel).
        """
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        return self.usage_from_body(call, payload)

    def stream_meter(self, call: Call) -> StreamMeter:
        raise NotImplementedError

    def error_payload(self, status: int, code: str, message: str) -> dict[str, Any]:
        raise NotImplementedError

    def error_response(self, error: ProxyError) -> web.Response:
        """Render a refusal in this provider's error shape, so SDKs raise their typed error."""
        headers = {"x-should-retry": "true" if error.should_retry else "false", **error.headers}
        return web.Response(
            status=error.status,
            body=orjson.dumps(self.error_payload(error.status, error.code, error.message)),
            content_type="application/json",
            headers=headers,
        )


def prompt_upper_bound(body: bytes) -> int:
    """An upper bound on a text prompt's tokens: every token is at least one byte."""
    return len(body) + TEMPLATE_OVERHEAD_TOKENS


def require_model(payload: Any) -> str:
    """The ``model`` field of a JSON request, or a 400."""
    model = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(model, str) or not model:
        raise ProxyError(400, "missing_model", "The request body must name a model in its \"model\" field.")
    return model


def optional_int(payload: dict[str, Any], *names: str) -> int | None:
    """The first of ``names`` present in the payload as a positive integer."""
    for name in names:
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
