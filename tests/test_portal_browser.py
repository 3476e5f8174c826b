"""The subscriber's whole story in headless Chromium (Playwright driving the system's
Chromium), against the local fake Stripe, a local SMTP server and a mock OpenAI upstream:
sign up by e-mail link, copy the first key, call the proxy with the ``openai`` SDK, see the
request and its cost, subscribe to Starter through (fake) Checkout and its signed webhook,
upgrade to Professional and see the prorated credits, revoke the key and see the SDK
refused. Screenshots of every page go to tests/artifacts/portal-*.png."""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import openai
import pytest

from proxy.money import MICRO_PER_CREDIT, micro_usd

from .support.fake_stripe import CALLS, DAY, event, invoice, line, subscription_obj, with_fake_stripe
from .support.mock_upstreams import openai_app
from .support.money import ALLOWANCE
from .support.portal_checkout import CHECKOUT_HOST, FakeCheckout
from .support.portal_client import link_for
from .support.servers import fresh_database

playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed (pip install playwright)")

CHROMIUM = Path("/usr/bin/chromium")
BROWSER = str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"
STARTER, PRO = "price_starter_monthly", "price_professional_monthly"
MONTH = 30 * DAY
#: starter -> professional with 15 of 30 days left: half the allowances' difference
PRORATED = (ALLOWANCE["professional"] - ALLOWANCE["starter"]) // 2

#: every visible form field has a label, every table column a header, every view one h1
LABELLED = """[...document.querySelectorAll("input:not([type=hidden])")].every((i) => i.labels.length > 0)
  && [...document.querySelectorAll("th")].every((th) => th.textContent.trim() !== "")
  && document.querySelectorAll("h1:not([hidden] h1)").length === 1"""

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and not shutil.which("chromium"), reason="no system Chromium (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def story_db(servers):
    """A database of the story's own: the sign-in limits count every link asked from
    127.0.0.1, and other tests ask for many."""
    with fresh_database(servers[1]) as url:
        yield url


@pytest.fixture
def settings(settings, smtp, fake_stripe, story_db):
    smtp_url = f"smtp://127.0.0.1:{smtp[1]}"
    return replace(with_fake_stripe(settings, fake_stripe), database_url=story_db, smtp_url=smtp_url, portal_enabled=True)


def credits(micro: int) -> str:
    """Credits as the portal shows them: exact, with thousands separators."""
    whole, fraction = divmod(micro, MICRO_PER_CREDIT)
    return f"{whole:,}.{fraction:04d}"


async def drained(usage_log) -> None:
    """Ledger and usage events reach Postgres (the worker's job)."""
    while await usage_log.drain_once():
        pass


