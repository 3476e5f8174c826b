"""The OpenAI route end to end: the official SDK → proxy → mock OpenAI upstream."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import aiohttp
import openai
import orjson
import pytest

from .support.accounts import account
from .support.harness import operator_key
from .support.mock_upstreams import RECEIVED
from .support.money import ALLOWANCE, credits_text

# gpt-4o-mini: $0.15 input, $0.075 cached input, $0.60 output per 1M tokens, i.e. µ$ per token.
# Default mock usage: 1200 prompt tokens of which 200 cached, 300 completion tokens:
# 1000 × 0.15 + 200 × 0.075 + 300 × 0.6 = 150 + 15 + 180 = 345 µ$, the charge asserted below.


async def test_chat_completion_charges_exact_cost_and_swaps_credentials(make_customer, openai_client, upstream, ledger):
    customer = await make_customer("starter")
    client = openai_client(customer.api_key)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=50,
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello world"
    assert completion.usage.prompt_tokens == 1200
    assert raw.headers["x-credits-charged"] == "0.0345"
    assert raw.headers["x-credits-remaining"] == credits_text(ALLOWANCE["starter"] - 345)

    acct = await account(ledger, customer.user_id)
    assert acct.balance == ALLOWANCE["starter"] - 345
    assert acct.held == 0 and acct.open_holds == 0
    assert acct.tokens == 1500 and acct.requests == 1 and acct.cost == 345

    sent = upstream.app[RECEIVED][-1]
    assert sent.headers["Authorization"] == f"Bearer {operator_key('openai')}"
    assert customer.api_key not in orjson.dumps(sent.headers).decode()
    assert sent.json() == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}


async def test_stream_without_include_usage_is_metered_and_client_sees_plain_stream(
    make_customer,
    openai_client,
    upstream,
    ledger,
    proxy_url,
):
    customer = await make_customer("starter")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{proxy_url}/openai/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {customer.api_key}"}
        ) as resp,
    ):
        assert resp.status == 200
        streamed = await resp.read()
    # upstream was asked for usage, the client got the stream it asked for: no usage anywhere
    assert upstream.app[RECEIVED][-1].json()["stream_options"] == {"include_usage": True}
    assert b'"usage"' not in streamed
    events = [e for e in streamed.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert len(events) == 1 + 3 + 1 + 1  # role chunk, 3 text chunks, finish chunk, [DONE]
    acct = await account(ledger, customer.user_id)
    assert acct.balance == ALLOWANCE["starter"] - 345 and acct.held == 0


async def test_stream_with_include_usage_passes_usage_through(make_customer, openai_client, ledger):
    customer = await make_customer("starter")
    client = openai_client(customer.api_key)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-chunks": "5"},
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == "Hello world! How"
    assert usage is not None and usage.completion_tokens == 300
    assert (await account(ledger, customer.user_id)).balance == ALLOWANCE["starter"] - 345


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_api(make_customer, openai_client, ledger, stream):
    customer = await make_customer("starter")
    client = openai_client(customer.api_key)
    usage = "prompt=5000,completion=1000,cached=4000,reasoning=600"
    if stream:
        events = [
            e
            async for e in await client.responses.create(
                model="gpt-4.1", input="hi", stream=True, extra_headers={"x-mock-usage": usage}
            )
        ]
        assert events[-1].type == "response.completed"
    else:
        response = await client.responses.create(model="gpt-4.1", input="hi", extra_headers={"x-mock-usage": usage})
        assert response.output_text == "Hello world"
    # gpt-4.1: $2 input, $0.50 cached, $8 output: 1000×2 + 4000×0.5 + 1000×8 = 12,000 µ$
    assert (await account(ledger, customer.user_id)).balance == ALLOWANCE["starter"] - 12_000


async def test_embeddings_and_completions(make_customer, openai_client, ledger):
    customer = await make_customer("starter")
    client = openai_client(customer.api_key)
    emb = await client.embeddings.create(
        model="text-embedding-3-small", input=["a", "b"], extra_headers={"x-mock-usage": "prompt=12345"}
    )
    assert len(emb.data) == 2
    # text-embedding-3-small: $0.02 per 1M: 12345 × 0.02 = 246.9 µ$ → rounded up once to 247
    assert (await account(ledger, customer.user_id)).balance == ALLOWANCE["starter"] - 247
    completion = await client.completions.create(
        model="gpt-4o-mini", prompt="hi", max_tokens=5, extra_headers={"x-mock-usage": "prompt=10,completion=5,cached=0"}
    )
    assert completion.choices[0].text == "Hello world"
    # 10 × 0.15 + 5 × 0.6 = 4.5 µ$ → 5
    assert (await account(ledger, customer.user_id)).balance == ALLOWANCE["starter"] - 247 - 5


async def test_upstream_error_passes_through_and_costs_nothing(make_customer, openai_client, ledger):
    customer = await make_customer("starter")
    client = openai_client(customer.api_key)
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], extra_headers={"x-mock-scenario": "error-400"}
        )
    assert err.value.body["message"] == "mock upstream error 400"
    acct = await account(ledger, customer.user_id)
    assert acct.balance == ALLOWANCE["starter"] and acct.held == 0 and acct.requests == 0


async def test_unknown_and_missing_keys_get_401(openai_client, proxy_url):
    with pytest.raises(openai.AuthenticationError) as err:
        await openai_client("cpk-not-a-key").chat.completions.create(model="gpt-4o-mini", messages=[])
    assert err.value.code == "invalid_api_key"
    async with aiohttp.ClientSession() as http, http.post(f"{proxy_url}/openai/v1/chat/completions", json={}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_api_key"


async def test_keys_of_any_bytes_are_a_401_without_a_redis_lookup(proxy_url, openai_proxy, monkeypatch):
    """Invalid UTF-8 used to be a 500 (the header decodes to surrogates that cannot be
    hashed); a string not shaped like an issued key is unknown at once."""
    from proxy.state import GATE

    cache = openai_proxy.app[GATE].keys
    looked_up: list[str] = []
    monkeypatch.setattr(cache.mirror, "get", lambda key_hash: looked_up.append(key_hash))
    raw = [b"Bearer cpk-\xff\xfe", b"Bearer cpk-" + b"A" * 5000, b"Bearer " + b"\xc3\xa9" * 43]
    for value in raw:
        reader, writer = await asyncio.open_connection(*proxy_url.removeprefix("http://").split(":"))
        writer.write(
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: " + value
            + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        )  # fmt: skip
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 401") and b"invalid_api_key" in answer, answer[:200]
    assert looked_up == []


async def test_bad_requests_are_refused_before_upstream(make_customer, openai_client, upstream, proxy_url, settings, ledger):
    customer = await make_customer("starter")
    auth = {"Authorization": f"Bearer {customer.api_key}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{proxy_url}/openai/v1/chat/completions", data=b"{not json", headers=auth) as resp,
    ):
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_json"
        big = b'{"model":"gpt-4o-mini","messages":[],"x":"' + b"a" * settings.max_body_bytes + b'"}'
        async with http.post(f"{proxy_url}/openai/v1/chat/completions", data=big, headers=auth) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "request_too_large"
        async with http.post(f"{proxy_url}/openai/v1/chat/completions", json={"messages": []}, headers=auth) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "missing_model"
    with pytest.raises(openai.NotFoundError) as err:
        await openai_client(customer.api_key).chat.completions.create(model="gpt-9-imaginary", messages=[])
    assert err.value.code == "model_not_found"
    assert upstream.app[RECEIVED] == []
    assert (await account(ledger, customer.user_id)).balance == ALLOWANCE["starter"]


async def test_tier_model_access_refused_with_403(make_customer, openai_client, upstream):
    customer = await make_customer("free")
    client = openai_client(customer.api_key)
    with pytest.raises(openai.PermissionDeniedError) as err:
        await client.chat.completions.with_raw_response.create(model="gpt-4.1", messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "model_not_in_tier"
    assert err.value.response.headers["x-should-retry"] == "false"
    assert "Upgrade" in err.value.message
    assert upstream.app[RECEIVED] == []
    # an allowed model works on the same tier
    await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], max_tokens=10)


async def test_credits_exhausted_gives_403_insufficient_credits(make_customer, openai_client, upstream, ledger):
    customer = await make_customer("starter", balance_micro=0)
    with pytest.raises(openai.PermissionDeniedError) as err:
        await openai_client(customer.api_key).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    assert err.value.code == "insufficient_credits"
    assert err.value.response.headers["x-should-retry"] == "false"
    assert "Top up or upgrade" in err.value.message
    cycle_end = (await account(ledger, customer.user_id)).cycle_end // 1000
    assert f"renew ({datetime.fromtimestamp(cycle_end, tz=UTC):%Y-%m-%dT%H:%M:%SZ})" in err.value.message
    assert upstream.app[RECEIVED] == []
    assert (await account(ledger, customer.user_id)).held == 0


async def test_lenient_admits_while_credit_remains_strict_only_the_worst_case_that_fits(
    make_customer,
    openai_client,
    ledger,
    upstream,
):
    """100 µ$ left; the request's worst case (1,000 output tokens at 0.6 µ$) is over 600 µ$,
    its actual cost 345 µ$ (the mock's usage)."""
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
    lenient = await make_customer("starter", balance_micro=100)
    await openai_client(lenient.api_key).chat.completions.create(**request)
    assert (await account(ledger, lenient.user_id)).balance == 100 - 345  # below zero by less than one request

    strict = await make_customer("free", balance_micro=100)
    forwarded = len(upstream.app[RECEIVED])
    with pytest.raises(openai.PermissionDeniedError) as err:
        await openai_client(strict.api_key).chat.completions.create(**request)
    assert err.value.code == "insufficient_credits" and "may cost up to" in err.value.message
    assert len(upstream.app[RECEIVED]) == forwarded
    assert (await account(ledger, strict.user_id)).balance == 100


async def test_monthly_request_limit_gives_429(make_customer, openai_client, ledger, settings):
    customer = await make_customer("starter")
    await ledger.redis.hset(ledger.keys.account(customer.user_id), "requests", 2000)  # the starter limit
    with pytest.raises(openai.RateLimitError) as err:
        await openai_client(customer.api_key).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    assert err.value.code == "monthly_request_limit"
    assert err.value.response.headers["x-should-retry"] == "false"


async def test_monthly_token_limit_gives_429(make_customer, openai_client, ledger):
    customer = await make_customer("starter")
    await ledger.redis.hset(ledger.keys.account(customer.user_id), "tokens", 500_000)
    with pytest.raises(openai.RateLimitError) as err:
        await openai_client(customer.api_key).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=[])
    assert err.value.code == "monthly_token_limit"
    assert err.value.response.headers["x-should-retry"] == "false"
    assert "monthly limit of 500,000 tokens is reached" in err.value.message


