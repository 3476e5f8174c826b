"""The dashboard in headless Chromium (Playwright driving the system's /usr/bin/chromium):
log in, compare the figures on the page with the API's, open a user, and keep
screenshots in tests/artifacts/ to look at."""

from __future__ import annotations

import shutil
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest

from proxy.reconcile.report import Difference, Reconciliation, UsageKind
from proxy.reconcile.store import store as store_result

from .support import admin as db
from .support.admin import ADMIN_TOKEN, bearer
from .support.money import ALLOWANCE
from .support.servers import fresh_database

playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed (pip install playwright)")

CHROMIUM = Path("/usr/bin/chromium")
BROWSER = str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium"))
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).parent / "artifacts"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and not shutil.which("chromium"), reason="no system Chromium (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def dashboard_db(servers: tuple[str, str]):
    with fresh_database(servers[1]) as url:
        yield url


@pytest.fixture
def settings(settings, dashboard_db):
    return replace(settings, database_url=dashboard_db)


async def seed(accounts, usage_log, pool) -> list[str]:
    """Three sign-ups today, revenue today and yesterday, requests on three providers."""
    users = [
        (await accounts.create_user(f"{name}@example.com", tier))[0]
        for name, tier in (("ada", "professional"), ("bob", "starter"), ("cyd", "free"))
    ]
    ada, bob, cyd = users
    now = datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    today, yesterday = midnight + timedelta(minutes=1), midnight - timedelta(hours=12)
    async with pool.acquire() as conn:
        await db.invoice(conn, "in_t1", ada, "professional", "subscription_create", 9900, 317, today)
        await db.invoice(conn, "in_t2", bob, "starter", "subscription_create", 1900, 85, today, refunded=500)
        await db.invoice(conn, "in_y1", bob, "starter", "subscription_cycle", 1900, 85, yesterday)
        # the allowances they granted
        await db.ledger(conn, "inv_in_t1", ada, "reset", ALLOWANCE["professional"], ALLOWANCE["professional"], today)
        await db.ledger(conn, "inv_in_t2", bob, "reset", ALLOWANCE["starter"], ALLOWANCE["starter"], today)
        await db.usage(conn, ada, "professional", "openai", "gpt-4o", today, uncached=1200, output=300, cost=6_000)
        await db.usage(conn, ada, "professional", "anthropic", "claude-sonnet-4", today, uncached=900, output=700, cost=13_200)
        await db.usage(conn, bob, "starter", "google", "gemini-2.5-flash", today, uncached=400, output=100, cost=370)
        await db.usage(conn, cyd, "free", "openai", "gpt-4o-mini", today, uncached=100, output=20, cost=27)
        await db.usage(conn, ada, "professional", "openai", "gpt-4o", yesterday, uncached=100, output=10, cost=350)
    while await usage_log.drain_once():  # the sign-up grants reach the ledger table
        pass
    day = (now - timedelta(days=1)).date()
    output = Difference(day, "gpt-4o", UsageKind.OUTPUT_TOKENS, ours=1_000, theirs=1_050)
    kinds = (UsageKind.REQUESTS, UsageKind.OUTPUT_TOKENS, UsageKind.COST_MICRO)
    await store_result(pool, Reconciliation("openai", day, day, 4, kinds, (output,)), Decimal("0.01"))
    return users