async def test_the_subscriber_story_in_chromium(start_proxy, smtp, deliver, fake_stripe, stripe_state, usage_log, pool):
    proxy = await start_proxy({"openai": openai_app()})
    base = proxy.url
    start = int(time.time()) - 15 * DAY  # the subscription's period is half over when the upgrade comes
    checkout = FakeCheckout(fake_stripe.app[CALLS], stripe_state, deliver, base, start, start + MONTH)
    ARTIFACTS.mkdir(exist_ok=True)
    problems: list[str] = []

    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=BROWSER, args=ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(10_000)
            page.on("console", lambda msg: msg.type == "error" and problems.append(msg.text))
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            await page.route(CHECKOUT_HOST + "**", checkout.handle)

            async def shot(name: str) -> None:
                assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), f"{name} is too wide"
                await page.screenshot(path=str(ARTIFACTS / f"portal-{name}.png"), full_page=True)

            async def view(name: str) -> None:
                await page.goto(f"{base}/portal/#{name}")
                await page.wait_for_selector(f"body[data-loaded={name}]")

            async def figure(name: str) -> str:
                return await page.inner_text(f'[data-figure="{name}"] .value')

            # sign up: the keyboard alone gets a link sent
            await page.goto(f"{base}/portal/")
            assert page.url == f"{base}/portal/sign-in"
            await shot("sign-in")
            assert await page.evaluate(LABELLED)
            await page.keyboard.type("ada@example.com")  # the address field has the focus
            await page.keyboard.press("Enter")
            await page.wait_for_selector("#message:has-text('sign-in link is on its way')")
            await page.goto(f"{base}/portal/link?token={await link_for(smtp[0], 'ada@example.com')}")
            await page.get_by_role("button", name="Sign in").click()
            api_key = await page.get_by_label("Your API key").input_value()
            assert api_key.startswith("cpk-")
            await shot("welcome")

            # the key works with the official SDK
            sdk = openai.AsyncOpenAI(base_url=f"{base}/openai/v1", api_key=api_key, max_retries=0)
            await sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
            await drained(usage_log)
            cost = await pool.fetchval(
                "SELECT cost_micro FROM usage_events WHERE provider = 'openai' AND user_id ="
                " (SELECT id FROM users WHERE email = 'ada@example.com')"
            )
            assert cost == 345  # gpt-4o-mini at the mock's usage: 1,000 + 200 cached input, 300 output tokens

            await page.get_by_role("link", name="Go to your account").click()
            await page.wait_for_selector("body[data-loaded=overview]")
            assert await figure("tier") == "free"
            assert await figure("credits") == credits(ALLOWANCE["free"] - cost)
            (row,) = await page.locator("#recent tbody tr").all_inner_texts()
            assert "openai/gpt-4o-mini" in row and "$" + micro_usd(cost) in row
            assert await page.evaluate("Chart.getChart('chart-usage').data.datasets[0].label") == "gpt-4o-mini"
            assert await page.get_attribute("#bar-requests", "value") == "1"
            assert await page.inner_text('[data-meter="credits"] .note') == f"{credits(cost)} of {credits(ALLOWANCE['free'])}"
            await shot("overview")
            await page.get_by_role("link", name="Receipt of the request").click()
            await page.wait_for_selector("body[data-loaded=receipt]")
            assert "$" + micro_usd(cost) in await page.inner_text("#receipt")
            await shot("receipt")

            # subscribe to starter through Checkout; its webhook arrives while the browser is away
            await view("plan")
            await shot("plan")
            await page.get_by_role("button", name="Subscribe: starter").click()
            await page.get_by_role("button", name="Pay $19.00").click()
            await page.wait_for_selector("body[data-loaded=plan]")
            assert await page.inner_text('[data-tier="starter"]') and "Your current plan" in await page.inner_text(
                '[data-tier="starter"]'
            )
            await view("overview")
            assert await figure("tier") == "starter"
            assert await figure("credits") == credits(ALLOWANCE["starter"])  # the first invoice sets the allowance
            assert await figure("cycle") == datetime.fromtimestamp(start + MONTH, UTC).strftime("%Y-%m-%d %H:%M")
            await shot("subscribed")

            # upgrade: the prorated amount is shown before anything is charged
            stripe_state.preview_amount = 4000
            await view("plan")
            await page.get_by_role("button", name="Upgrade: professional").click()
            await page.wait_for_selector("#confirm-text:has-text('$40.00')")
            assert not [c for c in fake_stripe.app[CALLS] if c.method == "POST" and c.path.startswith("/v1/subscriptions/")]
            await shot("upgrade-confirm")
            await page.get_by_role("button", name="Confirm").click()
            await page.wait_for_selector("#plan-note:has-text('Upgrade to professional requested')")
            user_id = await pool.fetchval("SELECT id FROM users WHERE email = 'ada@example.com'")
            sub, customer, t_up = f"sub_{user_id}", f"cus_{user_id}", start + 15 * DAY
            upgrade = invoice(
                f"in_2_{user_id}",
                "subscription_update",
                [line(STARTER, t_up, start + MONTH, -950, proration=True), line(PRO, t_up, start + MONTH, 4950, proration=True)],
                t_up,
                user_id=user_id,
                sub=sub,
                customer=customer,
            )
            updated = subscription_obj(PRO, start, start + MONTH, user_id=user_id, sub=sub, customer=customer)
            assert await deliver(event("invoice.paid", upgrade, t_up), event("customer.subscription.updated", updated, t_up)) == [
                200,
                200,
            ]
            await drained(usage_log)
            await view("overview")
            assert await figure("tier") == "professional"
            assert await figure("credits") == credits(ALLOWANCE["starter"] + PRORATED)
            assert PRORATED == 800 * MICRO_PER_CREDIT
            credited = await page.locator("#credited tbody tr").all_inner_texts()
            assert "upgrade starter -> professional" in credited[0] and "+" + credits(PRORATED) in credited[0]
            assert "subscription_create" in credited[1] and "set to " + credits(ALLOWANCE["starter"]) in credited[1]
            await shot("upgraded")

            # revoke the key: the SDK is refused
            await view("keys")
            await page.get_by_role("button", name="Revoke key").click()
            await page.get_by_role("button", name="Revoke key").click()  # the second press confirms
            await page.wait_for_selector("#keys tbody tr:has-text('revoked')")
            await shot("keys")
            assert await page.evaluate(LABELLED)
            await asyncio.sleep(0.3)  # KEY_CACHE_SECONDS of the test proxy is 0.2
            with pytest.raises(openai.AuthenticationError) as refused:
                await sdk.chat.completions.create(model="gpt-4o-mini", messages=[], max_tokens=5)
            assert refused.value.status_code == 401

            # a key named like markup is shown as its text, never as markup
            hostile = '<img src=x onerror="document.title=1">'
            await page.fill("#key-name", hostile)
            await page.get_by_role("button", name="Create key").click()
            await page.locator("#keys tbody tr", has_text=hostile).wait_for()
            assert await page.locator("#keys img").count() == 0

            await view("sessions")
            assert "this browser" in await page.inner_text("#sessions tbody")
            assert "Chrome on Linux" in await page.inner_text("#sessions tbody")
            await shot("sessions")

            # a phone: nothing wider than the screen
            await page.set_viewport_size({"width": 390, "height": 844})
            for name in ("keys", "plan", "sessions", "overview"):
                await view(name)
                await shot(f"phone-{name}")

            await page.get_by_role("button", name="Sign out").click()
            await page.wait_for_url(f"{base}/portal/sign-in")
        finally:
            await browser.close()
    assert problems == []  # no script errors, no CSP violations
