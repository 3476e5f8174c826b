"""Attacks on the subscriber portal by a hostile subscriber or visitor, against real
processes (Redis, Postgres, the local SMTP server and fake Stripe: the package's fixtures).

Each test asserts the safe behaviour against one attack: those of the findings the portal
was fixed for, and defences that held and that test_portal.py does not cover.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from datetime import timedelta

import aiohttp
import pytest
from yarl import URL

from proxy.accounts import MAX_LIVE_KEYS
from proxy.forwarded import parse_networks
from proxy.keys import hash_key
from proxy.portal.guard import COOKIE, MAX_BODY_BYTES, PRE_COOKIE, STORE
from proxy.portal.signin import MAILER, normalise_email
from proxy.portal.store import RateLimits

from ..support.fake_stripe import CALLS
from ..support.portal_client import PortalClient, key_of, link_for
from ..support.portal_state import shift_clock, subscribed


@pytest.fixture
async def future_links(pool):
    """For tests that move the portal's clock days ahead: their links go afterwards, so no
    later test's limit per client address counts them."""
    yield
    await pool.execute("DELETE FROM portal_sign_ins WHERE created_at > now() + interval '1 hour'")


def _recipients(inbox) -> list[str]:
    return [rcpt for rcpts, _ in inbox.messages for rcpt in rcpts]


# CSRF -----------------------------------------------------------------------------------
async def test_a_planted_pre_session_cookie_does_not_authorise_a_signed_in_browsers_posts(browser, smtp):
    """Cookie tossing (a sibling subdomain, a plain-http MITM; no ``__Host-`` prefix) can
    plant a pre-session cookie: one the portal issued to the attacker with its token, or a
    value of their choosing with the token an unkeyed derivation would give. A signed-in
    browser's POSTs need its session's token."""
    victim, attacker = await browser(), await browser()
    await victim.sign_in(smtp[0], "tossed@example.com")
    await attacker.page("/portal/sign-in")
    issued = next(c.value for c in attacker.http.cookie_jar if c.key == PRE_COOKIE)
    chosen = "attacker-chosen-value"  # a value the server never issued
    unkeyed = hashlib.sha256(b"csrf:" + chosen.encode()).hexdigest()
    for planted, token in ((issued, attacker.csrf), (chosen, unkeyed)):
        victim.http.cookie_jar.update_cookies({PRE_COOKIE: planted}, URL(victim.base))
        status, answer = await victim.api("POST", "keys", {"name": "planted"}, csrf=token)
        assert status == 403, (planted, answer)
    assert (await victim.api("POST", "keys", {"name": "own"}))[0] == 201  # the session's own token works


async def test_a_pre_session_token_signs_in_and_does_nothing_else(browser):
    client = await browser()
    await client.page("/portal/sign-in")
    assert (await client.form("/portal/sign-out", {}))[0] == 403
    assert (await client.api("POST", "keys", {"name": "x"}))[0] == 403
    assert (await client.form("/portal/sign-in", {"email": "pre-only@example.com"}))[0] == 200


async def test_a_post_from_another_origin_is_refused(browser, smtp, settings):
    client = await browser()
    await client.sign_in(smtp[0], "origin@example.com")
    origins = {"https://evil.example": 403, "http://127.0.0.1": 403, client.base: 201, settings.portal_base_url: 201}
    origins["null"] = 201  # what the portal's own pages send (Referrer-Policy: no-referrer); the token decides
    for origin, expected in origins.items():
        headers = {"X-CSRF-Token": client.csrf, "Origin": origin}
        async with client.http.post(client.base + "/portal/api/keys", json={"name": "o"}, headers=headers) as resp:
            assert resp.status == expected, origin


async def test_every_replica_accepts_the_csrf_tokens_of_the_others(proxy, browser, smtp, start_proxy):
    """The CSRF key is drawn once and kept in Postgres: a browser's token works on any replica."""
    client = await browser()
    await client.sign_in(smtp[0], "replicas@example.com")
    other = await start_proxy()
    assert other.app[STORE].csrf_key == proxy.app[STORE].csrf_key
    replica = PortalClient(other.url)
    try:
        replica.http.cookie_jar.update_cookies({c.key: c.value for c in client.http.cookie_jar}, URL(other.url))
        assert (await replica.api("POST", "keys", {"name": "r"}, csrf=client.csrf))[0] == 201
    finally:
        await replica.close()


