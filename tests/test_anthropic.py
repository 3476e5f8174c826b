"""The Anthropic route end to end: the official ``anthropic`` SDK → proxy → mock Messages API."""

from __future__ import annotations

import anthropic
import pytest

from .support.accounts import account, assert_untouched, held_during_stream
from .support.harness import assert_credentials_swapped, assert_forwarded, operator_key
from .support.http import fetch, url_of
from .support.mock_anthropic import THINKING_TEXT, anthropic_app
from .support.mock_upstreams import RECEIVED
from .support.money import ALLOWANCE, micro

# claude-sonnet-4-6 in pricing.yaml, $ per 1M tokens = µ$ per token: input 3, cache read 0.3,
# 5-minute cache write 3.75, 1-hour cache write 6, output 15.
# Default mock usage: 1200 uncached input tokens, 200 cache reads, 300 output tokens:
DEFAULT_COST = micro((1200, "3"), (200, "0.3"), (300, "15"))  # Anthropic's 1200 excludes the 200 cached
assert DEFAULT_COST == 8160
HELLO = "Hello world"
MESSAGE = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def proxy(start_proxy):
    """A proxy in front of the mock anthropic upstream."""
    return await start_proxy({"anthropic": anthropic_app()}, database=False)


@pytest.fixture
def mock(proxy):
    """The mock anthropic upstream server."""
    return proxy.upstreams["anthropic"]


@pytest.fixture
async def client(proxy):
    """``anthropic.AsyncAnthropic`` clients pointed at the proxy."""
    made: list[anthropic.AsyncAnthropic] = []

    def make(api_key: str) -> anthropic.AsyncAnthropic:
        made.append(anthropic.AsyncAnthropic(base_url=f"{proxy.url}/anthropic", api_key=api_key, max_retries=0))
        return made[-1]

    yield make
    for c in made:
        await c.close()


async def test_cache_reads_and_writes_are_billed_at_their_own_prices(make_customer, client, mock, ledger):
    customer = await make_customer("professional")
    usage = "prompt=1000,cached=2000,write5m=400,write1h=100,completion=300"
    raw = await client(customer.api_key).messages.with_raw_response.create(
        model="claude-sonnet-4-6",
        max_tokens=512,
        messages=MESSAGE,
        extra_headers={"x-mock-usage": usage, "anthropic-beta": "context-1m-2025-08-07"},
    )
    message = await raw.parse()
    assert message.content[0].text == HELLO
    assert (message.usage.cache_read_input_tokens, message.usage.cache_creation.ephemeral_1h_input_tokens) == (2000, 100)
    cost = micro((1000, "3"), (2000, "0.3"), (400, "3.75"), (100, "6"), (300, "15"))
    assert cost == 10_200
    assert raw.headers["x-credits-charged"] == "1.0200"
    acct = await account(ledger, customer.user_id)
    assert (acct.balance, acct.held, acct.tokens) == (ALLOWANCE["professional"] - cost, 0, 3800)

    sent = mock.app[RECEIVED][-1]
    assert_credentials_swapped(sent, customer.api_key, "x-api-key", operator_key("anthropic"))
    assert "authorization" not in {k.lower() for k in sent.headers}
    assert sent.headers["anthropic-version"] == raw.http_request.headers["anthropic-version"]
    assert sent.headers["anthropic-beta"] == "context-1m-2025-08-07"
    assert sent.json() == {"model": "claude-sonnet-4-6", "max_tokens": 512, "messages": MESSAGE}


async def test_stream_bills_the_last_message_delta_with_thinking_as_output(make_customer, client, ledger):
    customer = await make_customer("professional")
    async with client(customer.api_key).messages.stream(
        model="claude-sonnet-4-6",
        max_tokens=1024,
        messages=MESSAGE,
        thinking={"type": "enabled", "budget_tokens": 512},
        extra_headers={"x-mock-scenario": "thinking"},
    ) as stream:
        message = await stream.get_final_message()
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert (message.content[0].thinking, message.content[1].text) == (THINKING_TEXT, HELLO)
    # message_start said output_tokens=1; the final message_delta's 300 (50 of them thinking) replaces it.
    assert message.usage.output_tokens == 300
    assert (await account(ledger, customer.user_id)).balance == ALLOWANCE["professional"] - DEFAULT_COST


