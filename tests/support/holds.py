"""Requests in flight without a proxy: a hold admitted as the gate admits one, with the
progress record that makes its receipt *pending* until it is settled."""

from __future__ import annotations

from proxy.ledger import Hold, Ledger, UsageEvent, new_id, progress_record
from proxy.tiers import TiersFile


async def running_request(ledger: Ledger, tiers: TiersFile, user_id: str, key_id: str, tier: str, amount: int = 1_000) -> Hold:
    """A request of ``user_id``'s key ``key_id`` (on ``tier``) admitted and not settled, as
    while it runs: its hold of ``amount`` µ$ (its id is the request id)."""
    hold = Hold(new_id("hold"), user_id, amount)
    usage = UsageEvent(key_id=key_id, provider="openai", model="gpt-4o-mini", tier=tier, input_tokens=8, estimated=True)
    admitted = await ledger.admit(
        hold,
        tier=tier,
        limits=tiers.tiers[tier].limits,
        hold_ttl_ms=60_000,
        renewal=tiers.renewal,
        progress=progress_record(2, usage),
    )
    assert admitted.refusal is None, admitted
    return hold