async def test_a_session_cookies_token_does_not_work_for_another_session(browser, smtp):
    alice, bob = await browser(), await browser()
    await alice.sign_in(smtp[0], "csrf-a@example.com")
    await bob.sign_in(smtp[0], "csrf-b@example.com")
    assert alice.csrf != bob.csrf
    assert (await alice.api("POST", "keys", {"name": "x"}, csrf=bob.csrf))[0] == 403
    # a JSON body cannot carry the token, and no method override is honoured
    async with alice.http.post(
        alice.base + "/portal/api/keys",
        data=f'{{"name": "x", "csrf": "{alice.csrf}"}}',
        headers={"Content-Type": "text/plain", "X-HTTP-Method-Override": "GET"},
    ) as resp:
        assert resp.status == 403
    async with alice.http.get(alice.base + "/portal/api/keys/x/revoke") as resp:
        assert resp.status == 405  # no GET with side effects


async def test_sign_in_issues_a_fresh_session_whatever_cookies_the_browser_brought(browser, smtp, pool):
    """No session fixation: a planted session cookie is ignored, and sign-in replaces both cookies."""
    client = await browser()
    client.http.cookie_jar.update_cookies({COOKIE: "planted-session"}, URL(client.base))
    assert (await client.api("GET", "overview"))[0] == 401
    await client.sign_in(smtp[0], "fixation@example.com")
    jar = {c.key: c.value for c in client.http.cookie_jar}
    assert jar[COOKIE] != "planted-session" and PRE_COOKIE not in jar
    hashes = [hash_key(jar[COOKIE]), hash_key("planted-session")]
    assert await pool.fetchval("SELECT count(*) FROM portal_sessions WHERE secret_hash = ANY($1::text[])", hashes) == 1


# sign-in links --------------------------------------------------------------------------
async def test_concurrent_requests_cannot_exceed_the_per_address_limit(proxy, browser, smtp):
    proxy.app[MAILER].url = None  # only the answers count: no burst of SMTP connections
    client = await browser()
    await client.page("/portal/sign-in")
    limits = proxy.app[STORE].limits

    async def ask() -> int:
        return (await client.form("/portal/sign-in", {"email": "race-limit@example.com"}))[0]

    answers = await asyncio.gather(*(ask() for _ in range(limits.per_email * 2)))
    assert sorted(answers) == [200] * limits.per_email + [429] * limits.per_email, answers


async def test_concurrent_requests_cannot_exceed_the_per_client_limit(proxy, browser, smtp, future_links):
    limits = proxy.app[STORE].limits = replace(RateLimits(), per_client=2)
    shift_clock(proxy, timedelta(days=5))  # past the links other tests asked for from 127.0.0.1
    proxy.app[MAILER].url = None  # only the answers count: no burst of SMTP connections
    client = await browser()
    await client.page("/portal/sign-in")
    answers = await asyncio.gather(
        *(client.form("/portal/sign-in", {"email": f"burst{n}@example.com"}) for n in range(limits.per_client * 4))
    )
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200] * limits.per_client + [429] * (len(answers) - limits.per_client), statuses


async def test_a_link_is_only_mailed_to_the_address_it_signs_in(proxy, browser, smtp):
    client = await browser()
    limits = proxy.app[STORE].limits
    spellings = [f"n{n}<flooded@example.com>" for n in range(limits.per_email + 2)] + ["mine@example.com,postmaster"]
    answers = [(await client.ask_link(address))[0] for address in spellings]
    await asyncio.sleep(0.5)  # the mail is sent in the background
    delivered = _recipients(smtp[0])
    assert answers == [400] * len(spellings) and "flooded@example.com" not in delivered, (answers, delivered)


async def test_one_mailbox_cannot_open_many_free_accounts(browser, smtp, pool):
    """Free-tier farming: other spellings of one address (display names, quotes, a trailing
    dot, case) are refused or normalised, so its links open one account, whose first key is
    the only one shown. Plus-tags are distinct addresses (many providers deliver them to one
    mailbox): the per-client link limit is their bound (the next test)."""
    farmer = await browser()
    spellings = [f"n{n}<farm@example.com>" for n in range(3)] + ['"farm"@example.com', "farm@example.com."]
    assert [(await farmer.ask_link(address))[0] for address in spellings] == [400] * len(spellings)
    keys = [await farmer.sign_in(smtp[0], address) for address in ("farm@example.com", " FARM@Example.com")]
    accounts = await pool.fetchval("SELECT count(*) FROM users WHERE email LIKE '%farm@example.com%'")
    assert accounts == 1 and keys[0] is not None and keys[1] is None
    assert _recipients(smtp[0]).count("farm@example.com") == 2  # the two links asked for by the address itself


