"""Settlement (``resolve.lua``): post a hold's actual cost, void it, or post the last
recorded progress of a hold that expired; each hold exactly once."""

from __future__ import annotations

from typing import Any

import orjson

from .events import UsageEvent
from .layout import KeyLayout
from .scripts import Arg, ScriptCall, unlimited, word
from .values import CycleLimits, Hold, LedgerReplyError, NoAccountError, Resolution

SCRIPT = "resolve.lua"
#: a resolution that moves no warning: nothing is over "1000 ‰ of no limit"
_NO_WARNINGS: list[Arg] = [0, -1, -1, 1000]


def _call(
    layout: KeyLayout, hold: Hold, *, mode: str, cost: int, tokens: int, details: bytes, limits: CycleLimits | None, now: int
) -> ScriptCall:
    user = hold.account
    warn = _NO_WARNINGS
    if limits is not None:
        warn = [limits.allowance, unlimited(limits.monthly_tokens), unlimited(limits.monthly_requests), limits.warning_permille]
    return ScriptCall(
        keys=[
            layout.account(user),
            layout.holds(user),
            layout.progress(user),
            layout.stream(user),
            layout.lost_hold(user, hold.id),
            layout.resolved(user),
        ],
        args=[mode, cost, tokens, now, user, hold.id, hold.placed_at, *warn, details, hold.member, hold.amount],
    )


def post_call(layout: KeyLayout, hold: Hold, *, cost: int, usage: UsageEvent, limits: CycleLimits, now: int) -> ScriptCall:
    """KEYS and ARGV of ``resolve.lua`` charging ``cost`` µ$ for the request ``usage`` describes."""
    return _call(layout, hold, mode="post", cost=cost, tokens=usage.tokens, details=usage.encode(), limits=limits, now=now)


def void_call(layout: KeyLayout, hold: Hold, *, reason: str, now: int) -> ScriptCall:
    """KEYS and ARGV of ``resolve.lua`` releasing the hold without a charge, for ``reason``."""
    details = orjson.dumps({"reason": reason})
    return _call(layout, hold, mode="void", cost=0, tokens=0, details=details, limits=None, now=now)


def expire_call(layout: KeyLayout, hold: Hold, *, now: int) -> ScriptCall:
    """KEYS and ARGV of ``resolve.lua`` posting an expired hold at its last recorded progress."""
    return _call(layout, hold, mode="expire", cost=0, tokens=0, details=b"{}", limits=None, now=now)


def decode_resolution(reply: list[Any]) -> Resolution | None:
    """The account after the resolution; None if the hold was already resolved (``dup``)
    or, for ``expire``, is still alive; :class:`NoAccountError` if the account is gone."""
    status = word(reply)
    if status == "ok":
        balance, held, tokens, requests = (int(v) for v in reply[1:5])
        return Resolution(False, balance, held, tokens, requests, posted=word(reply[5:]) == "post")
    if status in ("dup", "alive"):
        return None
    if status == "no_account":
        raise NoAccountError(reply)
    raise LedgerReplyError(f"resolve.lua answered {reply!r}")
