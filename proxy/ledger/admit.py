"""Admission (``admit.lua``): check the cycle's limits and place a hold, in one call."""

from __future__ import annotations

from typing import Any

from .layout import KeyLayout
from .scripts import ScriptCall, unlimited, word
from .values import Admission, CycleLimits, Hold, LedgerReplyError, Refusal, Renewal

SCRIPT = "admit.lua"


def admit_call(
    layout: KeyLayout,
    *,
    hold: Hold,
    tier: str,
    limits: CycleLimits,
    hold_ttl_ms: int,
    renewal: Renewal,
    progress: bytes,
    now: int,
) -> ScriptCall:
    """KEYS and ARGV of ``admit.lua``, in the order of its header."""
    user = hold.account
    return ScriptCall(
        keys=[layout.account(user), layout.holds(user), layout.stream(user), layout.progress(user)],
        args=[
            now,
            tier,
            hold.member,
            hold.amount,
            limits.policy.value,
            unlimited(limits.monthly_tokens),
            unlimited(limits.monthly_requests),
            unlimited(limits.rpm),
            hold_ttl_ms,
            limits.allowance,
            renewal.cycle_ms,
            user,
            renewal.month_start_ms,
            renewal.month_end_ms,
            hold.id,
            progress,
        ],
    )


def decode_admission(reply: list[Any]) -> Admission:
    """The admission ``admit.lua`` answered; :class:`LedgerReplyError` for anything else."""
    status = word(reply)
    if status == "ok":
        balance, held, tokens, requests = (int(v) for v in reply[1:5])
        return Admission(balance=balance, held=held, tokens=tokens, requests=requests)
    try:
        refusal = Refusal(status)
    except ValueError:
        raise LedgerReplyError(f"admit.lua answered {reply!r}") from None
    if refusal is Refusal.TIER_CHANGED:
        return Admission(refusal, actual_tier=reply[1].decode())
    if refusal is Refusal.RATE:
        return Admission(refusal, retry_after_ms=int(reply[1]))
    if refusal is Refusal.CREDITS:
        return Admission(refusal, balance=int(reply[1]), held=int(reply[2]), cycle_end_ms=int(reply[3]))
    if refusal in (Refusal.TOKENS, Refusal.REQUESTS):
        return Admission(refusal, cycle_end_ms=int(reply[1]))
    return Admission(refusal)
