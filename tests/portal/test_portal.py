"""The subscriber portal over HTTP: sign-in links (single use, 15 minutes, rate-limited,
silent about which addresses exist), sessions and CSRF, isolation between users, and the
plan calls through the billing service against the local fake Stripe."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import aiohttp
import openai
from redis.exceptions import ConnectionError as RedisConnectionError
from yarl import URL

from proxy import worker
from proxy.forward import REQUEST_ID_HEADER
from proxy.forwarded import parse_networks
from proxy.ledger import new_id
from proxy.portal.guard import COOKIE, PRE_COOKIE, STORE
from proxy.portal.signin import BAD_LINK, SENT, TOO_MANY
from proxy.portal.store import LINK_LIFETIME, RateLimits
from proxy.settings import Settings
from proxy.state import LEDGER

from ..support.fake_stripe import CALLS, event, invoice, line
from ..support.holds import running_request
from ..support.mock_upstreams import openai_app
from ..support.portal_client import PortalClient, link_for
from ..support.portal_state import STARTER, shift_clock, subscribed
from ..support.waiting import until


async def credits_of(base: str, api_key: str) -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{base}/api/credits", headers={"Authorization": f"Bearer {api_key}"}) as resp,
    ):
        return resp.status, await resp.json()


# sign-in --------------------------------------------------------------------------------
async def test_first_sign_in_creates_a_free_account_and_shows_its_key_once(proxy, browser, smtp, pool):
    first = await browser()
    key = await first.sign_in(smtp[0], "New.Person@Example.com")
    assert key is not None and key.startswith("cpk-")
    status, credits = await credits_of(proxy.url, key)
    assert (status, credits["tier"]) == (200, "free")
    user = await pool.fetchrow("SELECT id, email, tier FROM users WHERE id = $1", credits["user_id"])
    assert (user["email"], user["tier"]) == ("new.person@example.com", "free")
    assert await pool.fetchval("SELECT source FROM tier_changes WHERE user_id = $1", user["id"]) == "portal"

    again = await browser()
    assert await again.sign_in(smtp[0], "new.person@example.com") is None  # no second key shown
    status, overview = await again.api("GET", "overview")
    assert (status, overview["email"]) == (200, "new.person@example.com")
    status, keys = await again.api("GET", "keys")
    assert [k["key_prefix"] for k in keys] == [key[:10]]


async def test_a_link_signs_in_once(browser, smtp):
    client = await browser()
    await client.ask_link("once@example.com")
    token = await link_for(smtp[0], "once@example.com")
    assert (await client.use_link(token))[0] == 200
    thief = await browser()
    status, text = await thief.use_link(token)
    assert status == 400 and BAD_LINK in text.replace("&#x27;", "'")
    assert COOKIE not in {c.key for c in thief.http.cookie_jar}
    assert (await thief.api("GET", "overview"))[0] == 401


async def test_a_link_expires_after_15_minutes(proxy, browser, smtp):
    client = await browser()
    await client.ask_link("late@example.com")
    await client.ask_link("late@example.com")
    late, in_time = await link_for(smtp[0], "late@example.com", 0), await link_for(smtp[0], "late@example.com", 1)
    shift_clock(proxy, LINK_LIFETIME + timedelta(seconds=1))
    assert (await client.use_link(late))[0] == 400
    shift_clock(proxy, LINK_LIFETIME - timedelta(seconds=5))
    assert (await client.use_link(in_time))[0] == 200


async def test_the_answer_is_the_same_for_known_and_unknown_addresses(browser, smtp, accounts):
    await accounts.create_user("known@example.com", "starter")
    client = await browser()
    known = await client.ask_link("known@example.com")
    unknown = await client.ask_link("nobody-here@example.com")
    assert known == unknown and known[0] == 200 and SENT in known[1]
    await link_for(smtp[0], "known@example.com")
    await link_for(smtp[0], "nobody-here@example.com")  # both get a link: the first sign-in signs up


async def test_links_are_rate_limited_per_address(proxy, browser, smtp, pool):
    client = await browser()
    limits = proxy.app[STORE].limits
    answers = [(await client.ask_link("Flood@example.com"))[0] for _ in range(limits.per_email + 1)]
    assert answers == [200] * limits.per_email + [429]
    status, text = await client.ask_link("flood@example.com ")  # the same address, however it is written
    assert status == 429 and TOO_MANY in text
    assert (await client.ask_link("other@example.com"))[0] == 200  # the client is not blocked
    shift_clock(proxy, limits.window)
    assert (await client.ask_link("flood@example.com"))[0] == 200  # the window has passed
    assert await pool.fetchval("SELECT count(*) FROM portal_sign_ins WHERE email = 'flood@example.com'") == 1  # old ones gone
    assert sum("flood@example.com" in rcpt for rcpt, _ in smtp[0].messages) <= limits.per_email + 1


async def test_links_are_rate_limited_per_client_address(proxy, browser):
    client = await browser()
    limits = proxy.app[STORE].limits = RateLimits()
    shift_clock(proxy, timedelta(days=1))  # past the links other tests asked for from 127.0.0.1
    answers = [(await client.ask_link(f"u{n}@example.com"))[0] for n in range(limits.per_client + 1)]
    assert answers == [200] * limits.per_client + [429]
    other_browser_same_address = await browser()
    assert (await other_browser_same_address.ask_link("fresh@example.com"))[0] == 429


async def test_behind_a_trusted_reverse_proxy_each_client_has_its_own_limit(start_proxy):
    """TRUSTED_PROXIES=127.0.0.0/8: the client is the rightmost X-Forwarded-For address that
    is not a trusted proxy, so one client's flood does not lock out another, and a client
    cannot escape its limit by writing its own X-Forwarded-For in front."""
    proxy = await start_proxy(trusted_proxies=parse_networks("127.0.0.0/8"))
    limits = proxy.app[STORE].limits = replace(RateLimits(), per_client=3)
    shift_clock(proxy, timedelta(days=2))  # past the links other tests asked for
    flooding = PortalClient(proxy.url, **{"X-Forwarded-For": "203.0.113.5"})
    spoofing = PortalClient(proxy.url, **{"X-Forwarded-For": "198.51.100.9, 203.0.113.5, 127.0.0.1"})
    other = PortalClient(proxy.url, **{"X-Forwarded-For": "203.0.113.6"})
    try:
        answers = [(await flooding.ask_link(f"t{n}@example.com"))[0] for n in range(limits.per_client + 1)]
        assert answers == [200] * limits.per_client + [429]
        assert (await spoofing.ask_link("spoof@example.com"))[0] == 429  # still 203.0.113.5
        assert (await other.ask_link("other@example.com"))[0] == 200
    finally:
        for client in (flooding, spoofing, other):
            await client.close()


async def test_a_malformed_address_is_refused_without_mail(browser, smtp):
    client = await browser()
    status, _ = await client.ask_link("not-an-address")
    assert status == 400 and smtp[0].messages == []


# sessions and CSRF ------------------------------------------------------------------------
async def test_without_a_session_the_portal_signs_in_first(browser):
    client = await browser()
    async with client.http.get(client.base + "/portal/", allow_redirects=False) as resp:
        assert (resp.status, resp.headers["Location"]) == (303, "/portal/sign-in")
    for path in ("overview", "usage", "keys", "sessions", "plans"):
        assert (await client.api("GET", path))[0] == 401
    async with client.http.get(client.base + "/portal/api/overview") as resp:
        assert resp.headers["Cache-Control"] == "no-store" and resp.content_type == "application/json"
        assert await resp.json() == {"error": {"status": 401, "message": "Sign in first."}}


async def test_session_cookie_flags(proxy, browser, smtp, start_proxy, settings):
    client = await browser()
    await client.ask_link("cookie@example.com")
    async with client.http.get(client.base + "/portal/link?token=x") as resp:
        await resp.text()
    _, _, resp = await client.form("/portal/link", {"token": await link_for(smtp[0], "cookie@example.com")})
    cookie = resp.cookies[COOKIE]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/portal"
    assert not cookie["secure"]  # plain http here
    tls = await start_proxy(portal_base_url="https://gateway.example.com")
    async with aiohttp.ClientSession() as http, http.get(tls.url + "/portal/sign-in") as resp:
        pre = resp.cookies["costproxy_portal_pre"]
        assert pre["secure"] and pre["httponly"] and pre["samesite"] == "Strict"


async def test_every_post_needs_the_csrf_token(browser, smtp):
    client = await browser()
    key = await client.sign_in(smtp[0], "portal-csrf@example.com")
    _, keys = await client.api("GET", "keys")
    posts = [
        ("keys", {"name": "x"}),
        (f"keys/{keys[0]['id']}/revoke", None),
        ("sessions/ses_x/revoke", None),
        ("plan/checkout", {"tier": "starter"}),
        ("plan/preview", {"tier": "starter"}),
        ("plan/change", {"tier": "starter"}),
        ("plan/billing-portal", None),
    ]
    for path, body in posts:
        for token in ("", "0" * 64, client.csrf[:-1] + "x"):
            status, answer = await client.api("POST", path, body, csrf=token)
            assert status == 403, (path, token, answer)
    for path in ("/portal/sign-out", "/portal/sign-in", "/portal/link"):
        assert (await client.form(path, {"email": "portal-csrf@example.com", "token": "t"}, csrf=""))[0] == 403
        assert (await client.form(path, {"email": "portal-csrf@example.com", "token": "t"}, csrf="ab" * 32))[0] == 403
    _, after = await client.api("GET", "keys")
    assert after == keys  # nothing created, nothing revoked
    assert (await client.api("GET", "overview"))[0] == 200  # still signed in
    assert (await credits_of(client.base, key))[0] == 200


async def test_a_link_opened_from_another_site_signs_in_a_signed_in_browser(browser, smtp):
    """Following a link from webmail, the browser withholds its Strict session cookie: the
    link page gives it a pre-session cookie, whose token the POST (which sends both) carries."""
    client = await browser()
    await client.sign_in(smtp[0], "webmail@example.com")
    await client.ask_link("webmail@example.com")
    token = await link_for(smtp[0], "webmail@example.com", 1)
    cookieless = await browser()
    await cookieless.page(f"/portal/link?token={token}")
    pre = next(c for c in cookieless.http.cookie_jar if c.key == PRE_COOKIE)
    client.http.cookie_jar.update_cookies({PRE_COOKIE: pre.value}, URL(client.base))
    status, _, _ = await client.form("/portal/link", {"token": token}, csrf=cookieless.csrf)
    assert status == 303
    _, sessions = await client.api("GET", "sessions")
    assert len(sessions) == 2


async def test_sessions_are_listed_revoked_and_signed_out(browser, smtp):
    laptop, phone = await browser(**{"User-Agent": "laptop"}), await browser(**{"User-Agent": "phone"})
    await laptop.sign_in(smtp[0], "two@example.com")
    await phone.sign_in(smtp[0], "two@example.com")
    _, sessions = await laptop.api("GET", "sessions")
    assert sorted((s["user_agent"], s["current"]) for s in sessions) == [("laptop", True), ("phone", False)]
    phone_id = next(s["id"] for s in sessions if s["user_agent"] == "phone")
    assert (await laptop.api("POST", f"sessions/{phone_id}/revoke"))[0] == 200
    assert (await phone.api("GET", "overview"))[0] == 401
    status, _, resp = await laptop.form("/portal/sign-out", {})
    assert (status, resp.headers["Location"]) == (303, "/portal/sign-in")
    assert (await laptop.api("GET", "overview"))[0] == 401


async def test_another_users_data_is_out_of_reach(browser, smtp, pool):
    alice, bob = await browser(), await browser()
    await alice.sign_in(smtp[0], "alice@example.com")
    bob_key = await bob.sign_in(smtp[0], "bob@example.com")
    assert bob_key is not None
    _, (bob_key_row,) = await bob.api("GET", "keys")
    _, (bob_session,) = await bob.api("GET", "sessions")
    bob_id = (await credits_of(bob.base, bob_key))[1]["user_id"]
    await pool.execute(
        "INSERT INTO usage_daily VALUES (current_date, $1, $2, 'openai', 'bobs-model', 'free', 1, 10, 0, 5, 777)",
        bob_id,
        bob_key_row["id"],
    )

    assert (await alice.api("POST", f"keys/{bob_key_row['id']}/revoke"))[0] == 404
    assert (await alice.api("POST", f"sessions/{bob_session['id']}/revoke"))[0] == 404
    for path in ("keys", f"keys?user={bob_id}", "sessions", f"usage?user={bob_id}", "overview", "plans"):
        status, answer = await alice.api("GET", path)
        assert status == 200 and not re.search(f"{bob_id}|{bob_key_row['id']}|{bob_session['id']}|bobs-model|bob@", str(answer))
    assert (await credits_of(bob.base, bob_key))[0] == 200  # bob's key still works
    assert (await bob.api("GET", "overview"))[0] == 200  # and his session
    _, bobs = await bob.api("GET", "usage")
    assert [row["model"] for row in bobs["daily"]] == ["bobs-model"]
    _, (bobs_key,) = await bob.api("GET", "keys")
    assert bobs_key["last_used_day"] == await pool.fetchval("SELECT current_date::text")  # the usage_daily row's day


async def test_a_receipt_is_shown_to_its_owner_only(start_proxy, smtp):
    proxy = await start_proxy({"openai": openai_app()})
    proxy.app[STORE].limits = replace(RateLimits(), per_client=10**6)
    ada, bob = PortalClient(proxy.url), PortalClient(proxy.url)
    try:
        key = await ada.sign_in(smtp[0], "receipt-ada@example.com")
        await bob.sign_in(smtp[0], "receipt-bob@example.com")
        sdk = openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=key, max_retries=0)
        answer = await sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=[], max_tokens=5)
        request_id = answer.headers[REQUEST_ID_HEADER]

        async def receipt_found() -> bool:  # the charge settles just after the answer
            return (await ada.api("GET", f"usage/{request_id}"))[0] == 200

        await until(receipt_found, 5, "the receipt")
        status, receipt = await ada.api("GET", f"usage/{request_id}")
        assert (status, receipt["id"], receipt["outcome"], receipt["model"]) == (200, request_id, "charged", "gpt-4o-mini")
        assert receipt["cost_micro_usd"] == 345
        mine = await bob.api("GET", f"usage/{request_id}")
        unknown = await bob.api("GET", "usage/" + new_id("hold"))  # well formed, nobody's
        assert mine == unknown and mine[0] == 404  # another user's request is as unknown as none
    finally:
        await ada.close()
        await bob.close()


async def receipt_answer(http: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, str, str, str | None, str | None]:
    """A refused receipt lookup: (status, code, message, retry-after, cache-control)."""
    async with http.get(url, headers=headers) as resp:
        error = (await resp.json())["error"]
        return resp.status, error["code"], error["message"], resp.headers.get("retry-after"), resp.headers.get("cache-control")


async def test_a_pending_receipt_and_a_ledger_outage_answer_as_the_subscriber_api_does(
    proxy, browser, smtp, pool, ledger, accounts, monkeypatch
):
    client = await browser()
    key = await client.sign_in(smtp[0], "receipt-pending@example.com")
    user_id, key_id = await pool.fetchrow("SELECT user_id, id FROM api_keys WHERE key_prefix = $1", key[:10])
    hold = await running_request(ledger, accounts.config.tiers, user_id, key_id, "free", 100)
    _, overview = await client.api("GET", "overview")
    assert (overview["held_micro"], overview["available_micro"]) == (100, overview["balance_micro"] - 100)  # the running hold
    portal, api = f"{proxy.url}/portal/api/usage/{hold.id}", f"{proxy.url}/api/usage/{hold.id}"
    auth = {"Authorization": f"Bearer {key}"}

    pending = await receipt_answer(client.http, portal)
    assert pending == await receipt_answer(client.http, api, **auth)
    assert pending[:2] + pending[3:] == (404, "receipt_pending", "1", "no-store")  # an error answer is not cached either

    async def redis_away(*args, **kwargs):
        raise RedisConnectionError("Redis is restarting")

    monkeypatch.setattr(proxy.app[LEDGER].redis, "hget", redis_away)  # the pending check is the lookup's first read
    unavailable = await receipt_answer(client.http, portal)
    assert unavailable == await receipt_answer(client.http, api, **auth)
    assert unavailable[:2] + unavailable[3:] == (503, "ledger_unavailable", None, "no-store")


async def test_keys_are_created_named_and_revoked(browser, smtp, proxy):
    client = await browser()
    first = await client.sign_in(smtp[0], "keys@example.com")
    status, created = await client.api("POST", "keys", {"name": "laptop"})
    assert status == 201 and created["api_key"].startswith("cpk-") and created["name"] == "laptop"
    assert (await credits_of(proxy.url, created["api_key"]))[0] == 200
    _, keys = await client.api("GET", "keys")
    assert [(k["name"], k["key_prefix"], k["revoked_at"]) for k in keys] == [
        ("laptop", created["api_key"][:10], None),
        ("", first[:10], None),
    ]
    assert all("api_key" not in k and "key_hash" not in k for k in keys)
    assert (await client.api("POST", f"keys/{created['key_id']}/revoke"))[0] == 200
    _, keys = await client.api("GET", "keys")
    assert keys[0]["revoked_at"] is not None
    assert (await client.api("POST", "keys", {"name": "x" * 101}))[0] == 400
    sent = {"a number": b'{"name": 5}', "a NUL": b'{"name": "a\\u0000b"}', "a list": b"[]", "not JSON": b"name=x"}
    for what, raw in sent.items():
        headers = {"X-CSRF-Token": client.csrf, "Content-Type": "application/json"}
        async with client.http.post(client.base + "/portal/api/keys", data=raw, headers=headers) as resp:
            assert (resp.status, (await resp.json())["error"]["status"]) == (400, 400), what
    assert len((await client.api("GET", "keys"))[1]) == 2  # none of them made a key


async def test_the_portal_is_off_unless_enabled_and_needs_postgres(start_proxy):
    off = await start_proxy(portal_enabled=False)
    no_database = await start_proxy(database=False)
    async with aiohttp.ClientSession() as http:
        async with http.get(off.url + "/portal/sign-in") as resp:
            assert resp.status == 404
        async with http.get(no_database.url + "/portal/sign-in") as resp:
            assert resp.status == 503 and "PostgreSQL" in await resp.text()


# plan -----------------------------------------------------------------------------------
def test_portal_settings_from_the_environment():
    """PORTAL_ENABLED defaults to whether SMTP_URL is set (links need mail), and either way
    can be said; PORTAL_BASE_URL loses trailing slashes (links append /portal/...)."""
    smtp = {"SMTP_URL": "smtp://mail.example:25"}
    assert Settings.from_env({}).portal_enabled is False
    assert Settings.from_env(smtp).portal_enabled is True
    assert Settings.from_env({**smtp, "PORTAL_ENABLED": "false"}).portal_enabled is False
    assert Settings.from_env({"PORTAL_ENABLED": "true"}).portal_enabled is True
    assert Settings.from_env({}).portal_base_url == "http://localhost:8080"
    for given in ("https://api.example.com", "https://api.example.com/", "https://api.example.com//"):
        assert Settings.from_env({"PORTAL_BASE_URL": given}).portal_base_url == "https://api.example.com", given


async def test_plans_list_every_tier_with_what_choosing_it_does(browser, smtp, pool, stripe_state):
    client = await browser()
    await client.sign_in(smtp[0], "plans@example.com")
    _, plans = await client.api("GET", "plans")
    assert [(t["name"], t["action"]) for t in plans["tiers"]] == [
        ("free", "current"),
        ("starter", "subscribe"),
        ("professional", "subscribe"),
        ("enterprise", "subscribe"),
    ]
    starter = plans["tiers"][1]
    assert (starter["price_usd"], starter["allowance_micro"], starter["monthly_tokens"], starter["providers"]) == (
        "19",
        3_800_000,
        500_000,
        ["openai"],
    )
    await subscribed(client, smtp[0], pool, stripe_state, "plans@example.com")
    _, plans = await client.api("GET", "plans")
    assert [t["action"] for t in plans["tiers"]] == ["billing_portal", "current", "upgrade", "upgrade"]


async def test_checkout_returns_to_the_portal(browser, smtp, fake_stripe, settings):
    client = await browser()
    await client.sign_in(smtp[0], "checkout@example.com")
    status, session = await client.api("POST", "plan/checkout", {"tier": "starter"})
    assert status == 200 and session["url"].startswith("https://checkout.stripe.test/")
    (call,) = [c for c in fake_stripe.app[CALLS] if c.path == "/v1/checkout/sessions"]
    assert call.form["success_url"] == call.form["cancel_url"] == settings.portal_base_url + "/portal/return"
    assert call.form["customer_email"] == "checkout@example.com"
    assert (await client.api("POST", "plan/checkout", {"tier": "free"}))[0] == 400  # not sold through Stripe


async def test_the_billing_portal_link_returns_to_the_portal(browser, smtp, pool, stripe_state, fake_stripe, settings):
    """Before subscribing there is no Stripe customer (404) nor subscription to change (409);
    afterwards the link is Stripe's, and Stripe sends the browser back to the portal."""
    client = await browser()
    await client.sign_in(smtp[0], "billing-portal@example.com")
    status, answer = await client.api("POST", "plan/billing-portal")
    assert (status, answer["error"]["code"]) == (404, "no_customer"), answer
    status, answer = await client.api("POST", "plan/change", {"tier": "professional"})
    assert (status, answer["error"]["code"]) == (409, "no_subscription"), answer
    assert not [c for c in fake_stripe.app[CALLS] if c.path == "/v1/billing_portal/sessions"]
    user_id = await subscribed(client, smtp[0], pool, stripe_state, "billing-portal@example.com")
    status, answer = await client.api("POST", "plan/billing-portal")
    assert (status, answer) == (200, {"url": "https://billing.stripe.test/session/1"})
    (call,) = [c for c in fake_stripe.app[CALLS] if c.path == "/v1/billing_portal/sessions"]
    assert call.form["return_url"] == settings.portal_base_url + "/portal/return"
    assert call.form["customer"] == f"cus_{user_id}"


