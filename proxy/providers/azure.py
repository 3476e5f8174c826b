"""Azure OpenAI: the OpenAI wire format behind Azure's ``api-key`` header and deployment paths.

``/azure/<path>`` goes to ``<base_url>/<path>``, so ``base_url`` is the resource endpoint
(``https://RESOURCE.openai.azure.com``) and the SDK's ``azure_endpoint`` is
``http://HOST:8080/azure``. Metered paths:

- ``openai/deployments/{deployment}/chat/completions`` (also ``completions``, ``embeddings``);
- ``openai/v1/chat/completions`` (also ``completions``, ``embeddings``, ``responses``) and
  ``openai/responses``, where the body's ``model`` names the deployment.

A deployment path is priced by its deployment name, whatever the body's ``model`` says:
Azure runs the deployment's model and ignores that field, so trusting it would let a caller
choose the price. ``pricing.yaml`` therefore lists Azure models by deployment name.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from .base import Call, ProxyError, prompt_upper_bound
from .openai import OpenAIProvider

_DEPLOYMENT = re.compile(r"openai/deployments/(?P<deployment>[^/]+)/(?P<endpoint>chat/completions|completions|embeddings)")
_V1 = re.compile(r"openai/(?:v1/)?(?P<endpoint>chat/completions|completions|embeddings|responses)")
_FREE = re.compile(r"openai/(?:v1/)?(?:models|deployments)(?:/[^/]+)?")


class AzureOpenAIProvider(OpenAIProvider):
    """Azure OpenAI, reached with ``openai.AzureOpenAI(azure_endpoint=".../azure")``."""

    wire = "azure"
    credential_headers = ("authorization", "api-key")

    def caller_key(self, request: web.Request) -> str | None:
        return request.headers.get("api-key") or super().caller_key(request)

    def add_credential(self, headers: CIMultiDict[str]) -> None:
        headers["api-key"] = self.api_key

    def is_free(self, method: str, tail: str) -> bool:
        return method == "GET" and _FREE.fullmatch(tail) is not None

    def inspect(self, method: str, tail: str, body: bytes, payload: Any) -> Call:
        deployment = _DEPLOYMENT.fullmatch(tail)
        route = deployment or _V1.fullmatch(tail)
        if route is None or method != "POST":
            raise ProxyError(
                404, "unsupported_endpoint",
                f"{method} /{self.name}/{tail} is not available through this gateway; metered endpoints are "
                f"/{self.name}/openai/deployments/{{deployment}}/(chat/completions|completions|embeddings) "
                f"and /{self.name}/openai/v1/(chat/completions|completions|embeddings|responses).",
            )
        openai_tail = "v1/" + route["endpoint"]
        if deployment is None:
            return super().inspect(method, openai_tail, body, payload)
        name = deployment["deployment"]
        if not isinstance(payload, dict):
            raise ProxyError(400, "invalid_body", "The request body must be a JSON object.")
        # Deployment paths need no "model" in the body; lend the deployment name to the
        # OpenAI parsing without sending it upstream.
        lent = "model" not in payload
        view = {**payload, "model": name} if lent else payload
        call = super().inspect(method, openai_tail, body, view)
        call.model = name
        if lent and call.body is not body:  # include_usage was added: encode again without the loan
            del view["model"]
            call.body = orjson.dumps(view)
            call.prompt_upper_bound = prompt_upper_bound(call.body)
        return call
