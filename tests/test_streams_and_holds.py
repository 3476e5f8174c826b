"""Broken streams, crashed requests and dead upstreams: usage is charged, no hold is left."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace

import aiohttp
import openai
import pytest

from proxy.ledger import Hold, LedgerEntry, UsageEvent, decode_entry, new_id, progress_record
from proxy.worker import expire_holds

from .support.accounts import Customer, account, settled
from .support.mock_upstreams import RECEIVED, openai_app
from .support.money import ALLOWANCE
from .support.waiting import until


@pytest.fixture
def settings(settings):
    """A short drain window, so a hung upstream is given up on quickly."""
    return replace(settings, drain_seconds=0.5)


async def _open_and_drop(proxy_url: str, api_key: str, headers: dict[str, str]) -> bytes:
    """Start a chat stream, read its first bytes and hang up."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            f"{proxy_url}/openai/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {api_key}", **headers}
        )
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
    acct = await settled(ledger, customer.user_id)
    assert acct.held == 0 and acct.open_holds == 0
    assert acct.balance == ALLOWANCE["starter"] - 345  # the usage the upstream reported after the client left
    while await usage_log.drain_once():
        pass
    row = await pool.fetchrow("SELECT cost_micro, estimated, stream FROM usage_events WHERE user_id = $1", customer.user_id)
    assert (row["cost_micro"], row["estimated"], row["stream"]) == (345, False, True)


async def test_stream_without_usage_is_charged_an_estimate_marked_as_such(
    make_customer,
    openai_client,
    upstream,
    ledger,
    usage_log,
    pool,
):
    customer = await make_customer("starter")
    stream = await openai_client(customer.api_key).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-mock-scenario": "no-usage"},
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "Hello world"
    expected = _estimate_micro(upstream.app[RECEIVED][-1].body, len("Hello world"))
    acct = await settled(ledger, customer.user_id)
    assert acct.balance == ALLOWANCE["starter"] - expected and acct.held == 0
    while await usage_log.drain_once():
        pass
    row = await pool.fetchrow("SELECT cost_micro, estimated FROM usage_events WHERE user_id = $1", customer.user_id)
    assert (row["cost_micro"], row["estimated"]) == (expected, True)


async def test_a_whole_answer_without_usage_is_charged_its_prompt_and_answer_size(make_customer, openai_client, upstream, ledger):
    customer = await make_customer("starter")
    reply = await openai_client(customer.api_key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-mock-scenario": "no-usage"}
    )
    answer = await reply.http_response.aread()
    expected = _estimate_micro(upstream.app[RECEIVED][-1].body, len(answer))  # the answer's size bounds the text in it
    assert (await settled(ledger, customer.user_id)).balance == ALLOWANCE["starter"] - expected


async def test_estimated_output_never_counts_more_tokens_than_the_request_could_produce(
    make_customer, openai_client, upstream, ledger
):
    """400 chunks of text on max_tokens 1: at 4 bytes a token the estimate would count ~300
    output tokens, more than the hold priced; it counts the one the request allows."""
    customer = await make_customer("starter")
    stream = await openai_client(customer.api_key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=1, stream=True,
        extra_headers={"x-mock-scenario": "no-usage", "x-mock-chunks": "400"},
    )  # fmt: skip
    generated = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    body = upstream.app[RECEIVED][-1].body
    hold = math.ceil(((len(body) + 64) * 150_000 + 1 * 600_000) / 1_000_000)  # prompt bound + 1 output token
    charged = _estimate_micro(body, 4)  # the prompt estimate and one output token
    assert _estimate_micro(body, len(generated)) > hold >= charged
    assert (await settled(ledger, customer.user_id)).balance == ALLOWANCE["starter"] - charged
    stream = await ledger.redis.xrange(ledger.keys.stream(customer.user_id))
    entries = [decode_entry({k.decode(): v.decode() for k, v in f.items()}, i.decode()) for i, f in stream]
    recorded = [e.usage for e in entries if isinstance(e, LedgerEntry) and e.usage is not None]
    assert [(u.output_tokens, u.estimated) for u in recorded] == [(1, True)]  # the record counts what was charged


async def test_hung_upstream_after_client_left_is_given_up_and_estimated(make_customer, proxy_url, upstream, ledger):
    customer = await make_customer("starter")
    await _open_and_drop(proxy_url, customer.api_key, {"x-mock-scenario": "hang"})
    acct = await settled(ledger, customer.user_id)
    assert acct.held == 0 and acct.open_holds == 0
    # two chunks arrived before the hang: the role chunk ("") and "Hel"
    assert acct.balance == ALLOWANCE["starter"] - _estimate_micro(upstream.app[RECEIVED][-1].body, 3)