async def test_rpm_limit_gives_retryable_429(make_customer, openai_client):
    customer = await make_customer("free")  # rpm 10
    client = openai_client(customer.api_key)
    for _ in range(10):
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], max_tokens=5)
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=[], max_tokens=5)
    assert err.value.code == "rate_limit_exceeded"
    assert err.value.response.headers["x-should-retry"] == "true"
    assert int(err.value.response.headers["retry-after"]) >= 1


async def test_api_credits_reports_balance_usage_limits_and_cycle(make_customer, openai_client, proxy_url):
    customer = await make_customer("professional")
    await openai_client(customer.api_key).chat.completions.create(model="gpt-4o-mini", messages=[], max_tokens=5)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{proxy_url}/api/credits", headers={"Authorization": f"Bearer {customer.api_key}"}) as resp,
    ):
        data = await resp.json()
    assert data["tier"] == "professional"
    assert data["balance_micro_usd"] == ALLOWANCE["professional"] - 345
    assert data["held_micro_usd"] == 0
    assert data["usage"] == {"tokens": 1500, "requests": 1, "cost_micro_usd": 345, "cost_usd": 0.000345}
    assert data["limits"]["monthly_tokens"] == 5_000_000 and data["limits"]["monthly_requests"] == 10_000
    assert data["cycle"]["start"].endswith("Z") and data["cycle"]["end"] > data["cycle"]["start"]