async def test_plus_tagged_addresses_open_accounts_up_to_the_per_client_limit(proxy, browser, smtp, pool, future_links):
    """farm+1@, farm+2@, ... are accepted as addresses of their own, each opening a free
    account: what bounds one client is the per-client limit on links within the window."""
    limits = proxy.app[STORE].limits = replace(RateLimits(), per_client=3)
    shift_clock(proxy, timedelta(days=6))  # past the links other tests asked for from 127.0.0.1
    farmer = await browser()
    addresses = [f"tagfarm+{n}@example.com" for n in range(limits.per_client + 2)]
    answers = [(await farmer.ask_link(address))[0] for address in addresses]
    assert answers == [200] * limits.per_client + [429, 429]
    keys = []
    for address in addresses[: limits.per_client]:
        keys.append(key_of((await farmer.use_link(await link_for(smtp[0], address)))[1]))
    assert all(keys) and len(set(keys)) == limits.per_client  # a new account, and its key, per link
    opened = await pool.fetchval("SELECT count(*) FROM users WHERE email LIKE 'tagfarm+%@example.com'")
    assert opened == limits.per_client


def test_plain_addresses_pass_and_nothing_else_does():
    for address in ("o'brien+tag@mail.example.co.uk", "x_y@xn--bcher-kva.example", " Ada@Example.COM "):
        assert normalise_email(address) == address.strip().lower(), address
    for address in (
        "a@b",
        "a@b.c.",
        "a..b@example.com",
        ".a@example.com",
        "a@-b.example",
        "a@b_c.example",
        "a b@example.com",
        "a@example.com,b@example.com",
        "a@[127.0.0.1]",
        "a@example.com\r\nbcc@example.com",
        "a@1.2.3.4",
        "x" * 65 + "@example.com",
        f"a@{'b' * 250}.com",
    ):
        assert normalise_email(address) is None, address


async def test_the_link_page_names_the_account_a_signed_in_browser_would_switch_to(browser, smtp):
    victim, attacker = await browser(), await browser()
    await victim.sign_in(smtp[0], "switch-victim@example.com")
    await attacker.ask_link("switch-attacker@example.com")
    token = await link_for(smtp[0], "switch-attacker@example.com")
    status, page = await victim.page(f"/portal/link?token={token}")  # the attacker's link, sent to the victim
    assert status == 200 and "switch-attacker@example.com" in page
    assert "switch it from switch-victim@example.com to switch-attacker@example.com" in page
    status, page = await attacker.page(f"/portal/link?token={token}")  # a browser signed in to no one
    assert status == 200 and "switch-attacker@example.com" in page and "switch it from" not in page
    assert (await attacker.use_link(token))[0] == 200  # looking at the link did not use it up
    status, page = await victim.page(f"/portal/link?token={token}")
    assert status == 400 and "switch-attacker@example.com" not in page


async def test_forwarded_for_is_ignored_without_trusted_proxies(proxy, browser, future_links):
    """TRUSTED_PROXIES unset: a client writing its own X-Forwarded-For keeps its peer's limit."""
    limits = proxy.app[STORE].limits = replace(RateLimits(), per_client=3)
    shift_clock(proxy, timedelta(days=3))
    answers = []
    for n in range(limits.per_client + 2):
        client = await browser(**{"X-Forwarded-For": f"198.51.100.{n}"})
        answers.append((await client.ask_link(f"xff{n}@example.com"))[0])
    assert answers == [200] * limits.per_client + [429, 429]


async def test_one_ipv6_network_shares_one_client_limit(start_proxy, future_links):
    proxy = await start_proxy(trusted_proxies=parse_networks("127.0.0.0/8"))
    limits = proxy.app[STORE].limits = replace(RateLimits(), per_client=3)
    shift_clock(proxy, timedelta(days=4))
    answers = []
    for n in range(limits.per_client + 2):
        client = PortalClient(proxy.url, **{"X-Forwarded-For": f"2001:db8:1:2::{n + 1:x}"})
        try:
            answers.append((await client.ask_link(f"v6-{n}@example.com"))[0])
        finally:
            await client.close()
    assert answers == [200] * limits.per_client + [429, 429]


async def test_one_link_used_twice_at_once_opens_one_session(browser, smtp, pool):
    asker = await browser()
    await asker.ask_link("twice@example.com")
    token = await link_for(smtp[0], "twice@example.com")
    tabs = [await browser() for _ in range(6)]
    results = await asyncio.gather(*(tab.use_link(token) for tab in tabs))
    assert sorted(status for status, _ in results) == [200] + [400] * 5
    assert [COOKIE in {c.key for c in tab.http.cookie_jar} for tab in tabs].count(True) == 1
    user_id = await pool.fetchval("SELECT id FROM users WHERE email = 'twice@example.com'")
    assert await pool.fetchval("SELECT count(*) FROM portal_sessions WHERE user_id = $1", user_id) == 1


