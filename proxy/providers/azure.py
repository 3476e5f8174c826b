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

from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from ..paths import Endpoint, EndpointTable
from .base import Call
from .openai import OpenAIProvider


def _endpoints() -> list[Endpoint]:
    """Azure's known endpoints, as the regular expressions of earlier versions allowed:
    ``openai/deployments/{deployment}/(chat/completions|completions|embeddings)``,
    ``openai[/v1]/(chat/completions|completions|embeddings|responses)`` metered, and
    ``GET openai[/v1]/(models|deployments)[/{id}]`` free. The forms without ``v1`` are
    accepted but not listed in the 404."""
    table = [
        Endpoint("POST", f"openai/deployments/{{deployment}}/{path}", name)
        for path, name in (("chat/completions", "chat"), ("completions", "completions"), ("embeddings", "embeddings"))
    ]
    for prefix, listed in (("openai/v1", True), ("openai", False)):
        table += [
            Endpoint("POST", f"{prefix}/{path}", name, listed=listed)
            for path, name in (
                ("chat/completions", "chat"),
                ("completions", "completions"),
                ("embeddings", "embeddings"),
                ("responses", "responses"),
            )
        ]
    for prefix, listed in (("openai", True), ("openai/v1", False)):
        for kind in ("models", "deployments"):
            table.append(Endpoint("GET", f"{prefix}/{kind}", kind, free=True, listed=listed))
            table.append(Endpoint("GET", f"{prefix}/{kind}/{{id}}", kind, free=True, listed=listed))
    return table


ENDPOINTS = EndpointTable(_endpoints(), note="Each path is also accepted with or without v1/ after openai/.")


class AzureOpenAIProvider(OpenAIProvider):
    """Azure OpenAI, reached with ``openai.AzureOpenAI(azure_endpoint=".../azure")``."""

    wire = "azure"
    endpoints = ENDPOINTS
    credential_headers = ("authorization", "api-key")

    def caller_key(self, request: web.Request) -> str | None:
        return request.headers.get("api-key") or super().caller_key(request)

    def add_credential(self, headers: CIMultiDict[str]) -> None:
        headers["api-key"] = self.api_key

    def inspect(self, method: str, tail: str, body: bytes, payload: Any) -> Call:
        found = self.metered(method, tail)
        # A deployment path needs no "model" in the body and is priced by its name.
        return self.describe(found.endpoint.name, body, payload, model=found.params.get("deployment"))
