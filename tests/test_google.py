"""The Gemini route end to end: the official ``google-genai`` SDK → proxy → mock Gemini API."""

from __future__ import annotations

import orjson
import pytest
from google import genai
from google.genai import errors, types

from .support.accounts import account, assert_untouched, held_during_stream
from .support.harness import assert_credentials_swapped, assert_forwarded, operator_key
from .support.http import fetch, url_of
from .support.mock_google import google_app
from .support.mock_upstreams import RECEIVED
from .support.money import ALLOWANCE, micro

# gemini-2.5-flash in pricing.yaml, $ per 1M tokens = µ$ per token: input 0.3, cached 0.03, output 2.5.
# Default mock usage: promptTokenCount 1200 of which 200 cached, 300 candidates + 50 thoughts tokens.
DEFAULT_COST = micro((1000, "0.3"), (200, "0.03"), (300 + 50, "2.5"))
assert DEFAULT_COST == 1181
HELLO = "Hello world"
CONTENTS = {"contents": [{"parts": [{"text": "hi"}], "role": "user"}]}


@pytest.fixture
async def proxy(start_proxy):
    """A proxy in front of the mock google upstream."""
    return await start_proxy({"google": google_app()}, database=False)


@pytest.fixture
def mock(proxy):
    """The mock google upstream server."""
    return proxy.upstreams["google"]


@pytest.fixture
async def client(proxy):
    """``google.genai`` async clients pointed at the proxy; extra headers steer the mock."""
    made: list[genai.Client] = []

    def make(api_key: str, **headers: str):
        made.append(genai.Client(api_key=api_key, http_options={"base_url": f"{proxy.url}/google", "headers": headers}))
        return made[-1].aio

    yield make
    for c in made:
        await c.aio.aclose()


async def test_generate_content_bills_thoughts_as_output_and_swaps_the_key(make_customer, client, mock, ledger):
    customer = await make_customer("professional")
    response = await client(customer.api_key).models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert response.text == HELLO
    assert (response.usage_metadata.prompt_token_count, response.usage_metadata.thoughts_token_count) == (1200, 50)
    assert response.sdk_http_response.headers["x-credits-charged"] == "0.1181"
    acct = await account(ledger, customer.user_id)
    assert (acct.balance, acct.held, acct.tokens) == (ALLOWANCE["professional"] - DEFAULT_COST, 0, 1550)
    sent = mock.app[RECEIVED][-1]
    assert sent.path == "/v1/models/gemini-2.5-flash:generateContent"
    assert_credentials_swapped(sent, customer.api_key, "x-goog-api-key", operator_key("google"))
    assert sent.json() == CONTENTS


async def test_sse_stream_bills_the_last_cumulative_usage_with_tool_prompt_as_input(make_customer, client, mock, ledger):
    customer = await make_customer("professional")
    api = client(customer.api_key, **{"x-mock-chunks": "4", "x-mock-usage": "tool=100"})
    chunks = [c async for c in await api.models.generate_content_stream(model="gemini-2.5-flash", contents="hi")]
    assert "".join(c.text for c in chunks) == "Hello world!"
    # Every chunk repeats the usage so far: 75, 150, 225, then 300 candidates tokens; only the last counts.
    assert [c.usage_metadata.candidates_token_count for c in chunks] == [75, 150, 225, 300]
    assert mock.app[RECEIVED][-1].query == "alt=sse"
    cost = micro((1000 + 100, "0.3"), (200, "0.03"), (350, "2.5"))
    assert (await account(ledger, customer.user_id)).balance == ALLOWANCE["professional"] - cost