async def test_two_first_sign_ins_at_once_make_one_account_and_one_key(browser, smtp, pool):
    asker = await browser()
    for _ in range(4):
        await asker.ask_link("First.Race@example.com")
    tokens = [await link_for(smtp[0], "first.race@example.com", n) for n in range(4)]
    tabs = [await browser() for _ in tokens]
    results = await asyncio.gather(*(tab.use_link(t) for tab, t in zip(tabs, tokens, strict=True)))
    assert all(status in (200, 303) for status, _ in results), results
    assert sum("new-key" in text for _, text in results) == 1  # one welcome page, one key shown
    users = await pool.fetch("SELECT id FROM users WHERE lower(email) = 'first.race@example.com'")
    assert len(users) == 1
    assert await pool.fetchval("SELECT count(*) FROM api_keys WHERE user_id = $1", users[0]["id"]) == 1
    for tab in tabs:  # every browser is signed in to that one account
        status, overview = await tab.api("GET", "overview")
        assert (status, overview["email"]) == (200, "first.race@example.com")


async def test_an_address_written_differently_signs_in_to_the_same_account(browser, smtp, accounts):
    """An account made by the CLI with capitals is the one a portal sign-in reaches."""
    await accounts.create_user("Mixed.Case@Example.COM", "starter")
    client = await browser()
    assert await client.sign_in(smtp[0], "  MIXED.case@example.com ") is None  # no new account, no new key
    status, overview = await client.api("GET", "overview")
    assert (status, overview["email"], overview["tier"]["name"]) == (200, "Mixed.Case@Example.COM", "starter")


# unbounded input ------------------------------------------------------------------------
async def test_an_anonymous_huge_form_is_refused_before_it_is_parsed(proxy):
    async def chunked():
        yield b"email=a%40example.com"

    form = {"Content-Type": "application/x-www-form-urlencoded"}
    async with aiohttp.ClientSession() as http:
        for body in ("email=" + "a" * 8_000_000, "email=" + "a" * MAX_BODY_BYTES, chunked()):
            async with http.post(proxy.url + "/portal/sign-in", data=body, headers=form) as resp:
                assert resp.status == 413, resp.status


async def test_a_nul_in_a_session_id_is_a_client_error(browser, smtp):
    client = await browser()
    await client.sign_in(smtp[0], "nul@example.com")
    async with client.http.post(
        client.base + "/portal/api/sessions/ses_%00x/revoke", headers={"X-CSRF-Token": client.csrf}
    ) as resp:
        assert resp.status in (400, 404), (resp.status, await resp.text())


async def test_keys_per_user_are_capped(browser, smtp):
    client = await browser()
    await client.sign_in(smtp[0], "many-keys@example.com")
    statuses = [(await client.api("POST", "keys", {"name": f"k{n}"}))[0] for n in range(MAX_LIVE_KEYS + 1)]
    assert statuses == [201] * (MAX_LIVE_KEYS - 1) + [409, 409]  # the first key came with the account
    _, keys = await client.api("GET", "keys")
    assert (await client.api("POST", f"keys/{keys[0]['id']}/revoke"))[0] == 200
    assert (await client.api("POST", "keys", {"name": "after-a-revocation"}))[0] == 201


# pages ----------------------------------------------------------------------------------
async def test_the_welcome_page_with_the_key_is_not_cached_nor_framed(browser, smtp):
    client = await browser()
    await client.ask_link("headers@example.com")
    token = await link_for(smtp[0], "headers@example.com")
    await client.page(f"/portal/link?token={token}")
    async with client.http.post(client.base + "/portal/link", data={"token": token, "csrf": client.csrf}) as resp:
        text = await resp.text()
        assert resp.status == 200 and 'id="new-key"' in text
        assert resp.headers["Cache-Control"] == "no-store"
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["Referrer-Policy"] == "no-referrer"
    for path in ("/portal/sign-in", "/portal/link?token=x", "/portal/", "/portal/return"):
        async with client.http.get(client.base + path) as resp:
            assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"], path
    async with client.http.get(client.base + '/portal/link?token="><script>alert(1)</script>') as resp:
        assert "<script>alert" not in await resp.text()


