"""What every provider module supplies, and the parts they share.

A provider module describes one wire format: where the caller's key sits, where the
operator's key goes, which requests are metered and for which model, how usage is read
from a JSON body or an event stream, and the provider's own error shape. The gate,
forwarder and ledger never look inside a provider's payloads themselves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .. import paths
from ..bearer import bearer_token
from ..errors import ProxyError
from ..paths import EndpointTable, Found
from ..pricing import ProviderPricing, ServiceTier, Usage
from .sse import EventSplitter, SSESplitter

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
        "Content-Encoding",
    )
)
# Sent upstream by aiohttp itself; a client's own Accept-Encoding would make the proxy
# read compressed bytes it then has to decode anyway.
_CLIENT_ONLY = frozenset({"accept-encoding", "cookie"})
# Average bytes per token, used only for estimates after a stream lost its usage.
BYTES_PER_TOKEN = 4
# Tokens a chat template adds around a request beyond its text (role markers etc.).
TEMPLATE_OVERHEAD_TOKENS = 64
#: the largest token count read from an upstream's usage (any larger one is taken as this)
MAX_REPORTED_TOKENS = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Route:
    """A path this provider knows, as :meth:`Provider.route` matched it."""

    #: the path after the route prefix in canonical form: what is forwarded and inspected
    tail: str
    #: passed through unmetered (model listings, token counts)
    free: bool


@dataclass(slots=True)
class Call:
    """A metered request as the provider module understood it.

    Every count in it is a bounded integer (see :mod:`proxy.providers.fields`); the hold
    is ``choices`` × the output limit (at most the model's cap) plus the prompt's bound.
    """

    model: str
    #: which of the provider's metered endpoints (``chat``, ``responses``, ``converse``, ...)
    endpoint: str
    stream: bool
    #: the output limit of ONE choice as the request gives it (1 .. 2**31 - 1; 0 for
    #: embeddings, which generate nothing), or None if it gives none
    max_output_tokens: int | None
    body: bytes
    prompt_upper_bound: int
    #: the tier the request asks for (flex, priority; None: the standard prices)
    service_tier: ServiceTier | None = None
    #: the proxy added ``stream_options.include_usage`` (OpenAI wire): strip what it adds
    usage_injected: bool = False
    #: how many answers the request can produce (``n``, ``best_of``, ``candidateCount``;
    #: 1 .. 128): each may use up to the output limit
    choices: int = 1
    #: where the request sets its output limit, for error messages that tell how to fit
    limit_field: str = "max_tokens"


class StreamMeter:
    """Reads usage from a response stream while passing it on; one per streamed response.

    ``feed`` returns the bytes to send to the client for each upstream chunk. The base
    class passes chunks through untouched and hands whole SSE events to :meth:`on_event`.
    """

    def __init__(self, call: Call):
        self.call = call
        self.usage: Usage | None = None
        self.generated_chars = 0
        self._splitter: EventSplitter = SSESplitter()

    def feed(self, chunk: bytes) -> bytes:
        for event in self._splitter.feed(chunk):
            self.on_event(event)
        return chunk

    def finish(self) -> bytes:
        rest = self._splitter.rest()
        if rest.strip():
            self.on_event(rest)
        return b""

    def on_event(self, event: bytes) -> None:
        """Read one whole SSE event (its terminator included)."""
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
    #: the endpoints forwarded (anything else is a 404 and reaches no upstream)
    endpoints: ClassVar[EndpointTable]
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
        return bearer_token(request.headers.get("Authorization"))

    def upstream_headers(self, incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
        """The caller's headers minus hop-by-hop ones and credentials, plus the operator's key."""
        drop = HOP_BY_HOP | _CLIENT_ONLY | set(self.credential_headers)
        out = CIMultiDict((k, v) for k, v in incoming.items() if k.lower() not in drop)
        self.add_credential(out)
        return out

    def add_credential(self, headers: CIMultiDict[str]) -> None:
        headers["Authorization"] = f"Bearer {self.api_key}"

    def upstream_url(self, tail: str, query_string: str) -> URL:
        """Where the request goes: base URL + the canonical tail (:meth:`route`) + the
        query, as an already-encoded URL that nothing normalises again."""
        return paths.upstream_url(self.base_url, tail, query_string)

    def prepare(
        self, method: str, tail: str, query_string: str, incoming: CIMultiDictProxy[str], body: bytes
    ) -> tuple[URL, CIMultiDict[str]]:
        """URL and headers of the upstream request; override to sign requests (e.g. SigV4)."""
        return self.upstream_url(tail, query_string), self.upstream_headers(incoming)

    # requests ----------------------------------------------------------------------------
    def route(self, method: str, raw_tail: str) -> Route:
        """The known endpoint that ``raw_tail`` (the path after ``/<name>/``, still
        percent-encoded as the client sent it) names, with the path in canonical form;
        a 404 ``unsupported_endpoint`` :class:`ProxyError` for anything else, malformed
        paths included (see :mod:`proxy.paths`)."""
        found = self.endpoints.find(method, raw_tail, self.name)
        return Route(found.tail, found.free)

    def metered(self, method: str, tail: str) -> Found:
        """The metered endpoint ``tail`` names, or a 404 (a free or unknown one)."""
        found = self.endpoints.find(method, tail, self.name)
        if found.free:
            raise self.endpoints.not_found(method, tail, self.name, "it is not metered")
        return found

    def inspect(self, method: str, tail: str, body: bytes, payload: Any) -> Call:
        """Describe a metered request (``tail`` as :meth:`route` returned it), or raise
        :class:`ProxyError`: a 404 if it is not a metered endpoint, a 400 for a body
        the gateway cannot hold a bounded amount for (see :mod:`.fields`)."""
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

    def error_payload(self, error: ProxyError) -> dict[str, Any]:
        """The body of a refusal in this provider's error shape."""
        raise NotImplementedError

    def error_response(self, error: ProxyError) -> web.Response:
        """Render a refusal in this provider's error shape, so SDKs raise their typed error."""
        headers = {"x-should-retry": "true" if error.should_retry else "false", **error.headers}
        return web.Response(
            status=error.status,
            body=orjson.dumps(self.error_payload(error)),
            content_type="application/json",
            headers=headers,
        )


def token_count(value: Any) -> int:
    """A token count as an upstream reported it, made safe to price: an integer from 0 to
    :data:`MAX_REPORTED_TOKENS`. Negative numbers, booleans, null, objects and text that is
    not a decimal integer count 0; a number with a fraction is rounded up; anything above
    the bound counts as the bound. So a charge is always an integer ≥ 0, whatever the
    upstream says."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return min(max(value, 0), MAX_REPORTED_TOKENS)
    if isinstance(value, float):
        if not value > 0:  # negative, zero or NaN
            return 0
        return MAX_REPORTED_TOKENS if value >= MAX_REPORTED_TOKENS else math.ceil(value)
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit():
            return MAX_REPORTED_TOKENS if len(text) > 10 else min(int(text), MAX_REPORTED_TOKENS)
    return 0


def as_object(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one: for reading upstream answers,
    whose shape the proxy never trusts."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    """``value`` if it is a JSON array, else an empty one."""
    return value if isinstance(value, list) else []


def prompt_upper_bound(body: bytes) -> int:
    """An upper bound on a text prompt's tokens: every token is at least one byte."""
    return len(body) + TEMPLATE_OVERHEAD_TOKENS
