"""Heartbeats (``heartbeat.lua``): keep a shard's live holds from expiring and record
what each request has cost so far."""

from __future__ import annotations

from collections.abc import Sequence

from .layout import KeyLayout
from .scripts import Arg, ScriptCall
from .values import Hold

SCRIPT = "heartbeat.lua"


def heartbeat_call(layout: KeyLayout, beats: Sequence[tuple[Hold, bytes]], *, expiry_ms: int) -> ScriptCall:
    """KEYS and ARGV of ``heartbeat.lua`` for holds of ONE shard, each with its progress record."""
    user = beats[0][0].account
    args: list[Arg] = [expiry_ms]
    for hold, progress in beats:
        args += [hold.member, hold.id, progress]
    return ScriptCall(keys=[layout.holds(user), layout.progress(user)], args=args)
