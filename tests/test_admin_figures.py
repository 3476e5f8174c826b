"""Business figures on a data set small enough to work out by hand (March 2024, UTC).

Users and what happens to them (paid tiers: starter $19, professional $99, enterprise $499;
enterprise rolls unused credits over):

    u1  signup free 02-10, first invoice -> starter 03-05          (upgrade)
    u2  signup starter 01-15, renewal 03-01, cancels 03-20          (cancel: churn)
    u3  signup professional 02-01, renewal 03-02, cancels 04-05     (after the period)
    u4  signup free 03-10                                           (signup)
    u5  signup enterprise 02-20, renewal 03-03, downgrade to professional 03-15
    u6  signup starter 03-12, upgrade to professional 03-20         (signup, upgrade)

Paying at 03-01 00:00: u2, u3, u5 = 3. Paying at 04-01 00:00: u1, u3, u5, u6 = 4.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import aiohttp
import pytest

from proxy.reports import figures
from proxy.reports.periods import Period, between, day_of
from proxy.tiers import TiersFile

from .support import admin as db
from .support.admin import ADMIN_TOKEN, bearer
from .support.money import allowances
from .support.servers import fresh_database

TIERS = TiersFile.model_validate(
    {
        "default_tier": "free",
        "tiers": {
            "free": {"price_usd": 0, "monthly_credits": 50, "providers": ["openai"]},
            "starter": {"price_usd": 19, "providers": ["openai"]},
            "professional": {"price_usd": 99, "providers": ["openai"]},
            "enterprise": {"price_usd": 499, "rollover": True, "providers": ["openai"]},
        },
    }
)
#: the hand-made tiers' allowances in µ$ (the figures below are worked out from them)
ALLOWANCE = allowances(TIERS)
MARCH = between(date(2024, 3, 1), date(2024, 3, 31))


def at(month: int, day: int, hour: int = 12, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2024, month, day, hour, minute, second, tzinfo=UTC)


async def seed(conn: Any) -> None:
    await db.user(conn, "u1", "free", at(2, 10))
    await db.user(conn, "u2", "starter", at(1, 15))
    await db.user(conn, "u3", "professional", at(2, 1))
    await db.user(conn, "u4", "free", at(3, 10))
    await db.user(conn, "u5", "enterprise", at(2, 20))
    await db.user(conn, "u6", "starter", at(3, 12))
    await db.tier_change(conn, "u1", "free", "starter", "upgrade", at(3, 5))
    await db.tier_change(conn, "u2", "starter", "free", "cancel", at(3, 20))
    await db.tier_change(conn, "u5", "enterprise", "professional", "downgrade", at(3, 15))
    await db.tier_change(conn, "u6", "starter", "professional", "upgrade", at(3, 20))
    await db.tier_change(conn, "u3", "professional", "free", "cancel", at(4, 5))

    # invoices (cents): (id, user, tier, reason, paid, fee, when, refunded, disputed)
    for inv in [
        ("in_a", "u2", "starter", "subscription_cycle", 1900, 85, at(3, 1, 10), 0, 0),
        ("in_b", "u3", "professional", "subscription_cycle", 9900, 317, at(3, 2), 0, 0),
        ("in_c", "u1", "starter", "subscription_create", 1900, 85, at(3, 5), 1900, 0),
        ("in_d", "u5", "enterprise", "subscription_cycle", 49900, 1477, at(3, 3), 0, 0),
        ("in_e", "u6", "starter", "subscription_create", 1900, 85, at(3, 12), 0, 1900),
        ("in_h", "u6", "professional", "subscription_update", 6000, 204, at(3, 20), 0, 0),
        ("in_feb", "u3", "professional", "subscription_cycle", 9900, 317, at(2, 2), 0, 0),  # February
    ]:
        await db.invoice(conn, *inv[:7], refunded=inv[7], disputed=inv[8])

    # the credits those invoices granted, keyed inv_<invoice> as billing keys them (µ$)
    starter, professional, enterprise, free = (ALLOWANCE[t] for t in ("starter", "professional", "enterprise", "free"))
    await db.ledger(conn, "inv_in_a", "u2", "reset", starter - 1_000_000, starter, at(3, 1, 10))  # 1.0 $ left, not rolled over
    await db.ledger(conn, "inv_in_b", "u3", "reset", professional - 500_000, professional, at(3, 2))
    await db.ledger(conn, "inv_in_c", "u1", "reset", starter - free, starter, at(3, 5))  # free credits replaced
    await db.ledger(conn, "inv_in_d", "u5", "reset", enterprise, enterprise + 2_000_000, at(3, 3))  # rollover of 2 $
    await db.ledger(conn, "inv_in_e", "u6", "reset", starter, starter, at(3, 12))
    await db.ledger(conn, "inv_in_h", "u6", "grant", 8_000_000, starter - 800_000 + 8_000_000, at(3, 20))  # prorated, 0.8 $ used
    await db.ledger(conn, "inv_in_feb", "u3", "reset", professional, professional, at(2, 2))  # February
    await db.ledger(conn, "grant_goodwill", "u3", "grant", 1_000_000, professional + 1_000_000, at(3, 4))  # not an allowance
    await db.ledger(conn, "reset_free_u4", "u4", "reset", free, free, at(3, 10))  # free tier

    # requests (cost in µ$)
    await db.usage(conn, "u2", "starter", "openai", "gpt-4o-mini", at(3, 2), uncached=1000, cached=200, output=300, cost=345)
    await db.usage(
        conn,
        "u3",
        "professional",
        "anthropic",
        "claude-sonnet-4",
        at(3, 3),
        uncached=5000,
        cache_write=1000,
        output=2000,
        cost=123_456,
    )
    await db.usage(conn, "u3", "professional", "openai", "gpt-4o", at(3, 3), uncached=2000, output=500, cost=10_000)
    await db.usage(conn, "u4", "free", "openai", "gpt-4o-mini", at(3, 10), uncached=100, output=50, cost=45)
    await db.usage(
        conn, "u5", "enterprise", "google", "gemini-2.5-pro", at(3, 31, 23, 59, 59), uncached=10_000, output=1000, cost=2_000_000
    )
    await db.usage(conn, "u6", "starter", "openai", "gpt-4o-mini", at(4, 1, 0, 0, 0), uncached=10, cost=999_999)  # April
    await db.usage(conn, "u1", "starter", "openai", "gpt-4o-mini", at(2, 29, 23, 59, 59), uncached=10, cost=777)  # February


@pytest.fixture(scope="module")
def figures_db(servers: tuple[str, str]):
    with fresh_database(servers[1], seed) as url:
        yield url


@pytest.fixture
def settings(settings, figures_db, tmp_path):
    """The suite's settings on the hand-made database and tiers."""
    from dataclasses import replace

    tiers = tmp_path / "admin-tiers.yaml"
    tiers.write_text(TIERS.model_dump_json())  # JSON is YAML
    return replace(settings, database_url=figures_db, tiers_file=tiers)


