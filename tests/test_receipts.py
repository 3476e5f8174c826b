"""Receipts: every metered answer carries its request id, and ``GET /api/usage/{id}`` returns
what that request used, the unit prices applied and what it cost, equal to its charge."""

from __future__ import annotations

import asyncio
import hashlib
import math
from decimal import Decimal
from typing import Any

import aiohttp
import anthropic
import openai
from multidict import CIMultiDict

from proxy.forward import REQUEST_ID_HEADER
from proxy.ledger import new_id, shard_of
from proxy.receipts import charge_id

from .support.accounts import Customer, account, settled
from .support.admin import ADMIN_TOKEN, bearer
from .support.holds import running_request
from .support.mock_anthropic import anthropic_app
from .support.mock_upstreams import openai_app
from .support.money import ALLOWANCE

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def version_of(settings) -> str:
    return hashlib.sha256(settings.pricing_file.read_bytes()).hexdigest()[:16]


async def get_receipt(base: str, key: str, request_id: str) -> tuple[int, dict[str, Any], CIMultiDict[str]]:
    auth = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as http, http.get(f"{base}/api/usage/{request_id}", headers=auth) as resp:
        return resp.status, await resp.json(), CIMultiDict(resp.headers)


async def receipt_when_settled(base: str, key: str, request_id: str) -> dict[str, Any]:
    """The receipt, asking again while it is ``receipt_pending`` (as a client would)."""
    for _ in range(100):
        status, body, headers = await get_receipt(base, key, request_id)
        if status != 404 or body["error"]["code"] != "receipt_pending":
            assert status == 200, body
            return body
        assert headers["retry-after"] == "1"
        await asyncio.sleep(0.05)
    raise AssertionError("the receipt stayed pending")


async def charge_of(pool, usage_log, request_id: str) -> int:
    """The charge the ledger (in Postgres) holds for the request, µ$."""
    while await usage_log.drain_once():
        pass
    return -await pool.fetchval("SELECT amount_micro FROM ledger WHERE id = $1 AND kind = 'charge'", charge_id(request_id))


