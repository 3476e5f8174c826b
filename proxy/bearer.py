"""The one parser of ``Authorization: Bearer <token>`` headers."""

from __future__ import annotations


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization`` header value of the Bearer scheme (case-insensitive),
    or None when the header is missing, of another scheme, or empty."""
    if authorization is None or authorization[:7].lower() != "bearer ":
        return None
    return authorization[7:].strip() or None