async def test_march_figures_to_the_cent(pool):
    f = await figures.compute(pool, MARCH, TIERS)

    assert f["accounts"] == {
        "signups": 2,  # u4, u6
        "upgrades": 2,  # u1, u6
        "downgrades": 1,  # u5
        "cancellations": 1,  # u2 (u3 cancels in April)
        "paying_users_start": 3,  # u2, u3, u5
        "paying_users_end": 4,  # u1, u3, u5, u6
    }
    # 5 requests in March; input counts cached tokens and cache writes too
    assert f["usage"] == {
        "requests": 5,
        "input_tokens": 1200 + 6000 + 2000 + 100 + 10_000,
        "output_tokens": 3850,
        "tokens": 23_150,
    }

    # gross 1900+9900+1900+49900+1900+6000 = 71,500 ¢; fees 85+317+85+1477+85+204 = 2,253 ¢
    # net = 71,500 − 2,253 − 1,900 refunded − 1,900 disputed = 65,447 ¢
    assert f["revenue"] == {
        "invoices": 6,
        "gross_cents": 71_500,
        "stripe_fee_cents": 2_253,
        "refunded_cents": 1_900,
        "disputed_cents": 1_900,
        "net_cents": 65_447,
        "gross_usd": "715.00",
        "net_usd": "654.47",
    }
    # 345 + 123,456 + 10,000 + 45 + 2,000,000 = 2,133,846 µ$; the free tier's 45 µ$ is outside the budget
    assert f["api_cost"] == {"micro": 2_133_846, "usd": "2.133846", "paid_tiers_micro": 2_133_801, "free_tiers_micro": 45}
    # 654,470,000 µ$ net revenue − 2,133,846 µ$
    assert f["profit"] == {"micro": 652_336_154, "usd": "652.336154"}
    # 652,336,154 / 654,470,000 = 99.6739…%
    assert f["margin"] == {"pct": "99.67", "target_pct": "80.00", "vs_target_pct": "19.67"}
    # 654,470,000 µ$ / 4 paying users = $163.6175 -> $163.62
    assert f["arpu"] == {"usd": "163.62", "paying_users": 4}
    assert f["churn"] == {"cancellations": 1, "paying_users_start": 3, "rate_pct": "33.33"}
    # allowances of March's paid invoices: 3.8 + 19.8 + 3.8 + 99.8 (2 $ rolled over is not new) + 3.8 + 8.0 = 139 $
    assert f["budget"] == {
        "allocated_micro": 139_000_000,
        "allocated_usd": "139.000000",
        "used_micro": 2_133_801,
        "used_usd": "2.133801",
        "unused_micro": 136_866_199,
        "unused_usd": "136.866199",
        "used_pct": "1.54",  # 2,133,801 / 139,000,000 = 1.5351…%
    }
    model = f["margin_model"]
    assert model["planned_profit_micro"] == 654_470_000 - 139_000_000 == 515_470_000
    assert model["planned_margin_pct"] == "78.76"  # 515,470,000 / 654,470,000 = 78.761…%
    # the margin model adds up: planned profit + unused allowance − free-tier cost = profit
    planned, unused = model["planned_profit_micro"], model["unused_allowance_micro"]
    assert planned + unused - model["free_tier_cost_micro"] == model["profit_micro"]
    # tiers now (u3 cancelled in April): free u2 u3 u4, starter u1, professional u5 u6
    assert [(t["tier"], t["users"], t["paid"]) for t in f["tiers"]] == [
        ("free", 3, False),
        ("starter", 1, True),
        ("professional", 2, True),
        ("enterprise", 0, True),
    ]
    assert f["providers"] == [
        {
            "provider": "anthropic",
            "requests": 1,
            "tokens": 8000,
            "cost_micro": 123_456,
            "cost_usd": "0.123456",
            "request_share_pct": "20.00",
            "cost_share_pct": "5.79",
        },  # 123,456 / 2,133,846 = 5.7856…%
        {
            "provider": "google",
            "requests": 1,
            "tokens": 11_000,
            "cost_micro": 2_000_000,
            "cost_usd": "2.000000",
            "request_share_pct": "20.00",
            "cost_share_pct": "93.73",
        },  # 93.7275…%
        {
            "provider": "openai",
            "requests": 3,
            "tokens": 1500 + 2500 + 150,
            "cost_micro": 10_390,
            "cost_usd": "0.010390",
            "request_share_pct": "60.00",
            "cost_share_pct": "0.49",
        },  # 0.4869…%
    ]


