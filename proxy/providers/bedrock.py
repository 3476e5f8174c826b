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

import importlib.util
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..errors import ProxyError
from ..paths import Endpoint, EndpointTable
from ..pricing import ServiceTier, Usage, priced_service_tier
from .base import Call, Provider, StreamMeter, prompt_upper_bound
from .bedrock_usage import EventStreamMeter, usage_from_converse, usage_from_headers, usage_from_invoke
from .fields import choice_count, optional_object, optional_str, require_object, token_limit

# A model id, or an ARN (arn:aws:bedrock:REGION:ACCOUNT:inference-profile/ID, ...), which
# boto3 sends with its "/" encoded as %2F: the one place a path segment may hold a "/".
_MODEL_ID = r"[^/]+|arn:[^/]+(?:/[^/]+)+"
_METERED = {"converse": False, "converse-stream": True, "invoke": False, "invoke-with-response-stream": True}


def _endpoint(action: str, free: bool = False) -> Endpoint:
    return Endpoint(
        "POST", f"model/{{modelId}}/{action}", action, free=free, patterns={"modelId": _MODEL_ID}, slashes=frozenset({"modelId"})
    )


ENDPOINTS = EndpointTable([*(_endpoint(action) for action in _METERED), _endpoint("count-tokens", free=True)])
_SIGV4_KEY = re.compile(r"AWS4-HMAC-SHA256\s+Credential=([^/,\s]+)/")
_REGION_IN_HOST = re.compile(r"bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.(?:vpce\.)?amazonaws\.com")
# InvokeModel's price-changing options travel as headers the gate never sees: they are not
# forwarded, so the request runs, and is billed, at the standard price.
_UNPRICED_HEADERS = ("X-Amzn-Bedrock-Service-Tier", "X-Amzn-Bedrock-PerformanceConfig-Latency")
_ERROR_TYPES = {
    400: "ValidationException",
    401: "UnrecognizedClientException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    413: "ValidationException",
    429: "ThrottlingException",
    502: "ServiceUnavailableException",
    503: "ServiceUnavailableException",
    504: "ModelTimeoutException",
}


def model_id(raw: str) -> str:
    """The id a request is priced by: the id itself, or an ARN's resource id."""
    return raw.rsplit("/", 1)[-1] if raw.startswith("arn:") else raw


def _invoke_limits(payload: dict[str, Any]) -> tuple[int | None, int]:
    """(output limit, choices) of a model-native InvokeModel body: the largest of the
    limits the model families name (Claude, Mistral, Cohere ``max_tokens``; OpenAI-format
    ``max_completion_tokens``; Llama ``max_gen_len``; ``max_new_tokens``; Nova
    ``inferenceConfig.max_new_tokens``; Titan ``textGenerationConfig.maxTokenCount``) and
    of the counts of answers (``n``, Cohere ``num_generations``), each checked."""
    limits = [
        token_limit(payload, "max_tokens", "max_completion_tokens", "max_gen_len", "max_new_tokens"),
        token_limit(optional_object(payload, "inferenceConfig"), "max_new_tokens", within="inferenceConfig."),
        token_limit(optional_object(payload, "textGenerationConfig"), "maxTokenCount", within="textGenerationConfig."),
    ]
    given = [limit for limit in limits if limit is not None]
    return (max(given) if given else None), choice_count(payload, "n", "num_generations")


def _converse_options(payload: dict[str, Any]) -> tuple[int | None, ServiceTier | None]:
    """(``inferenceConfig.maxTokens``, priced service tier) of a Converse body; a 400 for
    wrong types and for latency-optimized inference, which is priced above the standard rate."""
    latency = optional_str(optional_object(payload, "performanceConfig"), "latency", "performanceConfig.")
    if latency == "optimized":
        raise ProxyError(
            400,
            "unsupported_option",
            "Latency-optimized inference (performanceConfig.latency: optimized) is priced above the "
            "standard rate and is not available through this gateway; leave it out.",
        )
    tier = optional_str(optional_object(payload, "serviceTier"), "type", "serviceTier.")
    max_out = token_limit(optional_object(payload, "inferenceConfig"), "maxTokens", within="inferenceConfig.")
    return max_out, priced_service_tier(tier)