async def test_revoked_key_stops_working(make_customer, openai_client, accounts):
    customer = await make_customer("starter")
    client = openai_client(customer.api_key)
    await client.chat.completions.create(model="gpt-4o-mini", messages=[], max_tokens=5)
    await accounts.revoke_key(customer.key_id)
    import asyncio

    await asyncio.sleep(0.3)  # the test proxy caches keys for 0.2 s
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=[], max_tokens=5)


async def test_a_revocation_whose_redis_step_failed_is_repaired_by_the_mirror_sync(make_customer, accounts, pool, monkeypatch):
    from proxy.accounts import sync_key_mirror
    from proxy.keys import hash_key

    customer = await make_customer("starter")
    other = await make_customer("starter")

    async def redis_down(*key_hashes):
        raise ConnectionError("Redis unreachable")

    with monkeypatch.context() as patched:
        patched.setattr(accounts.mirror, "remove", redis_down)
        with pytest.raises(ConnectionError):
            await accounts.revoke_key(customer.key_id)  # Postgres says revoked, Redis still has it
    assert await accounts.mirror.get(hash_key(customer.api_key)) is not None

    await sync_key_mirror(pool, accounts.mirror)  # the worker runs it at start
    assert await accounts.mirror.get(hash_key(customer.api_key)) is None
    assert await accounts.mirror.get(hash_key(other.api_key)) == (other.user_id, other.key_id)


