"""Which providers' reports can be read, where, with which admin key and in which scope."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ..pricing import PriceBook
from ..providers.registry import BUILTIN_URLS
from ..settings import Settings


class ReportProvider(StrEnum):
    """The providers whose own usage and cost reports costproxy can reconcile with."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"

    @property
    def admin_key_name(self) -> str:
        """The environment variable of its admin key."""
        return f"{self.name}_ADMIN_KEY"


@dataclass(frozen=True)
class ReportAccess:
    """Where and as whom a provider's reports are read, and the part of the organization the
    gateway's upstream key is in: ``scope_id`` is the OpenAI project or the Anthropic
    workspace, ``api_key_id`` the key's id in the provider's console ("" for either: all)."""

    provider: ReportProvider
    base_url: str
    admin_key: str
    scope_id: str
    api_key_id: str


def report_access(settings: Settings, prices: PriceBook, provider: ReportProvider) -> ReportAccess | None:
    """The access the settings give to ``provider``'s reports; None without its admin key.

    The base URL is the one the proxy forwards to (``<PROVIDER>_UPSTREAM_URL``, else
    ``base_url`` in pricing.yaml, else the provider's own).
    """
    entry = prices.providers.get(provider.value)
    base_url = settings.upstream_urls.get(provider.value) or (entry.base_url if entry else None) or BUILTIN_URLS[provider.value]
    if provider is ReportProvider.OPENAI:
        key, scope, api_key = (
            settings.openai_admin_key,
            settings.openai_reconcile_project_id,
            settings.openai_reconcile_api_key_id,
        )
    else:
        key, scope, api_key = (
            settings.anthropic_admin_key,
            settings.anthropic_reconcile_workspace_id,
            settings.anthropic_reconcile_api_key_id,
        )
    return ReportAccess(provider, base_url.rstrip("/"), key, scope, api_key) if key else None