async def test_stream_reaches_the_client_byte_for_byte(make_customer, client, mock, ledger):
    customer = await make_customer("professional")
    extra = {"x-mock-chunks": "6", "x-mock-usage": "write1h=1000"}
    async with client(customer.api_key).messages.with_streaming_response.create(
        model="claude-sonnet-4-6",
        max_tokens=64,
        messages=MESSAGE,
        stream=True,
        extra_headers=extra,
    ) as response:
        relayed = b"".join([chunk async for chunk in response.iter_bytes()])
    sent = mock.app[RECEIVED][-1]
    direct = await fetch(f"{url_of(mock)}/v1/messages", extra, sent.json())
    assert relayed == direct.body
    assert relayed.startswith(b"event: message_start\n") and relayed.endswith(b'data: {"type":"message_stop"}\n\n')
    # The 1-hour split of cache writes comes only in message_start; message_delta's totals do not repeat it.
    assert (await account(ledger, customer.user_id)).balance == ALLOWANCE["professional"] - DEFAULT_COST - micro((1000, "6"))


async def test_stream_cut_before_message_delta_charges_exact_input_and_estimated_output(
    make_customer,
    proxy,
    mock,
    ledger,
    usage_log,
    pool,
):
    customer = await make_customer("professional")
    raw = await fetch(
        f"{proxy.url}/anthropic/v1/messages",
        {"x-api-key": customer.api_key, "x-mock-scenario": "cut"},
        {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": MESSAGE, "stream": True},
    )
    assert raw.status == 200 and b"message_delta" not in raw.body
    # Input and cache reads as message_start reported them; output ⌈len("Hello world") / 4⌉ = 3 tokens.
    expected = micro((1200, "3"), (200, "0.3"), (3, "15"))
    assert (await account(ledger, customer.user_id)).balance == ALLOWANCE["professional"] - expected
    while await usage_log.drain_once():
        pass
    row = await pool.fetchrow("SELECT cost_micro, estimated FROM usage_events WHERE user_id = $1", customer.user_id)
    assert (row["cost_micro"], row["estimated"]) == (expected, True)


async def test_hold_is_max_tokens_exactly(make_customer, proxy, mock, ledger):
    customer = await make_customer("professional")
    body = {"model": "claude-sonnet-4-6", "max_tokens": 777, "messages": MESSAGE, "stream": True}
    held = await held_during_stream(
        f"{proxy.url}/anthropic/v1/messages",
        {"x-api-key": customer.api_key, "x-mock-scenario": "slow"},
        body,
        ledger,
        customer.user_id,
    )
    # Every prompt byte (+64 template tokens) at the dearest input price (1-hour write, 6), plus 777 × 15.
    assert held == (len(mock.app[RECEIVED][-1].body) + 64) * 6 + 777 * 15
    assert (await account(ledger, customer.user_id)).held == 0


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        # claude-haiku-5-5 above 100K prompt tokens: input 0.5, cache read 0.05, output 2.5
        ("prompt=150000,cached=0,completion=1000", micro((150_000, "0.5"), (1000, "2.5"))),
        # exactly 100K (60K uncached + 40K cache reads) is not above: base prices 0.1, 0.01, 0.5
        ("prompt=60000,cached=40000,completion=1000", micro((60_000, "0.1"), (40_000, "0.01"), (1000, "0.5"))),
    ],
)
async def test_long_context_prices_apply_above_the_threshold(make_customer, client, ledger, usage, expected):
    customer = await make_customer("professional")
    await client(customer.api_key).messages.create(
        model="claude-haiku-5-5", max_tokens=1000, messages=MESSAGE, extra_headers={"x-mock-usage": usage}
    )
    assert (await account(ledger, customer.user_id)).balance == ALLOWANCE["professional"] - expected