async def test_receipts_of_a_stream_and_a_whole_answer_equal_their_charges(
    start_proxy, make_customer, ledger, usage_log, pool, settings
):
    proxy = await start_proxy({"openai": openai_app()}, admin_token=ADMIN_TOKEN)
    customer: Customer = await make_customer("starter")
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=customer.api_key, max_retries=0)
    version = version_of(settings)

    # a whole answer at priority prices: 1,000 uncached × 0.25 + 200 cached × 0.125 + 300 out × 1 = 575 µ$
    raw = await client.chat.completions.with_raw_response.create(**CHAT, service_tier="priority")
    whole_id = raw.headers[REQUEST_ID_HEADER]
    raw.parse()
    receipt = await receipt_when_settled(proxy.url, customer.api_key, whole_id)  # before the usage log wrote it
    balance = (await account(ledger, customer.user_id)).balance
    assert receipt["cost_micro_usd"] == 575 == ALLOWANCE["starter"] - balance
    assert (receipt["cost_credits"], receipt["cost_usd"]) == ("0.0575", "0.000575")
    assert receipt["balance_after_micro_usd"] == balance
    assert (receipt["outcome"], receipt["provider"], receipt["model"], receipt["stream"]) == (
        "charged",
        "openai",
        "gpt-4o-mini",
        False,
    )
    assert (receipt["price_version"], receipt["service_tier"], receipt["price_set"]) == (version, "priority", "priority")
    assert receipt["unit_prices_usd_per_1m"] == {
        "input": "0.250000",
        "cached_input": "0.125000",
        "cache_write": "0.250000",
        "cache_write_1h": "0.250000",
        "output": "1.000000",
    }
    assert receipt["tokens"] == {
        "input": 1000,
        "cached_input": 200,
        "cache_write": 0,
        "cache_write_1h": 0,
        "output": 300,
        "reasoning": 50,
    }
    assert receipt["estimated"] is False

    # a stream: the id is in the headers, before its cost is known
    async with client.chat.completions.with_streaming_response.create(**CHAT, stream=True) as streamed:
        stream_id = streamed.headers[REQUEST_ID_HEADER]
        async for _ in streamed.iter_lines():
            pass
    assert stream_id != whole_id
    streamed_receipt = await receipt_when_settled(proxy.url, customer.api_key, stream_id)
    assert (streamed_receipt["cost_micro_usd"], streamed_receipt["stream"], streamed_receipt["price_set"]) == (
        345,
        True,
        "standard",
    )
    assert streamed_receipt["unit_prices_usd_per_1m"]["input"] == "0.150000"
    assert streamed_receipt["balance_after_micro_usd"] == (await settled(ledger, customer.user_id)).balance == balance - 345

    # once in Postgres the receipt is the same, and equals the ledger's charge to the µ$
    assert await charge_of(pool, usage_log, whole_id) == 575 and await charge_of(pool, usage_log, stream_id) == 345
    assert await receipt_when_settled(proxy.url, customer.api_key, whole_id) == receipt
    assert await receipt_when_settled(proxy.url, customer.api_key, stream_id) == streamed_receipt
    assert await pool.fetchval("SELECT price_version FROM usage_events WHERE id = $1", charge_id(stream_id)) == version

    # the operator sees any user's receipt through the admin API
    async with aiohttp.ClientSession(headers=bearer()) as http:
        async with http.get(f"{proxy.url}/admin/api/usage/{stream_id}") as resp:
            assert resp.status == 200 and await resp.json() == streamed_receipt
        for unknown in (new_id("hold"), f"hold_{'0' * 17}"):  # well-formed, and not
            async with http.get(f"{proxy.url}/admin/api/usage/{unknown}") as resp:
                assert resp.status == 404


async def test_other_accounts_unknown_and_malformed_ids_are_one_404_and_a_running_request_is_pending(
    start_proxy, make_customer, ledger
):
    proxy = await start_proxy({"openai": openai_app()})
    ada, bob = await make_customer("starter"), await make_customer("starter")
    body = {**CHAT, "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{proxy.url}/openai/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {ada.api_key}", "x-mock-scenario": "slow", "x-mock-chunks": "12"},
        ) as resp:
            ada_id = resp.headers[REQUEST_ID_HEADER]
            await resp.content.readany()
            # still running: pending for its owner, unknown for anyone else
            status, pending, headers = await get_receipt(proxy.url, ada.api_key, ada_id)
            assert (status, pending["error"]["code"], headers["retry-after"]) == (404, "receipt_pending", "1")
            running_for_bob = await get_receipt(proxy.url, bob.api_key, ada_id)
            await resp.read()
        await receipt_when_settled(proxy.url, ada.api_key, ada_id)
        answers = [
            running_for_bob,
            await get_receipt(proxy.url, bob.api_key, ada_id),  # settled, but Ada's
            await get_receipt(proxy.url, bob.api_key, new_id("hold")),  # well-formed, unknown
            await get_receipt(proxy.url, bob.api_key, "hold_" + "ab" * 12),  # malformed: no admission time
            await get_receipt(proxy.url, bob.api_key, "not-an-id"),
            await get_receipt(proxy.url, bob.api_key, charge_id(ada_id)),  # the ledger entry's id is not the request's
        ]
    assert {(status, str(body)) for status, body, _ in answers} == {
        (404, str({"error": {"code": "not_found", "message": "No request of yours has this id."}}))
    }
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/api/usage/{ada_id}") as resp:
        assert resp.status == 401  # the caller's own key, as for /api/credits


