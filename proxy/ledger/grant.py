"""Credit moved outside a request (``grant.lua``): open an account, credit or debit it,
start a new cycle; each exactly once per event id. One builder per mode."""

from __future__ import annotations

from typing import Any

from .events import EntryKind
from .layout import KeyLayout
from .scripts import Arg, ScriptCall, word
from .values import Cycle, LedgerReplyError, NoAccountError

SCRIPT = "grant.lua"
MARKER_TTL_MS = 400 * 86_400_000  # applied event ids are remembered this long


def _call(
    layout: KeyLayout,
    user_id: str,
    *,
    mode: str,
    amount: int,
    event_id: str,
    kind: EntryKind,
    reason: str,
    tier: str,
    now: int,
    cycle: list[Arg] | None = None,
) -> ScriptCall:
    return ScriptCall(
        keys=[layout.account(user_id), layout.stream(user_id), layout.applied_marker(user_id, event_id)],
        args=[mode, amount, event_id, now, user_id, kind.value, reason, MARKER_TTL_MS, tier, *(cycle or [])],
    )


def _cycle_args(cycle: Cycle, rollover: bool) -> list[Arg]:
    return [cycle.start_ms, cycle.end_ms, "1" if cycle.auto_renew else "0", "1" if rollover else "0"]


def open_call(layout: KeyLayout, user_id: str, *, tier: str, allowance: int, cycle: Cycle, now: int) -> ScriptCall:
    """``grant.lua`` in mode ``open``: create the account with its first cycle's allowance."""
    return _call(
        layout,
        user_id,
        mode="open",
        amount=allowance,
        event_id=f"open_{user_id}",
        kind=EntryKind.GRANT,
        reason="first cycle allowance",
        tier=tier,
        now=now,
        cycle=_cycle_args(cycle, rollover=False),
    )


def credit_call(
    layout: KeyLayout, user_id: str, *, amount: int, kind: EntryKind, reason: str, event_id: str, tier: str, now: int
) -> ScriptCall:
    """``grant.lua`` in mode ``add``: add ``amount`` (negative: remove), optionally moving the account to ``tier``."""
    return _call(layout, user_id, mode="add", amount=amount, event_id=event_id, kind=kind, reason=reason, tier=tier, now=now)


def cycle_call(
    layout: KeyLayout,
    user_id: str,
    *,
    tier: str,
    allowance: int,
    cycle: Cycle,
    event_id: str,
    reason: str,
    rollover: bool,
    now: int,
) -> ScriptCall:
    """``grant.lua`` in mode ``cycle``: balance to the allowance (plus a positive balance if
    ``rollover``), usage counters to zero, the new cycle's bounds."""
    return _call(
        layout,
        user_id,
        mode="cycle",
        amount=allowance,
        event_id=event_id,
        kind=EntryKind.RESET,
        reason=reason,
        tier=tier,
        now=now,
        cycle=_cycle_args(cycle, rollover),
    )


def decode_grant(reply: list[Any]) -> int | None:
    """The new balance, or None if the event was applied before (``dup``) or the account
    already exists (``exists``, mode ``open``); :class:`NoAccountError` if there is no account."""
    status = word(reply)
    if status == "ok":
        return int(reply[1])
    if status in ("dup", "exists"):
        return None
    if status == "no_account":
        raise NoAccountError(reply)
    raise LedgerReplyError(f"grant.lua answered {reply!r}")