async def test_a_hostile_user_agent_and_key_name_come_back_as_json_data(browser, smtp):
    evil = '<img src=x onerror=alert(1)>"'
    client = await browser(**{"User-Agent": evil})
    await client.sign_in(smtp[0], "xss@example.com")
    assert (await client.api("POST", "keys", {"name": evil}))[0] == 201
    async with client.http.get(client.base + "/portal/api/sessions") as resp:
        assert resp.content_type == "application/json" and resp.headers["Cache-Control"] == "no-store"
        assert (await resp.json())[0]["user_agent"] == evil
    # the page holds no data: portal.js sets textContent (test_portal_browser.py shows such a key name as text)


# plans ----------------------------------------------------------------------------------
async def test_a_subscriber_cannot_open_a_second_subscription(browser, smtp, pool, stripe_state, fake_stripe):
    client = await browser()
    await subscribed(client, smtp[0], pool, stripe_state, "second-sub@example.com")
    status, answer = await client.api("POST", "plan/checkout", {"tier": "professional"})
    assert (status, answer["error"]["code"]) == (409, "already_subscribed"), answer
    assert not [c for c in fake_stripe.app[CALLS] if c.path == "/v1/checkout/sessions"]


@pytest.mark.parametrize(
    ("tier", "asked"),
    [("starter", "professional"), ("free", "starter")],
    ids=["past-due-upgrade", "lapsed-to-free-then-any-paid-tier-is-an-upgrade"],
)
async def test_a_past_due_account_cannot_change_its_plan(browser, smtp, pool, stripe_state, fake_stripe, tier, asked):
    client = await browser()
    user_id = await subscribed(client, smtp[0], pool, stripe_state, f"past-due-{tier}@example.com")
    await pool.execute(
        "UPDATE users SET status = 'past_due', past_due_since = now() - interval '30 days', tier = $2 WHERE id = $1",
        user_id,
        tier,
    )
    try:
        _, plans = await client.api("GET", "plans")
        offered = {t["name"]: t["action"] for t in plans["tiers"] if t["action"] not in ("current", "billing_portal")}
        assert offered and set(offered.values()) == {"none"}, offered  # no button the plans would refuse
        for path in ("plan/change", "plan/preview"):
            status, answer = await client.api("POST", path, {"tier": asked})
            assert status == 409 and "pay the open invoice" in answer["error"]["message"], (path, answer, plans["tiers"])
            assert answer["error"]["code"] == "past_due", answer
        assert not [c for c in fake_stripe.app[CALLS] if c.path.startswith("/v1/subscriptions/")]
    finally:  # a later test's past-due sweep would find this account, whose Redis data goes with this test
        await pool.execute("UPDATE users SET past_due_since = NULL WHERE id = $1", user_id)


async def test_stripe_backed_calls_are_rate_limited(proxy, browser, smtp, fake_stripe):
    client = await browser()
    await client.sign_in(smtp[0], "stripe-spam@example.com")
    limit = proxy.app[STORE].limits.stripe_per_user
    statuses = [(await client.api("POST", "plan/checkout", {"tier": "starter"}))[0] for _ in range(limit + 2)]
    assert statuses == [200] * limit + [429, 429]
    sessions = [c for c in fake_stripe.app[CALLS] if c.path == "/v1/checkout/sessions"]
    assert len(sessions) == limit and len({c.idempotency_key for c in sessions}) == 1  # one session, asked again
    for path, body in (("plan/preview", {"tier": "starter"}), ("plan/billing-portal", None)):
        assert (await client.api("POST", path, body))[0] == 429, path
    shift_clock(proxy, timedelta(minutes=1, seconds=1))
    assert (await client.api("POST", "plan/preview", {"tier": "professional"}))[0] == 409  # counted again, then no subscription


async def test_previews_change_nothing_and_unsold_tiers_are_refused(browser, smtp, pool, stripe_state, fake_stripe):
    client = await browser()
    user_id = await subscribed(client, smtp[0], pool, stripe_state, "preview-only@example.com")
    await pool.execute("UPDATE users SET tier = 'professional' WHERE id = $1", user_id)
    for tier in ("starter", "enterprise"):
        assert (await client.api("POST", "plan/preview", {"tier": tier}))[0] == 200
    writes = [c for c in fake_stripe.app[CALLS] if c.method == "POST" and not c.path.startswith("/v1/invoices/create_preview")]
    assert writes == []
    for tier in ("free", "nonexistent", ["starter"], None):
        for path in ("plan/checkout", "plan/change", "plan/preview"):
            assert (await client.api("POST", path, {"tier": tier}))[0] == 400, (path, tier)
    assert (await client.api("POST", "plan/change", {"tier": "starter", "user": "usr_x"}))[0] == 400
    assert await pool.fetchval("SELECT tier FROM users WHERE id = $1", user_id) == "professional"
