"""Self-renewing cycles: a lapsed cycle is renewed by the next request, no cron job."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import yaml

from proxy.ledger import now_ms
from proxy.tiers import DAY_MS

from .support.accounts import account
from .support.money import ALLOWANCE


async def _lapse(ledger, user_id: str, end_ms: int) -> None:
    """Pretend the account's cycle ended at ``end_ms`` with part of it used."""
    await ledger.redis.hset(
        ledger.keys.account(user_id),
        mapping={
            "cycle_start": end_ms - 30 * DAY_MS,
            "cycle_end": end_ms,
            "tokens": 999,
            "requests": 7,
            "balance": 12_345,
        },
    )


async def test_lapsed_day_cycle_renews_on_the_next_request(make_customer, openai_client, ledger, usage_log, pool):
    customer = await make_customer("starter")
    ended = now_ms() - 45 * DAY_MS  # one and a half cycles ago
    await _lapse(ledger, customer.user_id, ended)
    await openai_client(customer.api_key).chat.completions.create(model="gpt-4o-mini", messages=[], max_tokens=5)
    renewed = await account(ledger, customer.user_id)
    # renewed to the cycle containing now: the second one after the old end
    assert renewed.cycle_start == ended + 30 * DAY_MS and renewed.cycle_end == ended + 60 * DAY_MS
    assert renewed.balance == ALLOWANCE["starter"] - 345
    assert (renewed.tokens, renewed.requests) == (1500, 1)
    while await usage_log.drain_once():
        pass
    reset = await pool.fetchrow(
        "SELECT amount_micro, balance_micro FROM ledger WHERE user_id = $1 AND kind = 'reset'", customer.user_id
    )
    assert tuple(reset) == (ALLOWANCE["starter"] - 12_345, ALLOWANCE["starter"])


class TestCalendarMonths:
    @pytest.fixture
    def config_files(self, config_files):
        _pricing, tiers = config_files
        data = yaml.safe_load(tiers.read_text())
        data["cycle"] = "calendar_month"
        tiers.write_text(yaml.safe_dump(data))
        return config_files

    async def test_calendar_month_cycles(self, make_customer, openai_client, ledger):
        customer = await make_customer("starter")
        now = datetime.now(UTC)
        month_start = datetime(now.year, now.month, 1, tzinfo=UTC)
        next_month = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
        first = await account(ledger, customer.user_id)
        assert first.cycle_end == int(next_month.timestamp() * 1000)  # the first cycle runs to the 1st

        await _lapse(ledger, customer.user_id, int(month_start.timestamp() * 1000) - 5 * DAY_MS)
        await openai_client(customer.api_key).chat.completions.create(model="gpt-4o-mini", messages=[], max_tokens=5)
        renewed = await account(ledger, customer.user_id)
        assert (renewed.cycle_start, renewed.cycle_end) == (
            int(month_start.timestamp() * 1000),
            int(next_month.timestamp() * 1000),
        )
        assert renewed.balance == ALLOWANCE["starter"] - 345