async def test_model_listing_is_free_and_forwarded(make_customer, openai_client, upstream, ledger):
    customer = await make_customer("starter")
    client = openai_client(customer.api_key)
    models = await client.models.list()
    assert [m.id for m in models.data] == ["gpt-4o-mini"]
    assert upstream.app[RECEIVED][-1].headers["Authorization"] == f"Bearer {operator_key('openai')}"
    fine_tune = "ft:gpt-4o-mini-2024-07-18:acme:support:A1b2C3"  # ids of fine-tunes hold ":"
    assert (await client.models.retrieve(fine_tune)).id == fine_tune
    assert upstream.app[RECEIVED][-1].path == f"/v1/models/{fine_tune}"
    # the traversal that once reached GET /v1/files with the operator's key
    with pytest.raises(openai.NotFoundError) as err:
        await client.models.retrieve("../../v1/files")
    assert err.value.code == "unsupported_endpoint"
    with pytest.raises(openai.NotFoundError):
        await client.models.delete(fine_tune)  # DELETE is not a known endpoint: the operator's fine-tune stays
    assert [r.path for r in upstream.app[RECEIVED]] == ["/v1/models", f"/v1/models/{fine_tune}"]
    assert (await account(ledger, customer.user_id)).balance == ALLOWANCE["starter"]


async def test_hop_by_hop_and_account_headers_stay_behind(make_customer, upstream, proxy_url):
    customer = await make_customer("starter")
    headers = {
        "Authorization": f"Bearer {customer.api_key}",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "OpenAI-Organization": "org-caller",
        "X-Request-Tag": "kept",
    }
    body = {"model": "gpt-4o-mini", "messages": [], "max_tokens": 5}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{proxy_url}/openai/v1/chat/completions", json=body, headers=headers) as resp,
    ):
        assert resp.status == 200
        assert operator_key("openai") not in str(resp.headers)
    sent = {k.lower(): v for k, v in upstream.app[RECEIVED][-1].headers.items()}
    assert sent["x-request-tag"] == "kept" and sent["authorization"] == f"Bearer {operator_key('openai')}"
    for dropped in ("proxy-authorization", "keep-alive", "te", "openai-organization"):
        assert dropped not in sent