async def test_unreachable_upstream_gives_502_and_releases_the_hold(make_customer, start_proxy, ledger):
    proxy = await start_proxy(upstream_urls={"openai": "http://127.0.0.1:9"}, database=False)  # nothing listens on port 9
    customer = await make_customer("starter")
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=customer.api_key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as err:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 502 and err.value.code == "upstream_unreachable"
    acct = await settled(ledger, customer.user_id)
    assert (acct.balance, acct.held, acct.requests) == (ALLOWANCE["starter"], 0, 0)


def _usage(customer: Customer, tokens: int, estimated: bool = False) -> UsageEvent:
    """What the charge of a gpt-4o-mini request by ``customer`` records."""
    return UsageEvent(
        key_id=customer.key_id, provider="openai", model="gpt-4o-mini", tier="starter", input_tokens=tokens, estimated=estimated
    )


async def test_hold_of_a_crashed_request_expires_and_is_posted_at_its_last_progress_once(
    make_customer, ledger, usage_log, pool, accounts
):
    """A hold nobody renews any more (its proxy died) is charged what its last heartbeat
    recorded, marked estimated; the request finishing late after all is not charged again."""
    customer = await make_customer("starter")
    tiers = accounts.config.tiers
    starter = tiers.tiers["starter"]
    hold = Hold(new_id("hold"), customer.user_id, 5_000)
    first = progress_record(120, _usage(customer, tokens=800, estimated=True))
    admitted = await ledger.admit(
        hold, tier="starter", limits=starter.limits, hold_ttl_ms=60_000, renewal=tiers.renewal, progress=first
    )
    assert (admitted.admitted, admitted.held) == (True, 5_000)
    assert await expire_holds(ledger) == 0  # alive: its expiry is a minute away

    beat = progress_record(310, _usage(customer, tokens=1_100, estimated=True))
    assert await ledger.heartbeat([(hold, beat)], hold_ttl_ms=1) == 1  # the last beat before the "crash"
    await asyncio.sleep(0.01)
    assert await expire_holds(ledger) == 1
    acct = await settled(ledger, customer.user_id)
    assert (acct.held, acct.open_holds, acct.balance, acct.tokens, acct.requests) == (0, 0, ALLOWANCE["starter"] - 310, 1_100, 1)
    assert await expire_holds(ledger) == 0

    # the "crashed" request turns out to have finished: it was charged once already
    late = await ledger.post(hold, cost=700, usage=_usage(customer, tokens=10), limits=starter.limits)
    assert late is not None and (late.duplicate, late.balance, late.held) == (True, ALLOWANCE["starter"] - 310, 0)
    assert await ledger.heartbeat([(hold, beat)], hold_ttl_ms=60_000) == 0  # nothing left to renew

    while await usage_log.drain_once():
        pass
    rows = await pool.fetch("SELECT kind, amount_micro FROM ledger WHERE user_id = $1", customer.user_id)
    assert sorted((r["kind"], r["amount_micro"]) for r in rows) == [("charge", -310), ("grant", ALLOWANCE["starter"])]
    usage = await pool.fetchrow(
        "SELECT cost_micro, estimated, input_tokens FROM usage_events WHERE user_id = $1", customer.user_id
    )
    assert tuple(usage) == (310, True, 1_100)