async def test_an_upgrade_is_previewed_before_it_is_made(browser, smtp, pool, fake_stripe, stripe_state):
    client = await browser()
    await subscribed(client, smtp[0], pool, stripe_state, "upgrade@example.com")
    stripe_state.preview_amount = 4000
    status, preview = await client.api("POST", "plan/preview", {"tier": "professional"})
    assert (status, preview["change"], preview["amount_due"], preview["currency"]) == (200, "upgrade", 4000, "usd")
    assert "/v1/invoices/create_preview" in [c.path for c in fake_stripe.app[CALLS]]
    assert not [c for c in fake_stripe.app[CALLS] if c.method == "POST" and c.path.startswith("/v1/subscriptions/")]
    status, done = await client.api("POST", "plan/change", {"tier": "professional"})
    assert (status, done["change"], done["amount_charged"]) == (200, "upgrade", 4000)
    assert [c for c in fake_stripe.app[CALLS] if c.method == "POST" and c.path.startswith("/v1/subscriptions/")]


async def test_a_downgrade_is_scheduled_for_the_period_end(browser, smtp, pool, stripe_state, fake_stripe):
    client = await browser()
    await subscribed(client, smtp[0], pool, stripe_state, "down@example.com")
    await pool.execute("UPDATE users SET tier = 'professional' WHERE email = 'down@example.com'")
    status, preview = await client.api("POST", "plan/preview", {"tier": "starter"})
    assert (status, preview["change"], preview["effective_at"], preview["amount_due"]) == (200, "downgrade", 2_000, 0)
    status, done = await client.api("POST", "plan/change", {"tier": "starter"})
    assert (status, done["change"], done["effective_at"]) == (200, "downgrade", 2_000)
    assert any(c.path == "/v1/subscription_schedules" for c in fake_stripe.app[CALLS])