async def test_dashboard_in_chromium(start_proxy, accounts, usage_log, pool):
    users = await seed(accounts, usage_log, pool)
    base = (await start_proxy(admin_token=ADMIN_TOKEN)).url
    async with aiohttp.ClientSession(headers=bearer()) as http:
        async with http.get(f"{base}/admin/api/figures?period=today") as resp:
            today = await resp.json()
        async with http.get(f"{base}/admin/api/figures?period=month") as resp:
            month = (await resp.json())["current"]
        async with http.get(f"{base}/admin/api/users/{users[0]}") as resp:
            ada = await resp.json()
    ARTIFACTS.mkdir(exist_ok=True)

    problems: list[str] = []
    failed: list[tuple[int, str]] = []
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=BROWSER, args=ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "console",
                lambda msg: (
                    msg.type == "error" and not msg.text.startswith("Failed to load resource") and problems.append(msg.text)
                ),
            )
            page.on("response", lambda response: response.status >= 400 and failed.append((response.status, response.url)))
            page.on("pageerror", lambda exc: problems.append(str(exc)))

            await page.goto(f"{base}/admin/")
            assert page.url == f"{base}/admin/login"
            await page.fill("#token", "not-it")
            await page.click("button[type=submit]")
            assert "not the admin token" in await page.inner_text(".error")
            await page.fill("#token", ADMIN_TOKEN)
            await page.click("button[type=submit]")
            await page.wait_for_selector("body[data-loaded=overview]")
            assert page.url == f"{base}/admin/"

            (cookie,) = [c for c in await page.context.cookies() if c["name"] == "costproxy_admin"]
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and ADMIN_TOKEN not in cookie["value"]

            async def figure(key: str) -> str:
                return await page.inner_text(f'[data-figure="{key}"] .value')

            current, change = today["current"], today["change"]
            assert current["accounts"]["signups"] == 3 and current["usage"]["requests"] == 4
            assert await figure("today.signups") == "3"
            assert await figure("today.requests") == str(current["usage"]["requests"])
            assert await figure("today.tokens") == f"{current['usage']['tokens']:,}"
            assert await figure("today.revenue") == "$" + current["revenue"]["net_usd"] == "$108.98"  # 11,800 − 402 − 500 ¢
            assert await figure("today.cost") == "$" + current["api_cost"]["usd"] == "$0.019597"
            assert await figure("today.profit") == "$" + current["profit"]["usd"]
            assert await figure("today.margin") == current["margin"]["pct"] + "%"
            assert change["requests"] == 3
            assert (await page.inner_text('[data-figure="today.requests"] .change')).startswith("+3 vs yesterday")
            assert await figure("month.revenue") == "$" + month["revenue"]["net_usd"]
            assert await figure("month.margin") == month["margin"]["pct"] + "%"
            assert await figure("month.churn") == (month["churn"]["rate_pct"] + "%" if month["churn"]["rate_pct"] else "—")
            assert await figure("month.arpu") == "$" + month["arpu"]["usd"]
            provider_rows = await page.locator("#provider-table tbody tr").all_inner_texts()
            providers = [p["provider"] for p in month["providers"]]
            assert [row.split("\t")[0] for row in provider_rows] == providers == ["anthropic", "google", "openai"]
            tier_rows = await page.locator("#tier-table tbody tr").all_inner_texts()
            assert [row.split("\t")[2] for row in tier_rows] == [str(t["users"]) for t in month["tiers"]]
            drawn = await page.evaluate(
                "['chart-budget', 'chart-tiers', 'chart-provider-requests', 'chart-provider-cost', 'chart-daily']"
                ".map((id) => Chart.getChart(id) !== undefined)"
            )
            assert drawn == [True] * 5
            (run,) = await page.locator("#reconcile-table tbody tr").all_inner_texts()
            cells = run.split("\t")
            assert (cells[0], cells[3], cells[4]) == ("openai", "4", "beyond 1.0000%")
            assert "output_tokens 4.7619%" in cells[5] and "cost_micro 0.0000%" in cells[5]  # |-50| of 1,050
            (difference,) = await page.locator("#reconcile-differences tbody tr").all_inner_texts()
            assert difference.split("\t")[2:] == ["gpt-4o", "output_tokens", "1,000", "1,050", "-4.7619%"]
            await page.screenshot(path=str(ARTIFACTS / "admin-dashboard.png"), full_page=True)

            await page.click("#nav-users")
            await page.wait_for_selector("body[data-loaded=users]")
            await page.fill("#user-q", "ada@")
            await page.click("#user-search button")
            await playwright_api.expect(page.locator("#users-table tbody tr")).to_have_count(1)  # no eval: the CSP forbids it
            await page.click(f'#users-table a[href="#/users/{users[0]}"]')
            await page.wait_for_selector("body[data-loaded=user]")
            balance = ada["account"]["balance"]
            assert balance == ALLOWANCE["professional"]
            assert await figure("user.balance") == f"${balance // 1_000_000}.{balance % 1_000_000:06d}"
            assert await figure("user.tier") == "professional"
            ledger_rows = await page.locator("#user-ledger tbody tr").all_inner_texts()
            assert any("first cycle allowance" in row for row in ledger_rows)
            assert await page.evaluate("Chart.getChart('chart-user-usage').data.datasets[0].data.reduce((a, b) => a + b, 0)") == 3
            await page.screenshot(path=str(ARTIFACTS / "admin-user.png"), full_page=True)

            # each charge links to its receipt (GET /admin/api/usage/{id})
            charges = [e for e in ada["ledger"] if e["kind"] == "charge"]
            assert len(charges) == 3 and await page.locator("#user-ledger a.receipt").count() == 3
            charge = charges[0]
            await page.click(f'#user-ledger a[href="#/receipts/{charge["id"].removeprefix("chg_")}"]')
            await page.wait_for_selector("body[data-loaded=receipt]")
            receipt_rows = dict(row.split("\t") for row in await page.locator("#receipt-table tbody tr").all_inner_texts())
            cost = -charge["amount_micro"]
            assert receipt_rows["Cost"].startswith(f"${cost // 1_000_000}.{cost % 1_000_000:06d} (")
            assert receipt_rows["Outcome"] == "charged"
        finally:
            await browser.close()
    assert problems == []  # no script errors, no CSP violations
    assert failed == [(401, f"{base}/admin/login")]  # only the wrong token
