"""Which Stripe disputes cost money: an open dispute (``needs_response``, ``under_review``)
and a ``lost`` one have had their amount withdrawn; a ``won`` or ``prevented`` one gave it
back or never took it, and an inquiry (``warning_*``) withdraws nothing."""

from __future__ import annotations

from typing import Any

_WITHDRAWN = frozenset({"needs_response", "under_review", "lost"})


def withdrawn_cents(dispute: dict[str, Any]) -> int:
    """What ``dispute`` (a Stripe Dispute object) takes from the payment, in cents."""
    return int(dispute.get("amount") or 0) if dispute.get("status") in _WITHDRAWN else 0