@pytest.mark.parametrize(
    ("version", "query", "content_type"),
    [
        ("v1beta", "alt=sse", "text/event-stream"),
        ("v1", "", "application/json; charset=UTF-8"),  # a JSON array, streamed element by element
    ],
)
async def test_stream_reaches_the_client_byte_for_byte_and_the_query_key_stays_behind(
    make_customer,
    proxy,
    mock,
    ledger,
    version,
    query,
    content_type,
):
    customer = await make_customer("professional")
    path = f"{version}/models/gemini-2.5-flash:streamGenerateContent"
    steer = {"x-mock-chunks": "5"}
    relayed = await fetch(f"{proxy.url}/google/{path}?{query}&key={customer.api_key}".replace("?&", "?"), steer, CONTENTS)
    direct = await fetch(f"{url_of(mock)}/{path}?{query}", steer, CONTENTS)
    assert (relayed.status, relayed.headers["Content-Type"]) == (200, content_type)
    assert relayed.body == direct.body
    sent = mock.app[RECEIVED][0]
    assert sent.query == query
    assert_credentials_swapped(sent, customer.api_key, "x-goog-api-key", operator_key("google"))
    if not query:
        assert len(orjson.loads(relayed.body)) == 5
    assert (await account(ledger, customer.user_id)).balance == ALLOWANCE["professional"] - DEFAULT_COST


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        # gemini-2.5-pro above 200K prompt tokens: input 2.5, cached 0.25, output (thoughts included) 15
        (
            "prompt=250000,cached=50000,completion=1000,reasoning=500",
            micro((200_000, "2.5"), (50_000, "0.25"), (1500, "15")),
        ),  # 535,000
        # exactly 200K is not above: base prices 1.25, 0.125, 10
        (
            "prompt=200000,cached=50000,completion=1000,reasoning=500",
            micro((150_000, "1.25"), (50_000, "0.125"), (1500, "10")),
        ),  # 208,750
    ],
)
async def test_gemini_25_pro_long_context_price_applies_above_200k(make_customer, client, ledger, usage, expected):
    customer = await make_customer("professional")
    await client(customer.api_key, **{"x-mock-usage": usage}).models.generate_content(model="gemini-2.5-pro", contents="hi")
    assert (await account(ledger, customer.user_id)).balance == ALLOWANCE["professional"] - expected


async def test_flex_service_tier_is_billed_at_flex_prices(make_customer, client, mock, ledger):
    customer = await make_customer("professional")
    config = types.GenerateContentConfig(service_tier=types.ServiceTier.FLEX)
    await client(customer.api_key).models.generate_content(model="gemini-2.5-flash", contents="hi", config=config)
    assert mock.app[RECEIVED][-1].json()["serviceTier"] == "flex"
    cost = micro((1000, "0.15"), (200, "0.03"), (350, "1.25"))  # flex prices: 150 + 6 + 437.5, rounded up once
    assert cost == 594
    assert (await account(ledger, customer.user_id)).balance == ALLOWANCE["professional"] - cost


async def test_embeddings_bill_input_tokens_only(make_customer, client, proxy, mock, ledger):
    customer = await make_customer("professional")
    api = client(customer.api_key, **{"x-mock-usage": "prompt=12345,completion=999"})
    result = await api.models.embed_content(model="gemini-embedding-001", contents=["a", "b"])
    assert [e.values for e in result.embeddings] == [[0.1, -0.2, 0.3]] * 2
    assert mock.app[RECEIVED][-1].path == "/v1/models/gemini-embedding-001:batchEmbedContents"
    first = micro((12345, "0.15"))  # 1851.75 → 1852
    assert (await account(ledger, customer.user_id)).balance == ALLOWANCE["professional"] - first
    single = await fetch(
        f"{proxy.url}/google/v1beta/models/gemini-embedding-001:embedContent",
        {"x-goog-api-key": customer.api_key, "x-mock-usage": "prompt=10"},
        {"content": {"parts": [{"text": "a"}]}},
    )
    assert single.json()["embedding"]["values"] == [0.1, -0.2, 0.3]
    assert (await account(ledger, customer.user_id)).balance == ALLOWANCE["professional"] - first - micro((10, "0.15"))


