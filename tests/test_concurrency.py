"""Hundreds of concurrent requests against a small balance: the ledger must add up exactly."""

from __future__ import annotations

import asyncio

import openai
import pytest
import yaml

from .support.accounts import account

REQUESTS = 300
START_BALANCE = 10_000  # µ$: room for at most 147 requests of 68 µ$
# gpt-4o-mini, 50 prompt + 100 output tokens: 50 × 0.15 + 100 × 0.6 = 67.5 µ$ → 68
USAGE = "prompt=50,completion=100,cached=0,reasoning=0"
COST = 68


@pytest.fixture(params=["strict", "lenient"])
def config_files(config_files, request):
    """The starter tier with the policy under test and no request-rate limits."""
    _pricing, tiers = config_files
    data = yaml.safe_load(tiers.read_text())
    starter = data["tiers"]["starter"]
    starter["admission"] = request.param
    for limit in ("rpm", "monthly_requests", "monthly_tokens"):
        starter.pop(limit, None)
    tiers.write_text(yaml.safe_dump(data))
    return config_files


async def _fire(client: openai.AsyncOpenAI) -> str:
    try:
        await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=100,
            extra_headers={"x-mock-usage": USAGE},
        )
        return "ok"
    except openai.PermissionDeniedError as exc:
        assert exc.code == "insufficient_credits"
        return "refused"


async def test_concurrent_requests_never_overspend(config_files, make_customer, openai_client, ledger, usage_log, pool):
    policy = yaml.safe_load(config_files[1].read_text())["tiers"]["starter"]["admission"]
    customer = await make_customer("starter", balance_micro=START_BALANCE)
    client = openai_client(customer.api_key)
    outcomes = await asyncio.gather(*(_fire(client) for _ in range(REQUESTS)))
    served = outcomes.count("ok")

    after = await account(ledger, customer.user_id)
    balance = after.balance
    assert balance == START_BALANCE - served * COST
    assert after.held == 0 and after.open_holds == 0
    assert after.requests == served
    assert outcomes.count("refused") == REQUESTS - served > 0
    if policy == "strict":
        assert balance >= 0
    else:
        # lenient admits while anything is left, so it can end below zero by less than one request
        assert balance > -COST

    while await usage_log.drain_once():
        pass
    rows = await pool.fetch("SELECT kind, amount_micro FROM ledger WHERE user_id = $1", customer.user_id)
    assert sum(r["amount_micro"] for r in rows) == balance
    assert sorted(r["amount_micro"] for r in rows if r["kind"] == "charge") == [-COST] * served
    used = await pool.fetchval("SELECT sum(cost_micro) FROM usage_events WHERE user_id = $1", customer.user_id)
    assert used == served * COST
