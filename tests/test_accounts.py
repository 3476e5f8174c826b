"""The account service's limits, which hold for every caller (CLI, admin API, portal)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.accounts import MAX_LIVE_KEYS, ConflictError


async def test_live_keys_per_user_are_capped_for_every_caller(make_customer, accounts):
    customer = await make_customer("free")  # its first key counts
    issued = await asyncio.gather(
        *(accounts.create_key(customer.user_id, f"k{n}") for n in range(MAX_LIVE_KEYS + 4)), return_exceptions=True
    )
    refused = [result for result in issued if isinstance(result, ConflictError)]
    assert len(refused) == 5 and len(issued) - len(refused) == MAX_LIVE_KEYS - 1  # at once, as one after another
    rotated = await accounts.rotate_key(customer.key_id, overlap_seconds=60)  # a rotation at the cap replaces a key
    assert rotated.key_id != customer.key_id
    with pytest.raises(ConflictError, match="live keys"):  # the old key still works during the overlap
        await accounts.create_key(customer.user_id)
    for key_id in (customer.key_id, rotated.key_id):  # 51 live after the rotation: two revocations make room
        await accounts.revoke_key(key_id)
    assert (await accounts.create_key(customer.user_id)).api_key.startswith("cpk-")
