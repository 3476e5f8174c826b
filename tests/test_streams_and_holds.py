"""Broken streams, crashed requests and dead upstreams: usage is charged, no hold is left."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace

import aiohttp
import openai
import pytest

from proxy.ledger import new_id
from proxy.worker import void_expired_holds

from .mock_upstreams import RECEIVED


@pytest.fixture
def settings(settings):
    """A short drain window, so a hung upstream is given up on quickly."""
    return replace(settings, drain_seconds=0.5)


async def _settled(ledger, user_id: str, timeout: float = 5.0) -> dict[str, int]:
    """The account once it has no open hold left."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        account = {k: int(v) for k, v in (await ledger.account(user_id)).items() if v.lstrip("-").isdigit()}
        if account["open_holds"] == 0 or asyncio.get_running_loop().time() > deadline:
            return account
        await asyncio.sleep(0.05)


async def _open_and_drop(proxy_url: str, api_key: str, headers: dict[str, str]) -> bytes:
    """Start a chat stream, read its first bytes and hang up."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{proxy_url}/openai/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {api_key}", **headers})
        first = await resp.content.readany()
        resp.close()
    return first


def _estimate_micro(sent_body: bytes, generated_chars: int) -> int:
    """The proxy's estimate: prompt bound / 4 and generated text / 4 tokens, gpt-4o-mini prices."""
    prompt_tokens = math.ceil((len(sent_body) + 64) / 4)
    output_tokens = math.ceil(generated_chars / 4)
    return math.ceil((prompt_tokens * 150_000 + output_tokens * 600_000) / 1_000_000)


async def test_client_leaving_mid_stream_is_charged_the_real_usage(make_customer, proxy_url, ledger, usage_log, pool):
    customer = await make_customer("starter")
    first = await _open_and_drop(proxy_url, customer.api_key, {"x-mock-scenario": "slow", "x-mock-chunks": "8"})
    assert first.startswith(b"data: ")
    account = await _settled(ledger, customer.user_id)
    assert account["held"] == 0 and account["open_holds"] == 0
    assert account["balance"] == 3_800_000 - 345  # the usage the upstream reported after the client left
    while await usage_log.drain_once():
        pass
    row = await pool.fetchrow("SELECT cost_micro, estimated, stream FROM usage_events WHERE user_id = $1", customer.user_id)
    assert (row["cost_micro"], row["estimated"], row["stream"]) == (345, False, True)