async def test_a_day_compared_with_the_day_before(pool):
    report = await figures.report(pool, day_of(date(2024, 3, 3)), TIERS)
    assert report["previous"]["period"]["from"] == "2024-03-02"
    # 03-03: u3's two requests (133,456 µ$) and u5's renewal (49,900 − 1,477 = 48,423 ¢)
    # 03-02: u2's request (345 µ$) and u3's renewal (9,900 − 317 = 9,583 ¢)
    assert report["current"]["usage"]["requests"] == 2 and report["previous"]["usage"]["requests"] == 1
    change = report["change"]
    assert change["requests"] == 1
    assert change["api_cost_micro"] == 133_456 - 345 and change["api_cost_usd"] == "0.133111"
    assert change["net_revenue_cents"] == 48_423 - 9_583 and change["net_revenue_usd"] == "388.40"
    # profit 484,230,000 − 133,456 vs 95,830,000 − 345
    assert change["profit_micro"] == (484_230_000 - 133_456) - (95_830_000 - 345)
    # margins 99.97% (484,096,544 / 484,230,000 = 99.9724…) and 99.99% (95,829,655 / 95,830,000 = 99.9996…, 100.00 rounded)
    assert report["current"]["margin"]["pct"] == "99.97" and report["previous"]["margin"]["pct"] == "100.00"
    assert change["margin_pct_points"] == "-0.03"


