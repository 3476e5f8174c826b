"""The admin API over HTTP: authentication and its audit trail, users, keys, credits,
usage queries, the developers' own usage view and the OpenAPI document."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from proxy.admin import auth
from proxy.admin.auth import fingerprint

from .support import admin as db
from .support.accounts import account
from .support.admin import ADMIN_TOKEN, bearer
from .support.money import ALLOWANCE


@pytest.fixture
async def admin(start_proxy):
    """(base URL, client session) of a proxy with the admin surface."""
    proxy = await start_proxy(admin_token=ADMIN_TOKEN)
    async with aiohttp.ClientSession() as http:
        yield proxy.url, http


async def audit_rows(pool, since_id: int):
    return await pool.fetch("SELECT * FROM admin_audit WHERE id > $1 ORDER BY id", since_id)


async def last_audit_id(pool) -> int:
    return await pool.fetchval("SELECT coalesce(max(id), 0) FROM admin_audit")


# authentication ----------------------------------------------------------------------------
async def test_admin_surface_is_disabled_without_a_token(start_proxy):
    base = (await start_proxy(admin_token="")).url
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/admin/api/users", headers=bearer("")) as resp:
            assert resp.status == 503
            assert "set ADMIN_TOKEN" in (await resp.json())["error"]["message"]
        async with http.get(f"{base}/admin/", allow_redirects=False) as resp:
            assert resp.status == 503 and "ADMIN_TOKEN" in await resp.text()


async def test_missing_or_wrong_token_is_refused_and_every_call_is_audited(admin, pool, monkeypatch):
    base, http = admin
    compared = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    before = await last_audit_id(pool)

    async with http.get(f"{base}/admin/api/users") as resp:
        assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
    async with http.get(f"{base}/admin/api/users", headers=bearer("not-the-token")) as resp:
        assert resp.status == 401
    assert compared, "the token must be compared with hmac.compare_digest"
    async with http.get(f"{base}/admin/api/users", params={"q": "nobody-here"}, headers=bearer()) as resp:
        assert resp.status == 200
        assert (await resp.json())["items"] == []
    async with http.post(
        f"{base}/admin/api/users", json={"email": "x@example.com", "tier": "no-such-tier"}, headers=bearer()
    ) as resp:
        assert resp.status == 400

    rows = await audit_rows(pool, before)
    assert [(r["actor"], r["method"], r["path"], r["status"]) for r in rows] == [
        ("anonymous", "GET", "/admin/api/users", 401),
        (f"bad-token:{fingerprint('not-the-token')}", "GET", "/admin/api/users", 401),
        (f"token:{fingerprint(ADMIN_TOKEN)}", "GET", "/admin/api/users", 200),
        (f"token:{fingerprint(ADMIN_TOKEN)}", "POST", "/admin/api/users", 400),
    ]
    assert rows[2]["query"] == "q=nobody-here"
    assert rows[3]["body"] == '{"email":"x@example.com","tier":"no-such-tier"}'
    assert all(ADMIN_TOKEN not in r["actor"] + r["body"] + r["query"] for r in rows)


async def test_audit_rows_redact_secrets_in_queries_paths_and_bodies(admin, make_customer, pool):
    base, http = admin
    customer = await make_customer("starter")
    key = customer.api_key
    before = await last_audit_id(pool)

    # a proxy key pasted where a user id goes, in the query and in the path
    async with http.get(f"{base}/admin/api/keys", params={"user": key, "q": "grace & co"}, headers=bearer()) as resp:
        assert resp.status == 404
    async with http.get(f"{base}/admin/api/users/{key}", headers=bearer()) as resp:
        assert resp.status == 404
    # parameters named as secrets, whatever their value or case
    params = {"group": "day,model", "provider": "openai", "api_key": "sk-upstream", "Access-Token": "t0k", "KEY": "key_x"}
    async with http.get(f"{base}/admin/api/usage", params=params, headers=bearer()) as resp:
        assert resp.status == 200
    # keys and bearer tokens in a body, inside text, nested, under any name; secret fields
    url = f"{base}/admin/api/users/{customer.user_id}/credits"
    async with http.post(url, json={"credits": 100, "reason": f"voucher; old key {key}"}, headers=bearer()) as resp:
        assert resp.status == 201
    unknown = {"credits": 1, "reason": "x", "memo": [f"Bearer {key}"], key: 1, "Password": "hunter2"}
    async with http.post(url, json=unknown, headers=bearer()) as resp:
        assert resp.status == 400  # unknown fields are refused, and audited all the same
    async with http.get(f"{base}/admin/api/users", params={"q": "x" * 1000}, headers=bearer()) as resp:
        assert resp.status == 200

    rows = await audit_rows(pool, before)
    statuses = [(r["method"], r["status"]) for r in rows]
    assert statuses == [("GET", 404), ("GET", 404), ("GET", 200), ("POST", 201), ("POST", 400), ("GET", 200)]
    stored = " ".join(f"{r['actor']} {r['path']} {r['query']} {r['body']}" for r in rows)
    for secret in (key, key.removeprefix("cpk-"), "sk-upstream", "t0k", "hunter2"):
        assert secret not in stored
    assert rows[0]["query"] == "user=***&q=grace+%26+co"
    assert rows[1]["path"] == "/admin/api/users/***"
    assert rows[2]["query"] == "group=day,model&provider=openai&api_key=***&Access-Token=***&KEY=***"
    assert rows[3]["path"] == url.removeprefix(base) and rows[3]["body"] == '{"credits":100,"reason":"voucher; old key ***"}'
    assert rows[4]["body"] == '{"credits":1,"reason":"x","memo":["***"],"***":1,"Password":"***"}'
    assert rows[5]["query"] == "q=" + "x" * 498  # truncated to audit.LIMIT


async def test_login_keeps_a_signed_session_cookie_not_the_token(admin, pool):
    base, http = admin
    before = await last_audit_id(pool)
    async with http.post(f"{base}/admin/login", data={"token": "wrong"}, allow_redirects=False) as resp:
        assert resp.status == 401 and "not the admin token" in await resp.text()
        assert auth.COOKIE not in resp.cookies
    async with http.post(f"{base}/admin/login", data={"token": ADMIN_TOKEN}, allow_redirects=False) as resp:
        assert resp.status == 303 and resp.headers["Location"] == "/admin/"
        set_cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and "Path=/admin" in set_cookie
    value = set_cookie.split(";")[0].split("=", 1)[1]
    assert ADMIN_TOKEN not in value and auth.session_valid(ADMIN_TOKEN, value, time.time())
    assert not auth.session_valid("another-token", value, time.time())  # a new ADMIN_TOKEN ends sessions
    assert not auth.session_valid(ADMIN_TOKEN, value, time.time() + auth.SESSION_SECONDS + 1)  # and so does time
    expiry, nonce, signature = value.split(".")
    assert not auth.session_valid(ADMIN_TOKEN, f"{int(expiry) + 9999}.{nonce}.{signature}", time.time())

    cookie = {"Cookie": f"{auth.COOKIE}={value}"}
    async with aiohttp.ClientSession() as fresh:
        async with fresh.get(f"{base}/admin/api/users", headers=cookie) as resp:
            assert resp.status == 200
        tampered = value[:-1] + ("1" if value.endswith("0") else "0")
        async with fresh.get(f"{base}/admin/api/users", headers={"Cookie": f"{auth.COOKIE}={tampered}"}) as resp:
            assert resp.status == 401
        # the cookie only reads: a cross-site form post riding on it changes nothing
        async with fresh.post(
            f"{base}/admin/api/users",
            data='{"email": "csrf@example.com", "tier": "starter"}',
            headers={**cookie, "Content-Type": "text/plain"},
        ) as resp:
            assert resp.status == 401
        assert await pool.fetchval("SELECT count(*) FROM users WHERE email = 'csrf@example.com'") == 0
        async with fresh.get(f"{base}/admin/", headers=cookie, allow_redirects=False) as resp:
            assert resp.status == 200 and "default-src 'self'" in resp.headers["Content-Security-Policy"]
        async with fresh.get(f"{base}/admin/", allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "/admin/login"
        async with fresh.get(f"{base}/admin", allow_redirects=False) as resp:
            assert resp.status == 308 and resp.headers["Location"] == "/admin/"
    rows = await audit_rows(pool, before)
    assert [(r["actor"], r["path"], r["status"]) for r in rows][:2] == [
        (f"login:{fingerprint('wrong')}", "/admin/login", 401),
        (f"login:{fingerprint(ADMIN_TOKEN)}", "/admin/login", 303),
    ]
    assert rows[0]["body"] == '{"token":"***"}'
    assert rows[2]["actor"] == f"session:{fingerprint(ADMIN_TOKEN)}" and rows[3]["actor"] == "bad-session"


# users, credits, keys ----------------------------------------------------------------------
async def test_user_lifecycle(admin, ledger, pool):
    base, http = admin
    async with http.post(
        f"{base}/admin/api/users", json={"email": "grace@example.com", "tier": "starter"}, headers=bearer()
    ) as resp:
        assert resp.status == 201
        created = await resp.json()
    user, key = created["user_id"], created["api_key"]
    async with http.post(
        f"{base}/admin/api/users", json={"email": "grace@example.com", "tier": "starter"}, headers=bearer()
    ) as resp:
        assert resp.status == 409
    async with http.get(f"{base}/api/credits", headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200 and (await resp.json())["balance_micro_usd"] == ALLOWANCE["starter"]

    async with http.get(f"{base}/admin/api/users/{user}", headers=bearer()) as resp:
        shown = await resp.json()
    assert shown["account"]["balance"] == ALLOWANCE["starter"] and shown["account"]["held"] == 0
    assert shown["available_micro"] == ALLOWANCE["starter"]
    assert [k["id"] for k in shown["keys"]] == [created["key_id"]]
    async with http.get(f"{base}/admin/api/users", params={"q": "GRACE@example"}, headers=bearer()) as resp:
        assert [u["id"] for u in (await resp.json())["items"]] == [user]

    async with http.post(f"{base}/admin/api/users/{user}/tier", json={"tier": "professional"}, headers=bearer()) as resp:
        assert resp.status == 200
    assert (await account(ledger, user)).tier == "professional"
    change = await pool.fetchrow("SELECT * FROM tier_changes WHERE user_id = $1 ORDER BY id DESC LIMIT 1", user)
    changed = (change["from_tier"], change["to_tier"], change["kind"], change["source"])
    assert changed == ("starter", "professional", "upgrade", "admin")

    async with http.post(f"{base}/admin/api/users/{user}/status", json={"status": "suspended"}, headers=bearer()) as resp:
        assert resp.status == 200
    async with http.get(f"{base}/api/credits", headers={"Authorization": f"Bearer {key}"}) as resp:
        assert (await resp.json())["status"] == "suspended"
    assert await pool.fetchval("SELECT status FROM users WHERE id = $1", user) == "suspended"
    async with http.post(f"{base}/admin/api/users/{user}/status", json={"status": "past_due"}, headers=bearer()) as resp:
        assert resp.status == 400
    async with http.post(f"{base}/admin/api/users/{user}/status", json={"status": "active"}, headers=bearer()) as resp:
        assert resp.status == 200
    assert (await account(ledger, user)).status == "active"
    async with http.get(f"{base}/admin/api/users/usr_nobody", headers=bearer()) as resp:
        assert resp.status == 404 and "no user" in (await resp.json())["error"]["message"]


async def test_grants_and_refunds_are_ledger_entries_with_reasons(admin, make_customer, ledger, usage_log, pool):
    base, http = admin
    customer = await make_customer("starter")
    url = f"{base}/admin/api/users/{customer.user_id}/credits"
    async with http.post(url, json={"credits": 100, "reason": "conference voucher"}, headers=bearer()) as resp:
        assert resp.status == 201 and (await resp.json())["balance_micro"] == ALLOWANCE["starter"] + 1_000_000
    async with http.post(url, json={"kind": "refund", "credits": 5, "reason": "failed upstream call"}, headers=bearer()) as resp:
        assert resp.status == 201 and (await resp.json())["balance_micro"] == ALLOWANCE["starter"] + 1_050_000
    for bad in (
        {"credits": 5},
        {"credits": 0, "reason": "x"},
        {"credits": "5", "reason": "x"},
        {"credits": True, "reason": "x"},
        {"kind": "gift", "credits": 5, "reason": "x"},
        {"kind": "refund", "credits": -5, "reason": "x"},
        {"credits": 10**30, "reason": "x"},
    ):
        async with http.post(url, json=bad, headers=bearer()) as resp:
            assert resp.status == 400, bad
    async with http.post(url, data=b"[1]", headers={**bearer(), "Content-Type": "application/json"}) as resp:
        assert resp.status == 400
    assert (await account(ledger, customer.user_id)).balance == ALLOWANCE["starter"] + 1_050_000

    while await usage_log.drain_once():
        pass
    entries = await pool.fetch(
        "SELECT kind, amount_micro, reason FROM ledger WHERE user_id = $1 AND kind IN ('grant', 'refund')"
        " ORDER BY created_at, id",
        customer.user_id,
    )
    assert [tuple(e) for e in entries][-2:] == [
        ("grant", 1_000_000, "conference voucher"),
        ("refund", 50_000, "failed upstream call"),
    ]


async def test_keys_are_issued_listed_revoked_and_rotated_with_an_overlap(admin, make_customer, pool):
    base, http = admin
    customer = await make_customer("starter")

    async def works(key: str) -> bool:
        async with http.get(f"{base}/api/credits", headers={"Authorization": f"Bearer {key}"}) as resp:
            return resp.status == 200

    async with http.post(f"{base}/admin/api/users/{customer.user_id}/keys", json={"name": "ci"}, headers=bearer()) as resp:
        assert resp.status == 201
        second = await resp.json()
    assert await works(second["api_key"])
    async with http.get(f"{base}/admin/api/users/{customer.user_id}/keys", headers=bearer()) as resp:
        listed = (await resp.json())["items"]
    assert {k["id"] for k in listed} == {customer.key_id, second["key_id"]}
    assert all("api_key" not in k and "key_hash" not in k for k in listed)

    async with http.post(f"{base}/admin/api/keys/{second['key_id']}/revoke", headers=bearer()) as resp:
        assert resp.status == 200
    await asyncio.sleep(0.3)  # KEY_CACHE_SECONDS in tests
    assert not await works(second["api_key"])

    # rotation: the old key keeps working for the overlap, then stops; Postgres records it
    async with http.post(
        f"{base}/admin/api/keys/{customer.key_id}/rotate", json={"overlap_seconds": 2}, headers=bearer()
    ) as resp:
        assert resp.status == 201
        rotated = await resp.json()
    assert rotated["replaces"] == customer.key_id and rotated["overlap_seconds"] == 2
    async with http.post(
        f"{base}/admin/api/keys/{customer.key_id}/rotate", json={"overlap_seconds": 2}, headers=bearer()
    ) as resp:
        assert resp.status == 409  # already being rotated
    assert await works(rotated["api_key"]) and await works(customer.api_key)
    assert await pool.fetchval("SELECT revoked_at FROM api_keys WHERE id = $1", customer.key_id) is None
    await asyncio.sleep(2.4)
    assert not await works(customer.api_key)
    assert await works(rotated["api_key"])
    async with http.get(f"{base}/admin/api/keys", params={"user": customer.user_id}, headers=bearer()) as resp:
        listed = {k["id"]: k for k in (await resp.json())["items"]}
    assert listed[customer.key_id]["revoked_at"] is not None and listed[rotated["key_id"]]["revoked_at"] is None

    # an overlap of 0 revokes at once
    async with http.post(
        f"{base}/admin/api/keys/{rotated['key_id']}/rotate", json={"overlap_seconds": 0}, headers=bearer()
    ) as resp:
        third = await resp.json()
    await asyncio.sleep(0.3)
    assert not await works(rotated["api_key"]) and await works(third["api_key"])
    async with http.post(f"{base}/admin/api/keys/key_nope/rotate", json={}, headers=bearer()) as resp:
        assert resp.status == 404
    async with http.post(
        f"{base}/admin/api/keys/{third['key_id']}/rotate", json={"overlap_seconds": -1}, headers=bearer()
    ) as resp:
        assert resp.status == 400


# usage -------------------------------------------------------------------------------------
async def test_usage_queries_and_each_developer_sees_only_their_own(admin, make_customer, pool):
    base, http = admin
    ada, bob = await make_customer("professional"), await make_customer("starter")
    day1 = datetime(2023, 6, 1, 8, tzinfo=UTC)
    day2 = day1 + timedelta(days=1)
    async with pool.acquire() as conn:
        await db.usage(
            conn, ada.user_id, "professional", "openai", "gpt-4o", day1, uncached=100, output=10, cost=1_000, key_id=ada.key_id
        )
        await db.usage(
            conn,
            ada.user_id,
            "professional",
            "openai",
            "gpt-4o",
            day1,
            uncached=200,
            cached=50,
            output=20,
            cost=2_000,
            key_id=ada.key_id,
        )
        await db.usage(
            conn,
            ada.user_id,
            "professional",
            "anthropic",
            "claude-haiku",
            day2,
            uncached=300,
            output=30,
            cost=3_000,
            key_id="key_other",
        )
        await db.usage(
            conn, bob.user_id, "starter", "openai", "gpt-4o-mini", day2, uncached=400, output=40, cost=4_000, key_id=bob.key_id
        )

    async def admin_usage(**params):
        async with http.get(f"{base}/admin/api/usage", params=params, headers=bearer()) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    page = await admin_usage(user=ada.user_id, group="day,model")
    assert [
        (r["day"], r["model"], r["requests"], r["input_tokens"], r["output_tokens"], r["cost_micro"], r["cost_usd"])
        for r in page["rows"]
    ] == [
        ("2023-06-02", "claude-haiku", 1, 300, 30, 3_000, "0.003000"),
        ("2023-06-01", "gpt-4o", 2, 350, 30, 3_000, "0.003000"),
    ]
    by_key = await admin_usage(key=ada.key_id, group="key")
    assert by_key["rows"] == [
        {
            "key": ada.key_id,
            "requests": 2,
            "input_tokens": 350,
            "cached_input_tokens": 50,
            "output_tokens": 30,
            "tokens": 380,
            "cost_micro": 3_000,
            "cost_usd": "0.003000",
        }
    ]
    by_provider = await admin_usage(**{"from": "2023-06-02", "to": "2023-06-02", "group": "provider,user", "provider": "openai"})
    assert [(r["provider"], r["user"], r["cost_micro"]) for r in by_provider["rows"]] == [("openai", bob.user_id, 4_000)]
    first = await admin_usage(user=ada.user_id, group="day", limit="1")
    assert len(first["rows"]) == 1 and first["next_offset"] == 1 and first["rows"][0]["day"] == "2023-06-02"
    second = await admin_usage(user=ada.user_id, group="day", limit="1", offset="1")
    assert second["rows"][0]["day"] == "2023-06-01" and second["next_offset"] is None
    for bad in ({"group": "day;DROP TABLE users"}, {"limit": "0"}, {"from": "June"}):
        async with http.get(f"{base}/admin/api/usage", params=bad, headers=bearer()) as resp:
            assert resp.status == 400, bad

    async def own(key: str, **params):
        async with http.get(f"{base}/api/usage", params=params, headers={"Authorization": f"Bearer {key}"}) as resp:
            return resp.status, await resp.json()

    status, mine = await own(ada.api_key, user=bob.user_id)  # asking for someone else's changes nothing
    assert status == 200 and mine["user_id"] == ada.user_id
    assert [(r["day"], r["provider"], r["model"], r["cost_micro"]) for r in mine["rows"]] == [
        ("2023-06-02", "anthropic", "claude-haiku", 3_000),
        ("2023-06-01", "openai", "gpt-4o", 3_000),
    ]
    status, theirs = await own(bob.api_key)
    assert [(r["model"], r["cost_micro"]) for r in theirs["rows"]] == [("gpt-4o-mini", 4_000)]
    status, filtered = await own(ada.api_key, provider="openai", limit="1")
    assert [r["model"] for r in filtered["rows"]] == ["gpt-4o"] and filtered["next_offset"] is None
    status, body = await own("cpk-unknown")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = await own(ada.api_key, limit="5000")
    assert status == 400


# the OpenAPI document ----------------------------------------------------------------------
async def test_openapi_document_is_valid_and_lists_every_admin_route(start_proxy):
    from openapi_spec_validator import validate

    proxy = await start_proxy(admin_token=ADMIN_TOKEN)
    routes = {
        (route.method.lower(), route.resource.canonical)
        for sub in proxy.app._subapps
        for route in sub.router.routes()
        if route.method != "HEAD" and route.resource is not None and route.resource.canonical.startswith("/admin/api/")
    }
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/admin/openapi.json") as resp:
        document = await resp.json()
    validate(document)
    documented = {(method, path) for path, methods in document["paths"].items() for method in methods}
    assert routes == documented and len(routes) == 15