async def test_a_running_request_of_another_account_of_the_shard_is_not_found(start_proxy, make_customer, ledger, accounts):
    """Pending is read from the hold's progress record, which the accounts of a shard share:
    it counts only for the owner of the record's key."""
    proxy = await start_proxy({"openai": openai_app()})
    ada = await make_customer("starter")
    bob = await make_customer("starter")
    while shard_of(bob.user_id) != shard_of(ada.user_id):
        bob = await make_customer("starter")
    hold = await running_request(ledger, accounts.config.tiers, ada.user_id, ada.key_id, "starter")
    status, body, _ = await get_receipt(proxy.url, ada.api_key, hold.id)
    assert (status, body["error"]["code"]) == (404, "receipt_pending")
    status, body, _ = await get_receipt(proxy.url, bob.api_key, hold.id)
    assert (status, body["error"]["code"]) == (404, "not_found")
    await ledger.void(hold, reason="test")
    receipt = await receipt_when_settled(proxy.url, ada.api_key, hold.id)
    assert (receipt["id"], receipt["outcome"], receipt["cost_micro_usd"]) == (hold.id, "voided", 0)
    status, body, _ = await get_receipt(proxy.url, bob.api_key, hold.id)
    assert (status, body["error"]["code"]) == (404, "not_found")


async def test_a_voided_request_has_a_receipt_that_costs_nothing(start_proxy, make_customer, ledger):
    proxy = await start_proxy({"openai": openai_app()})
    customer = await make_customer("starter")
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=customer.api_key, max_retries=0)
    try:
        await client.chat.completions.create(**CHAT, extra_headers={"x-mock-scenario": "error-500"})
        raise AssertionError("the upstream's 500 was not relayed")
    except openai.InternalServerError as exc:
        request_id = exc.response.headers[REQUEST_ID_HEADER]
    receipt = await receipt_when_settled(proxy.url, customer.api_key, request_id)
    assert (receipt["outcome"], receipt["void_reason"], receipt["cost_micro_usd"]) == ("voided", "upstream_500", 0)
    assert receipt["balance_after_micro_usd"] == ALLOWANCE["starter"] == (await account(ledger, customer.user_id)).balance
    # a refusal is no request: it has no id
    broke = await make_customer("starter", balance_micro=0)
    refused = openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=broke.api_key, max_retries=0)
    try:
        await refused.chat.completions.create(**CHAT)
        raise AssertionError("admitted without credits")
    except openai.PermissionDeniedError as exc:
        assert REQUEST_ID_HEADER not in exc.response.headers


async def test_a_receipts_lines_add_up_to_its_cost_with_cache_writes_of_both_durations(start_proxy, make_customer):
    """Anthropic bills 5-minute and 1-hour cache writes at different prices: the receipt lists
    each with its price, and tokens × unit prices, rounded up once, is the charge."""
    proxy = await start_proxy({"anthropic": anthropic_app()})
    customer = await make_customer("professional")
    client = anthropic.AsyncAnthropic(base_url=f"{proxy.url}/anthropic", api_key=customer.api_key, max_retries=0)
    raw = await client.messages.with_raw_response.create(
        model="claude-opus-5-5",
        max_tokens=100,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-mock-usage": "prompt=100,cached=50,write5m=30,write1h=20,completion=10"},
    )
    receipt = await receipt_when_settled(proxy.url, customer.api_key, raw.headers[REQUEST_ID_HEADER])
    tokens, prices = receipt["tokens"], receipt["unit_prices_usd_per_1m"]
    assert tokens == {"input": 100, "cached_input": 50, "cache_write": 30, "cache_write_1h": 20, "output": 10, "reasoning": 0}
    assert (prices["cache_write"], prices["cache_write_1h"]) == ("5.000000", "8.000000")
    micro = sum(Decimal(tokens[kind]) * Decimal(prices[kind]) for kind in prices)  # $ per 1M tokens = µ$ per token
    assert receipt["cost_micro_usd"] == math.ceil(micro) == 920  # 400 + 10 + 150 + 160 + 200
