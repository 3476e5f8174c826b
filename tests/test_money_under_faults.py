"""The money rules when Redis goes away or a request outlives its hold's TTL, in-process
(the same scenarios with real processes and a real Redis restart are in tests/faults/)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
import anthropic
import openai
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.ledger import Hold, UsageEvent, new_id, progress_record
from proxy.ledger.resolve import post_call
from proxy.spool import Spool
from proxy.state import LEDGER
from proxy.worker import expire_holds

from .support.accounts import account, settled
from .support.mock_anthropic import anthropic_app
from .support.mock_upstreams import openai_app
from .support.money import ALLOWANCE, micro
from .support.processes import free_port


async def test_while_redis_is_down_every_answer_is_a_503_in_the_providers_shape_and_nothing_is_forwarded(
    make_customer, start_proxy
):
    customer = await make_customer("professional")
    dead = f"redis://127.0.0.1:{free_port()}/0"
    proxy = await start_proxy({"openai": openai_app(), "anthropic": anthropic_app()}, redis_url=dead)
    chat = openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=customer.api_key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as err:
        await chat.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert (err.value.status_code, err.value.code) == (503, "ledger_unavailable")
    assert err.value.response.headers["x-should-retry"] == "true"
    claude = anthropic.AsyncAnthropic(base_url=f"{proxy.url}/anthropic", api_key=customer.api_key, max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as aerr:
        await claude.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert aerr.value.status_code == 503 and aerr.value.body["error"]["type"] == "overloaded_error"
    async with aiohttp.ClientSession() as http:
        auth = {"Authorization": f"Bearer {customer.api_key}"}
        async with http.get(f"{proxy.url}/api/credits", headers=auth) as credits:
            assert credits.status == 503 and (await credits.json())["error"]["code"] == "ledger_unavailable"
        async with http.get(f"{proxy.url}/readyz") as ready:
            assert ready.status == 503
    assert not proxy.received("openai") and not proxy.received("anthropic")


async def test_a_charge_redis_does_not_take_is_spooled_and_posted_once_when_it_is_back(make_customer, start_proxy, ledger):
    proxy = await start_proxy({"openai": openai_app()})
    customer = await make_customer("starter")
    served = proxy.app[LEDGER]
    script, down = served._resolve, {"on": True}

    async def flaky(keys, args):
        if down["on"]:
            raise RedisConnectionError("Redis is restarting")
        return await script(keys=keys, args=args)

    served._resolve = flaky
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=customer.api_key, max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=[], max_tokens=5)
    assert raw.headers["x-credits-charged"] == "0.0345" and "x-credits-remaining" not in raw.headers
    assert served.spool is not None and len(served.spool) == 1
    # not released, not charged: the whole hold waits - gpt-4o-mini's worst case, every prompt
    # byte (+64) at the input price 0.15 and the 5 max_tokens at the output price 0.6
    sent = proxy.received("openai")[-1].body
    waiting = await account(ledger, customer.user_id)
    hold = micro((len(sent) + 64, "0.15"), (5, "0.6"))
    assert (waiting.balance, waiting.held, waiting.open_holds) == (ALLOWANCE["starter"], hold, 1)

    down["on"] = False
    deadline = asyncio.get_running_loop().time() + 5
    while len(served.spool):
        assert asyncio.get_running_loop().time() < deadline, "the spool was not replayed"
        await asyncio.sleep(0.1)
    after = await settled(ledger, customer.user_id)
    assert (after.balance, after.held, after.requests) == (ALLOWANCE["starter"] - 345, 0, 1)


async def test_a_spool_left_by_a_killed_process_is_adopted_and_posted_exactly_once(make_customer, ledger, accounts, tmp_path):
    customer = await make_customer("starter")
    tiers = accounts.config.tiers
    starter = tiers.tiers["starter"]
    hold = Hold(new_id("hold"), customer.user_id, 2_000)
    usage = UsageEvent(key_id=customer.key_id, provider="openai", model="gpt-4o-mini", tier="starter", input_tokens=50)
    await ledger.admit(
        hold, tier="starter", limits=starter.limits, hold_ttl_ms=60_000, renewal=tiers.renewal, progress=progress_record(8, usage)
    )
    dead = Spool(tmp_path)
    dead.open()
    call = post_call(ledger.keys, hold, cost=777, usage=usage, limits=starter.limits, now=1)
    await dead.keep(hold.id, call)
    await dead.keep(hold.id, call)  # kept twice (a retry): still one settlement
    assert dead._own is not None
    dead._own.handle.close()  # the process is gone: its lock with it, its file stays

    heir = Spool(tmp_path)
    assert heir.open() == 1
    assert await heir.replay(ledger.run_settlement) == 1
    assert await heir.replay(ledger.run_settlement) == 0
    after = await account(ledger, customer.user_id)
    assert (after.balance, after.held, after.requests) == (ALLOWANCE["starter"] - 777, 0, 1)
    assert await ledger.run_settlement(call) is None  # a replay of a replay is a duplicate
    heir.close()
    assert not list(tmp_path.glob("spool-*.jsonl"))


@pytest.fixture
def settings(settings):
    """Holds that expire fast unless renewed, renewed fast."""
    # ten beats to a TTL: a busy machine's stalled event loop does not let a live hold lapse
    return replace(settings, hold_ttl_seconds=1.0, heartbeat_seconds=0.1)


async def test_a_live_stream_keeps_its_hold_past_the_ttl_and_strict_never_goes_below_zero(make_customer, start_proxy, ledger):
    proxy = await start_proxy({"openai": openai_app()})
    customer = await make_customer("free", balance_micro=1_000)  # strict; one request's worst case fits, two do not
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 1000}
    auth = {"Authorization": f"Bearer {customer.api_key}", "x-mock-scenario": "slow", "x-mock-chunks": "60"}
    swept = 0

    async def sweeper() -> None:
        nonlocal swept
        while True:
            swept += await expire_holds(ledger)
            await asyncio.sleep(0.05)

    sweeping = asyncio.create_task(sweeper())
    try:
        url = f"{proxy.url}/openai/v1/chat/completions"
        async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=auth) as stream:
            await stream.content.readany()
            await asyncio.sleep(2.0)  # twice the hold's TTL into the 3 s stream
            second = await http.post(url, json={**body, "stream": False}, headers=auth)
            assert second.status == 403 and (await second.json())["error"]["code"] == "insufficient_credits"
            await stream.read()
    finally:
        sweeping.cancel()
    after = await settled(ledger, customer.user_id)
    assert swept == 0  # the sweep never took the live hold
    assert (after.balance, after.held, after.requests) == (1_000 - 345, 0, 1)  # the real usage, once