async def test_a_redis_blip_at_settlement_is_retried_and_charges_once(make_customer, ledger, accounts, monkeypatch):
    """The first settlement attempt runs but its reply is lost; the retry must not charge twice."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    import proxy.ledger.ledger as ledger_module

    customer = await make_customer("starter")
    tiers = accounts.config.tiers
    starter = tiers.tiers["starter"]
    hold = Hold(new_id("hold"), customer.user_id, 5_000)
    first = progress_record(100, _usage(customer, tokens=10, estimated=True))
    admitted = await ledger.admit(
        hold, tier="starter", limits=starter.limits, hold_ttl_ms=60_000, renewal=tiers.renewal, progress=first
    )
    assert admitted.admitted
    monkeypatch.setattr(ledger_module, "RESOLVE_RETRY_PAUSES", (0.01, None))
    script, attempts = ledger._resolve, []

    async def reply_lost_once(keys, args):
        result = await script(keys=keys, args=args)
        attempts.append(args[0])
        if len(attempts) == 1:
            raise RedisConnectionError("reply lost")
        return result

    ledger._resolve = reply_lost_once
    posted = await ledger.post(hold, cost=700, usage=_usage(customer, tokens=10), limits=starter.limits)
    assert attempts == ["post", "post"]
    assert (posted.duplicate, posted.balance, posted.held, posted.requests) == (False, ALLOWANCE["starter"] - 700, 0, 1)
    after = await account(ledger, customer.user_id)
    assert (after.balance, after.requests) == (ALLOWANCE["starter"] - 700, 1)


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
    after = await account(ledger, customer.user_id)
    assert (after.held, after.open_holds, after.requests) == (0, 0, 6)
    assert [await redis.zcard(k) for k in ledger.keys.holds_sets()] == [0] * len(ledger.keys.holds_sets())


async def test_a_lost_admission_reply_gives_503_and_releases_the_hold(make_customer, start_proxy, ledger):
    """The admission script ran but its reply was lost: the client is told to retry, nothing
    is forwarded, and the hold it placed is released at once, not after HOLD_TTL_SECONDS."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from proxy.state import GATE

    proxy = await start_proxy({"openai": openai_app()})
    gate = proxy.app[GATE]
    script = gate.ledger._admit

    async def reply_lost(keys, args):
        await script(keys=keys, args=args)
        raise RedisConnectionError("reply lost")

    gate.ledger._admit = reply_lost
    customer = await make_customer("starter")
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=customer.api_key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as err:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert (err.value.status_code, err.value.code) == (503, "ledger_unavailable")
    assert err.value.response.headers["x-should-retry"] == "true"
    assert not proxy.received("openai")
    acct = await settled(ledger, customer.user_id)
    assert (acct.balance, acct.held, acct.open_holds, acct.requests) == (ALLOWANCE["starter"], 0, 0, 0)


async def test_an_admission_that_never_reached_redis_releases_nothing(make_customer, start_proxy, ledger):
    """No connection opened: no hold can exist, so no void is sent or spooled (an outage
    would otherwise write one spool entry per refused request)."""
    from proxy.ledger.pipeline import NotSentError
    from proxy.state import GATE

    proxy = await start_proxy({"openai": openai_app()})
    gate = proxy.app[GATE]
    voids: list[Hold] = []

    async def never_sent(keys, args):
        raise NotSentError("cannot connect to Redis")

    async def void(hold, *, reason):
        voids.append(hold)

    gate.ledger._admit = never_sent
    gate.ledger.void = void
    customer = await make_customer("starter")
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=customer.api_key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as err:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert (err.value.status_code, err.value.code) == (503, "ledger_unavailable")
    await asyncio.sleep(0.1)
    assert voids == [] and not proxy.received("openai")


async def charged_once(ledger, user_id: str) -> bool:
    """The account has counted one request and has no open hold."""
    found = await account(ledger, user_id)
    return found.requests == 1 and found.open_holds == 0


async def test_client_leaving_before_the_headers_is_still_charged_the_real_usage(make_customer, proxy_url, ledger):
    customer = await make_customer("starter")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as http:
        with pytest.raises(asyncio.TimeoutError):  # gives up before the upstream's headers arrive
            await http.post(
                f"{proxy_url}/openai/v1/chat/completions",
                json=body,
                timeout=aiohttp.ClientTimeout(total=0.1),
                headers={"Authorization": f"Bearer {customer.api_key}", "x-mock-scenario": "late"},
            )
    # the proxy goes on after the client left: wait until it has admitted and settled the request
    await until(lambda: charged_once(ledger, customer.user_id), within=10, what="the request to be charged")
    acct = await settled(ledger, customer.user_id)
    assert (acct.held, acct.balance) == (0, ALLOWANCE["starter"] - 345)  # the usage the upstream reported


async def test_an_unexpected_error_while_relaying_releases_the_hold(make_customer, openai_client, ledger, monkeypatch):
    from proxy.providers.openai import OpenAIProvider

    def broken(*args, **kwargs):
        raise RuntimeError("request signing failed")

    monkeypatch.setattr(OpenAIProvider, "prepare", broken)
    customer = await make_customer("starter")
    with pytest.raises(openai.InternalServerError):
        client = openai_client(customer.api_key)
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    acct = await settled(ledger, customer.user_id, within=1)
    assert (acct.balance, acct.held, acct.open_holds) == (ALLOWANCE["starter"], 0, 0)