async def test_a_day_without_revenue_has_no_margin(pool):
    f = await figures.compute(pool, day_of(date(2024, 3, 10)), TIERS)  # u4's free request only
    assert f["revenue"]["net_cents"] == 0 and f["api_cost"]["micro"] == 45
    assert f["profit"]["micro"] == -45 and f["profit"]["usd"] == "-0.000045"
    assert f["margin"]["pct"] is None and f["arpu"]["paying_users"] == 4


async def test_figures_api_and_openapi_schema(start_proxy):
    from jsonschema import Draft202012Validator

    base = (await start_proxy(admin_token=ADMIN_TOKEN)).url
    async with aiohttp.ClientSession(headers=bearer()) as http:
        async with http.get(
            f"{base}/admin/api/figures", params={"period": "range", "from": "2024-03-01", "to": "2024-03-31"}
        ) as resp:
            assert resp.status == 200
            report = await resp.json()
        async with http.get(f"{base}/admin/openapi.json") as resp:
            document = await resp.json()
        async with http.get(
            f"{base}/admin/api/figures", params={"period": "range", "from": "2024-03-31", "to": "2024-03-01"}
        ) as resp:
            assert resp.status == 400
            assert "to must not be before from" in (await resp.json())["error"]["message"]
    assert report["current"]["revenue"]["net_usd"] == "654.47"
    assert report["current"]["margin"]["pct"] == "99.67"
    assert report["previous"]["period"] == {
        "name": "previous",
        "from": "2024-01-30",
        "to": "2024-02-29",
        "start": "2024-01-30T00:00:00Z",
        "end": "2024-03-01T00:00:00Z",
    }
    # February: u3's invoice 9,900 − 317 ¢ and u1's request of 777 µ$
    assert report["previous"]["revenue"]["net_cents"] == 9_583 and report["previous"]["api_cost"]["micro"] == 777
    validator = Draft202012Validator({"$ref": "#/components/schemas/FiguresReport", "components": document["components"]})
    assert list(validator.iter_errors(report)) == []
    # the schema is strict: a figure it does not describe would fail
    report["current"]["usage"]["surprise"] = 1
    assert list(validator.iter_errors(report))


def test_periods():
    assert Period("range", date(2024, 3, 1), date(2024, 4, 1)) == MARCH
    from proxy.reports.periods import month_of

    assert month_of(date(2024, 2, 29)).previous() == Period("month", date(2024, 1, 1), date(2024, 2, 1))
    assert month_of(date(2024, 12, 31)).end == date(2025, 1, 1)


async def test_business_gauges_export_this_months_margin(pool, monkeypatch):
    from proxy.reports import gauges

    monkeypatch.setattr(gauges.periods, "utc_today", lambda: date(2024, 3, 15))
    month = await gauges.refresh(pool, TIERS)
    assert month["period"]["from"] == "2024-03-01"
    assert gauges.MARGIN._value.get() == pytest.approx(0.9967)
    assert gauges.MARGIN_TARGET._value.get() == pytest.approx(0.80)
    assert gauges.NET_REVENUE._value.get() == 654_470_000 and gauges.API_COST._value.get() == 2_133_846
    monkeypatch.setattr(gauges.periods, "utc_today", lambda: date(2023, 1, 15))  # a month without revenue
    await gauges.refresh(pool, TIERS)
    assert gauges.MARGIN._value.get() != gauges.MARGIN._value.get()  # NaN: the alert cannot fire
