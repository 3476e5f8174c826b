"""The refusal the proxy answers itself on a provider route."""

from __future__ import annotations


class ProxyError(Exception):
    """A refusal the proxy answers itself, rendered in the route's provider error shape
    (:meth:`proxy.providers.base.Provider.error_response`).

    ``status`` is the HTTP status, ``code`` the machine-readable code in the body,
    ``reason`` the label of ``costproxy_refusals_total`` (the code unless given);
    ``should_retry`` becomes ``x-should-retry``, which the official SDKs honour;
    ``quota_spent`` marks the account's credits or monthly quota as used up (waiting for the
    cycle or upgrading helps, retrying does not): each provider renders it as its own
    out-of-quota error, which frameworks tell apart from a bad key or a rate limit.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        reason: str | None = None,
        should_retry: bool = False,
        quota_spent: bool = False,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason or code
        self.should_retry = should_retry
        self.quota_spent = quota_spent
        self.headers = headers or {}
