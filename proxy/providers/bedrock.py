"""Amazon Bedrock runtime: Converse, ConverseStream, InvokeModel, InvokeModelWithResponseStream.

Metered: ``POST /bedrock/model/{modelId}/converse`` (``converse-stream``, ``invoke``,
``invoke-with-response-stream``); free: ``POST /bedrock/model/{modelId}/count-tokens``.
boto3 reaches them with ``endpoint_url="http://HOST:8080/bedrock"`` (any region).

Caller credentials: the proxy key is read from ``Authorization: Bearer <key>`` (a Bedrock
API key: boto3 sends it when ``AWS_BEARER_TOKEN_BEDROCK`` is set, over HTTPS only) or, for
SigV4-signed requests, from the access key id in ``Credential=<key>/...``: set
``aws_access_key_id`` to the proxy key and ``aws_secret_access_key`` to anything. The
signature is not checked: the proxy stores only hashes of its keys, so it cannot know a
signing secret; the key itself is the credential, exactly as with a bearer token.

Upstream credentials: with ``AWS_SECRET_ACCESS_KEY`` set, the request is signed again with
SigV4 (botocore) as the access key id read from ``api_key_env`` (and
``AWS_SESSION_TOKEN`` if set), for the region in ``base_url``'s host, else ``AWS_REGION``;
without it the key from ``api_key_env`` is a Bedrock API key, sent as a bearer token.

Model ids are priced exactly as written (``us.``/``eu.``/``global.`` inference profiles are
priced differently from each other, so none falls back to another); an ARN is priced by its
resource id (``.../inference-profile/us.anthropic...`` -> ``us.anthropic...``).

botocore is imported lazily, when a Bedrock request comes: other providers run without it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..pricing import Usage
from .base import Call, Provider, ProxyError, StreamMeter, optional_int, prompt_upper_bound
from .bedrock_usage import EventStreamMeter, get_in, usage_from_converse, usage_from_headers, usage_from_invoke

_ROUTE = re.compile(r"model/(?P<model>.+)/(?P<action>converse|converse-stream|invoke|invoke-with-response-stream|count-tokens)")
_METERED = {"converse": False, "converse-stream": True, "invoke": False, "invoke-with-response-stream": True}
_SIGV4_KEY = re.compile(r"AWS4-HMAC-SHA256\s+Credential=([^/,\s]+)/")
_REGION_IN_HOST = re.compile(r"bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.(?:vpce\.)?amazonaws\.com")
# InvokeModel's price-changing options travel as headers the gate never sees: they are not
# forwarded, so the request runs, and is billed, at the standard price.
_UNPRICED_HEADERS = ("X-Amzn-Bedrock-Service-Tier", "X-Amzn-Bedrock-PerformanceConfig-Latency")
_PRICED_TIERS = frozenset({"flex", "priority"})
_ERROR_TYPES = {
    400: "ValidationException", 401: "UnrecognizedClientException", 403: "AccessDeniedException",
    404: "ResourceNotFoundException", 413: "ValidationException", 429: "ThrottlingException",
    502: "ServiceUnavailableException", 503: "ServiceUnavailableException", 504: "ModelTimeoutException",
}


def model_id(raw: str) -> str:
    """The id a request is priced by: the id itself, or an ARN's resource id."""
    return raw.rsplit("/", 1)[-1] if raw.startswith("arn:") else raw


def _nested_int(payload: dict[str, Any], section: str, name: str) -> int | None:
    return optional_int({name: get_in(payload, section, name)}, name)


def _invoke_max_tokens(payload: dict[str, Any]) -> int | None:
    """The output cap of a model-native InvokeModel body (Claude, Llama, Mistral, Nova, Titan)."""
    return (
        optional_int(payload, "max_tokens", "max_gen_len", "max_new_tokens")
        or _nested_int(payload, "inferenceConfig", "max_new_tokens")
        or _nested_int(payload, "textGenerationConfig", "maxTokenCount")
    )


def _require_botocore() -> None:
    try:
        import botocore  # noqa: F401
    except ImportError:
        raise ProxyError(
            503, "bedrock_unavailable", "Bedrock is not available on this gateway (botocore is not installed).",
        ) from None