async def test_stream_without_usage_is_charged_an_estimate_marked_as_such(make_customer, openai_client, upstream, ledger, usage_log, pool):
    customer = await make_customer("starter")
    stream = await openai_client(customer.api_key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True,
        extra_headers={"x-mock-scenario": "no-usage"},
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "Hello world"
    expected = _estimate_micro(upstream.app[RECEIVED][-1].body, len("Hello world"))
    account = await _settled(ledger, customer.user_id)
    assert account["balance"] == 3_800_000 - expected and account["held"] == 0
    while await usage_log.drain_once():
        pass
    row = await pool.fetchrow("SELECT cost_micro, estimated FROM usage_events WHERE user_id = $1", customer.user_id)
    assert (row["cost_micro"], row["estimated"]) == (expected, True)


async def test_hung_upstream_after_client_left_is_given_up_and_estimated(make_customer, proxy_url, upstream, ledger):
    customer = await make_customer("starter")
    await _open_and_drop(proxy_url, customer.api_key, {"x-mock-scenario": "hang"})
    account = await _settled(ledger, customer.user_id)
    assert account["held"] == 0 and account["open_holds"] == 0
    # two chunks arrived before the hang: the role chunk ("") and "Hel"
    assert account["balance"] == 3_800_000 - _estimate_micro(upstream.app[RECEIVED][-1].body, 3)


async def test_unreachable_upstream_gives_502_and_releases_the_hold(make_customer, aiohttp_server, settings, ledger):
    from proxy.app import create_app

    dead = replace(settings, upstream_urls={"openai": "http://127.0.0.1:9"})
    server = await aiohttp_server(create_app(dead, dead.redis_url))
    customer = await make_customer("starter")
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/openai/v1")), api_key=customer.api_key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as err:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 502 and err.value.code == "upstream_unreachable"
    account = await _settled(ledger, customer.user_id)
    assert (account["balance"], account["held"], account["requests"]) == (3_800_000, 0, 0)


async def test_hold_of_a_crashed_request_expires_and_is_voided_once(make_customer, ledger, usage_log, pool, accounts):
    customer = await make_customer("starter")
    tiers = accounts.config.tiers
    hold_id = new_id("hold")
    admitted = await ledger.admit(
        user_id=customer.user_id, tier="starter", hold_id=hold_id, hold_micro=5_000, strict=False,
        monthly_tokens=None, monthly_requests=None, rpm=None, hold_ttl_ms=1,
        allowance_micro=tiers.tiers["starter"].allowance_micro, renewal=tiers.renewal,
    )
    assert (admitted.reason, admitted.held) == ("ok", 5_000)
    await asyncio.sleep(0.01)
    assert await void_expired_holds(ledger) >= 1
    account = await _settled(ledger, customer.user_id)
    assert (account["held"], account["open_holds"], account["balance"]) == (0, 0, 3_800_000)
    assert await void_expired_holds(ledger) == 0

    # the "crashed" request turns out to have finished: it is charged once, nothing released twice
    late = await ledger.post(user_id=customer.user_id, hold_id=hold_id, hold_micro=5_000, cost_micro=700, tokens=10,
                             event={"key": customer.key_id, "provider": "openai", "model": "gpt-4o-mini", "tier": "starter"})
    assert (late.duplicate, late.balance, late.held) == (False, 3_800_000 - 700, 0)
    again = await ledger.post(user_id=customer.user_id, hold_id=hold_id, hold_micro=5_000, cost_micro=700, tokens=10, event={})
    assert again.duplicate

    while await usage_log.drain_once():
        pass
    rows = await pool.fetch("SELECT kind, amount_micro FROM ledger WHERE user_id = $1 ORDER BY created_at, kind", customer.user_id)
    assert sorted((r["kind"], r["amount_micro"]) for r in rows) == [("charge", -700), ("grant", 3_800_000), ("void", 0)]


async def test_a_redis_blip_at_settlement_is_retried_and_charges_once(make_customer, ledger, accounts, monkeypatch):
    """The first settlement attempt runs but its reply is lost; the retry must not charge twice."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    import proxy.ledger as ledger_module

    customer = await make_customer("starter")
    tiers = accounts.config.tiers
    hold_id = new_id("hold")
    await ledger.admit(
        user_id=customer.user_id, tier="starter", hold_id=hold_id, hold_micro=5_000, strict=False,
        monthly_tokens=None, monthly_requests=None, rpm=None, hold_ttl_ms=60_000,
        allowance_micro=tiers.tiers["starter"].allowance_micro, renewal=tiers.renewal,
    )
    monkeypatch.setattr(ledger_module, "RESOLVE_RETRY_PAUSES", (0.01, None))
    script, attempts = ledger._resolve, []

    async def reply_lost_once(keys, args):
        result = await script(keys=keys, args=args)
        attempts.append(args[0])
        if len(attempts) == 1:
            raise RedisConnectionError("reply lost")
        return result

    ledger._resolve = reply_lost_once
    settled = await ledger.post(user_id=customer.user_id, hold_id=hold_id, hold_micro=5_000, cost_micro=700, tokens=10, event={})
    assert attempts == ["post", "post"]
    assert (settled.duplicate, settled.balance, settled.held, settled.requests) == (False, 3_800_000 - 700, 0, 1)
    account = await ledger.account(customer.user_id)
    assert (int(account["balance"]), int(account["requests"])) == (3_800_000 - 700, 1)


async def test_settled_requests_leave_no_key_of_their_own_in_redis(make_customer, openai_client, redis, settings, ledger):
    """A hold lives as a member of its shard's zset: settling removes it, so Redis does not
    grow with the number of requests served (only the ledger stream does, until drained)."""
    customer = await make_customer("starter")
    client = openai_client(customer.api_key)

    async def keys() -> set[bytes]:
        return {k async for k in redis.scan_iter(match=f"{settings.redis_prefix}*", count=1000)}

    await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    before = await keys()
    for _ in range(5):
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert await keys() == before
    account = await ledger.account(customer.user_id)
    assert (int(account["held"]), int(account["open_holds"]), int(account["requests"])) == (0, 0, 6)
    assert [await redis.zcard(k) for k in ledger.holds_keys()] == [0] * len(ledger.holds_keys())


async def test_a_lost_admission_reply_gives_503_and_releases_the_hold(make_customer, aiohttp_server, settings, upstream, ledger):
    """The admission script ran but its reply was lost: the client is told to retry, nothing
    is forwarded, and the hold it placed is released at once, not after HOLD_TTL_SECONDS."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from proxy.app import create_app
    from proxy.state import GATE

    live = replace(settings, upstream_urls={"openai": str(upstream.make_url("")).rstrip("/")})
    server = await aiohttp_server(create_app(live, live.redis_url, live.database_url))
    gate = server.app[GATE]
    script = gate.ledger._admit

    async def reply_lost(keys, args):
        await script(keys=keys, args=args)
        raise RedisConnectionError("reply lost")

    gate.ledger._admit = reply_lost
    customer = await make_customer("starter")
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/openai/v1")), api_key=customer.api_key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as err:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert (err.value.status_code, err.value.code) == (503, "ledger_unavailable")
    assert err.value.response.headers["x-should-retry"] == "true"
    assert not upstream.app[RECEIVED]
    account = await _settled(ledger, customer.user_id)
    assert (account["balance"], account["held"], account["open_holds"], account["requests"]) == (3_800_000, 0, 0, 0)


async def test_client_leaving_before_the_headers_is_still_charged_the_real_usage(make_customer, proxy_url, ledger):
    customer = await make_customer("starter")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as http:
        with pytest.raises(asyncio.TimeoutError):  # gives up before the upstream's headers arrive
            await http.post(f"{proxy_url}/openai/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=0.1),
                            headers={"Authorization": f"Bearer {customer.api_key}", "x-mock-scenario": "late"})
    await asyncio.sleep(0.4)
    account = await _settled(ledger, customer.user_id)
    assert (account["held"], account["balance"]) == (0, 3_800_000 - 345)  # the usage the upstream reported


async def test_an_unexpected_error_while_relaying_releases_the_hold(make_customer, openai_client, ledger, monkeypatch):
    from proxy.providers.openai import OpenAIProvider

    def broken(*args, **kwargs):
        raise RuntimeError("request signing failed")

    monkeypatch.setattr(OpenAIProvider, "prepare", broken)
    customer = await make_customer("starter")
    with pytest.raises(openai.InternalServerError):
        await openai_client(customer.api_key).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    account = await _settled(ledger, customer.user_id, timeout=1)
    assert (account["balance"], account["held"], account["open_holds"]) == (3_800_000, 0, 0)


async def test_an_expired_hold_placed_by_the_previous_version_is_voided(make_customer, ledger, redis):
    """Holds used to be a hash each, the zset member only their id: a sweep after an
    upgrade still finds their account and amount, releases them and drops the hash."""
    customer = await make_customer("starter")
    account_key = ledger.account_key(customer.user_id)
    tag = account_key.split(":acct:")[0]
    await redis.hset(f"{tag}:hold:hold_old1", mapping={"account": account_key, "amount": 5_000, "state": "pending", "expires": 1})
    await redis.zadd(f"{tag}:holds", {"hold_old1": 1})
    await redis.hset(account_key, mapping={"held": 5_000, "open_holds": 1})

    assert await void_expired_holds(ledger) == 1
    account = await _settled(ledger, customer.user_id, timeout=0)
    assert (account["balance"], account["held"], account["open_holds"]) == (3_800_000, 0, 0)
    assert not await redis.exists(f"{tag}:hold:hold_old1") and not await redis.zcard(f"{tag}:holds")