async def test_a_failed_payment_shows_its_invoice_link(browser, smtp, pool, deliver, stripe_state):
    client = await browser()
    user_id = await subscribed(client, smtp[0], pool, stripe_state, "failed@example.com")
    now = int(time.time())  # a failure of long ago would be lapsed by the listener's past-due sweep meanwhile
    failed = invoice(
        f"in_fail_{user_id}",
        "subscription_cycle",
        [line(STARTER, now, now + 30 * 86_400, 1900)],
        now,
        user_id=user_id,
        sub=f"sub_{user_id}",
        customer=f"cus_{user_id}",
    )
    assert await deliver(event("invoice.payment_failed", failed, now)) == [200]
    try:
        _, overview = await client.api("GET", "overview")
        assert overview["status"] == "past_due"
        assert overview["payment_failed"] == {"invoice_url": f"https://invoice.stripe.test/in_fail_{user_id}"}
    finally:  # a later test's past-due sweep would find this account, whose Redis data goes with this test
        await pool.execute("UPDATE users SET past_due_since = NULL WHERE id = $1", user_id)


async def test_the_workers_sweep_prunes_portal_rows_past_their_use(accounts, ledger, pool):
    """Links past their lifetime and the rate-limit window (another address's too), expired
    or revoked sessions and Stripe-call counts past their window go; live rows stay."""
    user_id, _ = await accounts.create_user("prune@example.com", "free")
    now, limits = datetime.now(UTC), RateLimits()
    old, fresh = now - limits.window - timedelta(minutes=1), now - timedelta(seconds=30)
    links = {"old-link": (old, old + LINK_LIFETIME), "live-link": (fresh, fresh + LINK_LIFETIME)}
    for name, (created, expires) in links.items():
        await pool.execute(
            "INSERT INTO portal_sign_ins (token_hash, email, client, created_at, expires_at)"
            " VALUES ($1, $2, '192.0.2.9', $3, $4)",
            f"prune-{name}",
            f"{name}@example.com",
            created,
            expires,
        )
    sessions = {
        "expired": (now - timedelta(days=15), now - timedelta(days=1), None),
        "live": (now, now + timedelta(days=1), None),
    }
    sessions["revoked"] = (now, now + timedelta(days=1), now)
    for name, (created, expires, revoked) in sessions.items():
        await pool.execute(
            "INSERT INTO portal_sessions (id, secret_hash, user_id, created_at, last_seen_at, expires_at, revoked_at)"
            " VALUES ($1, $1, $2, $3, $3, $4, $5)",
            f"ses_prune_{name}",
            user_id,
            created,
            expires,
            revoked,
        )
    for created in (now - limits.stripe_window - timedelta(seconds=5), now):
        await pool.execute("INSERT INTO portal_stripe_calls (user_id, created_at) VALUES ($1, $2)", user_id, created)

    stop = asyncio.Event()
    sweep = asyncio.create_task(worker._sweep(ledger, accounts, stop, every=0.05))

    async def pruned() -> bool:
        return await pool.fetchval("SELECT count(*) FROM portal_stripe_calls WHERE user_id = $1", user_id) == 1

    await until(pruned, within=10, what="a sweep to prune the portal's tables")
    await asyncio.sleep(0.1)  # more sweeps: what is live stays
    stop.set()
    await asyncio.wait_for(sweep, 5)

    kept_links = await pool.fetch("SELECT token_hash FROM portal_sign_ins WHERE token_hash LIKE 'prune-%'")
    assert [row["token_hash"] for row in kept_links] == ["prune-live-link"]
    kept_sessions = await pool.fetch("SELECT id FROM portal_sessions WHERE user_id = $1", user_id)
    assert [row["id"] for row in kept_sessions] == ["ses_prune_live"]
    assert await pool.fetchval("SELECT count(*) FROM portal_stripe_calls WHERE user_id = $1", user_id) == 1