class BedrockProvider(Provider):
    """Amazon Bedrock runtime, reached with ``boto3.client("bedrock-runtime", endpoint_url=...)``."""

    wire = "bedrock"
    credential_headers = ("authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256")

    def __init__(self, name: str, base_url: str, api_key: str):
        super().__init__(name, base_url, api_key)
        self.secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY") or None
        self.session_token = os.environ.get("AWS_SESSION_TOKEN") or None
        in_host = _REGION_IN_HOST.search(urlsplit(self.base_url).hostname or "")
        self.region = in_host[1] if in_host else os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"

    # credentials ------------------------------------------------------------------------
    def caller_key(self, request: web.Request) -> str | None:
        signed = _SIGV4_KEY.match(request.headers.get("Authorization", ""))
        return signed[1] if signed else super().caller_key(request)

    def upstream_headers(self, incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
        headers = super().upstream_headers(incoming)
        for name in _UNPRICED_HEADERS:
            headers.popall(name, None)
        return headers

    def add_credential(self, headers: CIMultiDict[str]) -> None:
        if self.secret_key is None:
            headers["Authorization"] = f"Bearer {self.api_key}"

    def upstream_url(self, tail: str, query_string: str) -> str:
        route = _ROUTE.fullmatch(tail)
        if route:  # the model id arrived percent-encoded (an ARN holds "/") and was decoded
            tail = f"model/{quote(route['model'], safe='')}/{route['action']}"
        # aiohttp sends the URL as yarl normalises it, so that is the form to sign.
        return str(URL(super().upstream_url(tail, query_string)))

    def prepare(
        self, method: str, tail: str, query_string: str, incoming: CIMultiDictProxy[str], body: bytes
    ) -> tuple[str, CIMultiDict[str]]:
        url, headers = super().prepare(method, tail, query_string, incoming, body)
        if self.secret_key is not None:
            self._sign(method, url, headers, body)
        return url, headers

    def _sign(self, method: str, url: str, headers: CIMultiDict[str], body: bytes) -> None:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
        credentials = Credentials(self.api_key, self.secret_key, self.session_token)
        SigV4Auth(credentials, "bedrock", self.region).add_auth(request)
        for name in ("Authorization", "X-Amz-Date", "X-Amz-Security-Token"):
            if name in request.headers:
                headers[name] = request.headers[name]

    # requests ----------------------------------------------------------------------------
    def is_free(self, method: str, tail: str) -> bool:
        route = _ROUTE.fullmatch(tail)
        return method == "POST" and route is not None and route["action"] == "count-tokens"

    def inspect(self, method: str, tail: str, body: bytes, payload: Any) -> Call:
        route = _ROUTE.fullmatch(tail)
        if route is None or method != "POST" or route["action"] not in _METERED:
            raise ProxyError(
                404, "unsupported_endpoint",
                f"{method} /{self.name}/{tail} is not available through this gateway; metered endpoints are "
                f"POST /{self.name}/model/{{modelId}}/(converse|converse-stream|invoke|invoke-with-response-stream).",
            )
        if not isinstance(payload, dict):
            raise ProxyError(400, "invalid_body", "The request body must be a JSON object.")
        _require_botocore()
        action = route["action"]
        converse = action.startswith("converse")
        tier = None
        if converse:
            if get_in(payload, "performanceConfig", "latency") == "optimized":
                raise ProxyError(
                    400, "unsupported_option",
                    "Latency-optimized inference (performanceConfig.latency: optimized) is priced above the "
                    "standard rate and is not available through this gateway; leave it out.",
                )
            tier = get_in(payload, "serviceTier", "type")
        return Call(
            model=model_id(route["model"]),
            stream=_METERED[action],
            max_output_tokens=_nested_int(payload, "inferenceConfig", "maxTokens") if converse else _invoke_max_tokens(payload),
            body=body,
            prompt_upper_bound=prompt_upper_bound(body),
            service_tier=tier if tier in _PRICED_TIERS else None,
            options={"api": "converse" if converse else "invoke"},
        )

    # responses ---------------------------------------------------------------------------
    def usage_from_body(self, call: Call, payload: Any) -> Usage | None:
        if call.options["api"] == "converse":
            return usage_from_converse(payload.get("usage")) if isinstance(payload, dict) else None
        return usage_from_invoke(payload)

    def usage_from_response(self, call: Call, body: bytes, headers: Mapping[str, str]) -> Usage | None:
        """The body's usage where the model reports it, else InvokeModel's token-count headers."""
        return super().usage_from_response(call, body, headers) or usage_from_headers(headers)

    def stream_meter(self, call: Call) -> StreamMeter:
        return EventStreamMeter(call)

    def error_payload(self, status: int, code: str, message: str) -> dict[str, Any]:
        return {"message": message}

    def error_response(self, error: ProxyError) -> web.Response:
        """Bedrock's error shape: ``{"message"}`` with the type in ``x-amzn-ErrorType``."""
        response = super().error_response(error)
        kind = _ERROR_TYPES.get(error.status, "InternalServerException")
        if error.status == 429 and not error.should_retry:
            # A spent monthly quota: Bedrock's own quota error (400), which boto3 does not retry.
            kind = "ServiceQuotaExceededException"
            response.set_status(400)
        response.headers["x-amzn-ErrorType"] = kind
        return response