async def test_count_tokens_and_model_listing_are_free(make_customer, client, mock, ledger):
    customer = await make_customer("professional")
    api = client(customer.api_key)
    counted = await api.messages.count_tokens(
        model="claude-sonnet-4-6", messages=MESSAGE, extra_headers={"x-mock-usage": "prompt=42"}
    )
    assert counted.input_tokens == 42
    assert [m.id async for m in api.models.list()] == ["claude-sonnet-4-6"]
    assert_forwarded(mock, ["/v1/messages/count_tokens", "/v1/models"], customer.api_key, "x-api-key", "anthropic")
    await assert_untouched(ledger, customer.user_id, ALLOWANCE["professional"])


async def test_tier_without_anthropic_gets_permission_error_and_nothing_is_forwarded(make_customer, client, mock, ledger):
    customer = await make_customer("starter")
    with pytest.raises(anthropic.PermissionDeniedError) as err:
        await client(customer.api_key).messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGE)
    assert err.value.body["type"] == "error"
    assert err.value.body["error"]["type"] == "permission_error"
    assert "starter plan does not include anthropic" in err.value.body["error"]["message"]
    assert err.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(anthropic.PermissionDeniedError):  # free endpoints are the tier's providers' only
        await client(customer.api_key).messages.count_tokens(model="claude-sonnet-4-6", messages=MESSAGE)
    assert mock.app[RECEIVED] == []
    await assert_untouched(ledger, customer.user_id, ALLOWANCE["starter"])


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, anthropic.BadRequestError),
        (429, anthropic.RateLimitError),
        (529, anthropic.OverloadedError),
    ],
)
async def test_upstream_errors_pass_through_and_cost_nothing(make_customer, client, ledger, status, error):
    customer = await make_customer("professional")
    with pytest.raises(error) as err:
        await client(customer.api_key).messages.create(
            model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGE, extra_headers={"x-mock-scenario": f"error-{status}"}
        )
    assert err.value.body["error"]["message"] == f"mock upstream error {status}"
    assert err.value.body["request_id"] == "req_mock"
    await assert_untouched(ledger, customer.user_id, ALLOWANCE["professional"])


async def test_key_is_taken_from_x_api_key_or_bearer_and_unknown_keys_get_authentication_error(
    make_customer,
    client,
    proxy,
    mock,
):
    customer = await make_customer("professional")
    body = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": MESSAGE}
    raw = await fetch(f"{proxy.url}/anthropic/v1/messages", {"x-api-key": customer.api_key}, body)
    assert raw.status == 200 and raw.json()["content"][0]["text"] == HELLO
    assert_credentials_swapped(mock.app[RECEIVED][-1], customer.api_key, "x-api-key", operator_key("anthropic"))
    with pytest.raises(anthropic.AuthenticationError) as err:
        await client("cpk-not-a-key").messages.create(**body)
    assert err.value.body["error"]["type"] == "authentication_error"
    assert len(mock.app[RECEIVED]) == 1


@pytest.mark.parametrize(
    ("path", "body", "status", "kind"),
    [
        ("v1/messages", {"model": "claude-sonnet-4-6", "messages": MESSAGE}, 400, "invalid_request_error"),
        (
            "v1/messages",
            {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": MESSAGE, "speed": "fast"},
            400,
            "invalid_request_error",
        ),
        (
            "v1/messages",
            {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": MESSAGE, "inference_geo": "us"},
            400,
            "invalid_request_error",
        ),
        ("v1/messages", {"model": "claude-imaginary-9", "max_tokens": 10, "messages": MESSAGE}, 404, "not_found_error"),
        ("v1/messages/batches", {"requests": []}, 404, "not_found_error"),
    ],
)
async def test_requests_the_gateway_cannot_bill_are_refused_before_upstream(
    make_customer,
    proxy,
    mock,
    ledger,
    path,
    body,
    status,
    kind,
):
    customer = await make_customer("professional")
    raw = await fetch(f"{proxy.url}/anthropic/{path}", {"Authorization": f"Bearer {customer.api_key}"}, body)
    assert (raw.status, raw.json()["type"], raw.json()["error"]["type"]) == (status, "error", kind)
    assert mock.app[RECEIVED] == []
    await assert_untouched(ledger, customer.user_id, ALLOWANCE["professional"])