def _require_botocore() -> None:
    if importlib.util.find_spec("botocore") is None:
        raise ProxyError(503, "bedrock_unavailable", "Bedrock is not available on this gateway (botocore is not installed).")


class BedrockProvider(Provider):
    """Amazon Bedrock runtime, reached with ``boto3.client("bedrock-runtime", endpoint_url=...)``."""

    wire = "bedrock"
    endpoints = ENDPOINTS
    credential_headers = ("authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256")

    def __init__(self, name: str, base_url: str, api_key: str):
        super().__init__(name, base_url, api_key)
        self.secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY") or None
        self.session_token = os.environ.get("AWS_SESSION_TOKEN") or None
        in_host = _REGION_IN_HOST.search(urlsplit(self.base_url).hostname or "")
        self.region = (
            in_host[1] if in_host else os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        )

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

    def prepare(
        self, method: str, tail: str, query_string: str, incoming: CIMultiDictProxy[str], body: bytes
    ) -> tuple[URL, CIMultiDict[str]]:
        """The URL is sent exactly as built (an ARN's "/" stays %2F), so that is the form signed."""
        url, headers = super().prepare(method, tail, query_string, incoming, body)
        if self.secret_key is not None:
            self._sign(method, str(url), headers, body)
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
    def inspect(self, method: str, tail: str, body: bytes, payload: Any) -> Call:
        """Converse reads ``inferenceConfig.maxTokens``, ``serviceTier.type`` and
        ``performanceConfig.latency``; InvokeModel the model-native limits and counts
        (:func:`_invoke_limits`). Each is checked (:mod:`.fields`)."""
        found = self.metered(method, tail)
        payload = require_object(payload)
        _require_botocore()
        action = found.endpoint.name
        choices, tier = 1, None
        if action.startswith("converse"):
            max_out, tier = _converse_options(payload)
        else:
            max_out, choices = _invoke_limits(payload)
        return Call(
            model=model_id(found.params["modelId"]),
            endpoint=action,
            stream=_METERED[action],
            max_output_tokens=max_out,
            body=body,
            prompt_upper_bound=prompt_upper_bound(body),
            service_tier=tier,
            choices=choices,
            limit_field="inferenceConfig.maxTokens" if action.startswith("converse") else "max_tokens",
        )

    # responses ---------------------------------------------------------------------------
    def usage_from_body(self, call: Call, payload: Any) -> Usage | None:
        if call.endpoint.startswith("converse"):
            return usage_from_converse(payload.get("usage")) if isinstance(payload, dict) else None
        return usage_from_invoke(payload)

    def usage_from_response(self, call: Call, body: bytes, headers: Mapping[str, str]) -> Usage | None:
        """The body's usage where the model reports it, else InvokeModel's token-count headers."""
        return super().usage_from_response(call, body, headers) or usage_from_headers(headers)

    def stream_meter(self, call: Call) -> StreamMeter:
        return EventStreamMeter(call)

    def error_payload(self, error: ProxyError) -> dict[str, Any]:
        return {"message": error.message}

    def error_response(self, error: ProxyError) -> web.Response:
        """Bedrock's error shape: ``{"message"}`` with the type in ``x-amzn-ErrorType``."""
        response = super().error_response(error)
        kind = _ERROR_TYPES.get(error.status, "InternalServerException")
        if error.quota_spent:
            # Bedrock's own quota error, which boto3 does not retry (a 400 in place of a 429).
            kind = "ServiceQuotaExceededException"
            if error.status == 429:
                response.set_status(400)
        response.headers["x-amzn-ErrorType"] = kind
        return response