async def test_hold_covers_max_output_tokens_of_every_candidate(make_customer, proxy, mock, ledger):
    customer = await make_customer("professional")
    body = {**CONTENTS, "generationConfig": {"maxOutputTokens": 100, "candidateCount": 2}}
    held = await held_during_stream(
        f"{proxy.url}/google/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        {"x-goog-api-key": customer.api_key, "x-mock-scenario": "slow"},
        body,
        ledger,
        customer.user_id,
    )
    # every prompt byte (+64 template tokens) at the dearest input price, 0.3; 2 × 100 output tokens at 2.5
    assert held == micro((len(mock.app[RECEIVED][-1].body) + 64, "0.3"), (200, "2.5"))
    assert (await account(ledger, customer.user_id)).held == 0


async def test_count_tokens_and_model_listing_are_free(make_customer, client, mock, ledger):
    customer = await make_customer("professional")
    api = client(customer.api_key, **{"x-mock-usage": "prompt=42"})
    assert (await api.models.count_tokens(model="gemini-2.5-flash", contents="hi")).total_tokens == 42
    assert [m.name async for m in await api.models.list()] == ["models/gemini-2.5-flash"]
    assert_forwarded(
        mock, ["/v1/models/gemini-2.5-flash:countTokens", "/v1/models"], customer.api_key, "x-goog-api-key", "google"
    )
    await assert_untouched(ledger, customer.user_id, ALLOWANCE["professional"])


async def test_tier_without_google_gets_permission_denied_and_nothing_is_forwarded(make_customer, client, mock, ledger):
    customer = await make_customer("starter")
    with pytest.raises(errors.ClientError) as err:
        await client(customer.api_key).models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert (err.value.code, err.value.status) == (403, "PERMISSION_DENIED")
    assert "starter plan does not include google" in err.value.message
    assert err.value.details["error"]["details"][0]["reason"] == "PROVIDER_NOT_IN_TIER"
    assert mock.app[RECEIVED] == []
    await assert_untouched(ledger, customer.user_id, ALLOWANCE["starter"])


@pytest.mark.parametrize(
    ("status", "error", "name"),
    [
        (400, errors.ClientError, "INVALID_ARGUMENT"),
        (429, errors.ClientError, "RESOURCE_EXHAUSTED"),
        (500, errors.ServerError, "INTERNAL"),
    ],
)
async def test_upstream_errors_pass_through_and_cost_nothing(make_customer, client, ledger, status, error, name):
    customer = await make_customer("professional")
    with pytest.raises(error) as err:
        api = client(customer.api_key, **{"x-mock-scenario": f"error-{status}"})
        await api.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert (err.value.code, err.value.status, err.value.message) == (status, name, f"mock upstream error {status}")
    await assert_untouched(ledger, customer.user_id, ALLOWANCE["professional"])


async def test_unknown_key_gets_unauthenticated(client, mock):
    with pytest.raises(errors.ClientError) as err:
        await client("cpk-not-a-key").models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert (err.value.code, err.value.status) == (401, "UNAUTHENTICATED")
    assert mock.app[RECEIVED] == []


@pytest.mark.parametrize(
    ("path", "status", "name"),
    [
        ("v1beta/models/gemini-9-imaginary:generateContent", 404, "NOT_FOUND"),
        ("v1beta/cachedContents", 404, "NOT_FOUND"),
        ("v1beta/tunedModels/my-model:generateContent", 404, "NOT_FOUND"),
        ("v1beta/models/gemini-2.5-flash:batchGenerateContent", 404, "NOT_FOUND"),
    ],
)
async def test_requests_the_gateway_cannot_bill_are_refused_before_upstream(
    make_customer,
    proxy,
    mock,
    ledger,
    path,
    status,
    name,
):
    customer = await make_customer("professional")
    raw = await fetch(f"{proxy.url}/google/{path}", {"x-goog-api-key": customer.api_key}, CONTENTS)
    assert (raw.status, raw.json()["error"]["code"], raw.json()["error"]["status"]) == (status, status, name)
    assert mock.app[RECEIVED] == []
    await assert_untouched(ledger, customer.user_id, ALLOWANCE["professional"])
