"""Redis loses its data (FLUSHALL): keys stop working and money commands say what to do;
`costproxy ledger rebuild` restores every balance exactly from Postgres, and requests are
served again."""

from __future__ import annotations

import asyncio

import openai
import pytest
import redis as redis_sync

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


async def test_flushall_then_ledger_rebuild_restores_every_balance_exactly(world, redis_server):
    customers = [await world.customer(tier) for tier in ("starter", "professional", "starter", "free")]
    with world.worker(), world.serve() as proxy:
        for customer in customers:
            client = openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=customer.api_key, max_retries=0)
            for _ in range(3):
                await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        await world.ledger_check()
        before = {c.user_id: await world.ledger.account(c.user_id) for c in customers}

        await asyncio.to_thread(redis_sync.Redis(port=redis_server.port).flushall)
        await asyncio.sleep(0.5)  # past KEY_CACHE_SECONDS
        client = openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=customers[0].api_key, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=[])
        grant = await asyncio.to_thread(world.cli, "credits", "grant", customers[0].user_id, "--credits", "5")
        assert grant.returncode == 1 and "ledger rebuild" in grant.stderr and "Traceback" not in grant.stderr

        rebuilt = await asyncio.to_thread(world.cli, "ledger", "rebuild")
        assert rebuilt.returncode == 0, rebuilt.stderr
        assert f"restored {len(customers)} accounts" in rebuilt.stdout
        for customer in customers:
            after = await world.ledger.account(customer.user_id)
            was = before[customer.user_id]
            assert after is not None and was is not None
            assert (after.balance, after.tokens, after.requests, after.cost, after.tier) == (
                was.balance, was.tokens, was.requests, was.cost, was.tier,
            )  # fmt: skip
        again = await asyncio.to_thread(world.cli, "ledger", "rebuild")
        assert "restored 0 accounts" in again.stdout and f"kept {len(customers)}" in again.stdout

        await asyncio.sleep(0.5)
        reply = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "back?"}])
        assert reply.choices[0].message.content
        report = await world.ledger_check()
    print(f"FLUSHALL: {len(customers)} accounts rebuilt to the µ$ from Postgres, served again; ledger check clean ({report})")
