"""Which provider modules exist and where the built-in ones live."""

from __future__ import annotations

import os

from ..pricing import PriceBook
from ..settings import Settings
from .anthropic import AnthropicProvider
from .azure import AzureOpenAIProvider
from .base import Provider
from .bedrock import BedrockProvider
from .google import GoogleProvider
from .openai import OpenAIProvider

#: wire format name -> provider class
WIRES: dict[str, type[Provider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "google": GoogleProvider,
    "azure": AzureOpenAIProvider,
    "bedrock": BedrockProvider,
}

#: default upstream of each built-in provider (override with <NAME>_UPSTREAM_URL)
BUILTIN_URLS: dict[str, str] = {
    "openai": "https://api.openai.com",
    "anthropic": "https://api.anthropic.com",
    "google": "https://generativelanguage.googleapis.com",
}


def build_providers(settings: Settings, prices: PriceBook) -> dict[str, Provider]:
    """One provider instance per entry of ``pricing.yaml``, with its upstream URL and key."""
    built = {}
    for name, entry in prices.providers.items():
        cls = WIRES[entry.wire or name]
        url = settings.upstream_urls.get(name) or entry.base_url or BUILTIN_URLS[name]
        key = settings.provider_keys.get(name, "")
        if entry.api_key_env:
            key = os.environ.get(entry.api_key_env, key)
        built[name] = cls(name, url, key)
        built[name].configure(entry)
    return built
