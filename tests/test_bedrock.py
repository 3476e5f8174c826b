"""Amazon Bedrock end to end: boto3 (in a thread: the proxy runs in the test's event loop)
→ proxy → a mock Bedrock runtime that verifies the operator's SigV4 signature.

Callers sign with the proxy key as access key id; the proxy signs again as the operator.
Prices are µ$ per token from pricing.yaml; enterprise accounts start at their allowance.
"""

from __future__ import annotations

import asyncio
import base64
import math
from types import SimpleNamespace
from typing import Any

import aiohttp
import boto3
import orjson
import pytest
from botocore.config import Config
from botocore.eventstream import EventStreamBuffer
from botocore.exceptions import ClientError
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import load_config
from proxy.errors import ProxyError
from proxy.providers.bedrock import BedrockProvider
from proxy.providers.registry import build_providers
from proxy.settings import Settings

from .support.accounts import account
from .support.mock_bedrock import OPERATOR_ACCESS_KEY, OPERATOR_REGION, OPERATOR_SECRET, SENT, bedrock_app, encode_message, event
from .support.mock_upstreams import RECEIVED
from .support.money import ALLOWANCE

ENTERPRISE = ALLOWANCE["enterprise"]
HAIKU = "global.anthropic.claude-haiku-4-5-20251001-v1:0"
SONNET_US = "us.anthropic.claude-sonnet-4-6"
MESSAGES = [{"role": "user", "content": [{"text": "hi"}]}]
OPERATOR_ENV = {"AWS_ACCESS_KEY_ID": OPERATOR_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": OPERATOR_SECRET, "AWS_REGION": OPERATOR_REGION}


@pytest.fixture
async def bedrock(start_proxy):
    """The proxy's URL and the mock Bedrock runtime's app (what it received and sent)."""
    proxy = await start_proxy({"bedrock": bedrock_app()}, env=OPERATOR_ENV, database=False)
    return SimpleNamespace(url=proxy.url, app=proxy.upstreams["bedrock"].app)


def runtime(bedrock, api_key: str, attempts: int = 1, **headers: str):
    """A boto3 bedrock-runtime client signing with the proxy key; ``headers`` steer the mock."""
    client = boto3.client(
        "bedrock-runtime",
        region_name="eu-west-3",
        endpoint_url=f"{bedrock.url}/bedrock",
        aws_access_key_id=api_key,
        aws_secret_access_key="unused",
        config=Config(retries={"max_attempts": attempts, "mode": "standard"}),
    )

    def steer(request: Any, **_: Any) -> None:
        for name, value in headers.items():
            request.headers[name.replace("_", "-")] = value

    client.meta.events.register("before-sign.bedrock-runtime.*", steer)
    return client


async def call(method, **kwargs):
    """Run a boto3 call in a thread, reading its body (bytes) or event stream (a list) there too."""

    def run():
        response = method(**kwargs)
        for name in ("stream", "body"):
            value = response.get(name)
            if hasattr(value, "read"):
                response[name] = value.read()
            elif value is not None:
                response[name] = list(value)
        return response

    return await asyncio.to_thread(run)


def assert_signed_by_operator(bedrock, proxy_key: str) -> Any:
    """The mock verified the operator's signature (else it answers 403); no trace of the proxy key."""
    sent = bedrock.app[RECEIVED][-1]
    assert sent.headers["Authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={OPERATOR_ACCESS_KEY}/")
    assert proxy_key not in orjson.dumps(sent.headers).decode()
    return sent


async def test_event_stream_encoder_round_trips_through_botocore():
    buffer = EventStreamBuffer()
    metadata = encode_message({":event-type": "metadata", ":message-type": "event"}, b'{"a":1}')
    wire = metadata + event("messageStop", {"stopReason": "end_turn"})
    for i in range(0, len(wire), 5):
        buffer.add_data(wire[i : i + 5])
    messages = list(buffer)
    assert [(m.headers[":event-type"], m.payload) for m in messages] == [
        ("metadata", b'{"a":1}'),
        ("messageStop", b'{"stopReason":"end_turn"}'),
    ]


async def test_converse_charges_cache_reads_and_writes_by_ttl(make_customer, bedrock, ledger):
    customer = await make_customer("enterprise")
    client = runtime(bedrock, customer.api_key, x_mock_usage="prompt=1000,completion=300,cached=2000,write=400,write1h=100")
    response = await call(client.converse, modelId=SONNET_US, messages=MESSAGES, inferenceConfig={"maxTokens": 500})
    assert response["output"]["message"]["content"] == [{"text": "Hello world"}]
    assert response["usage"]["cacheWriteInputTokens"] == 400
    assert orjson.loads(bedrock.app[SENT][-1])["usage"] == response["usage"]
    sent = assert_signed_by_operator(bedrock, customer.api_key)
    assert sent.path == f"/model/{SONNET_US}/converse"
    assert sent.json()["inferenceConfig"] == {"maxTokens": 500}
    # us.* Sonnet 4.6: 1000 × 3.3 + 2000 × 0.33 + 300 × 4.125 (5m writes) + 100 × 6.6 (1h writes) + 300 × 16.5
    #  = 3300 + 660 + 1237.5 + 660 + 4950 = 10807.5 → 10808
    assert response["ResponseMetadata"]["HTTPHeaders"]["x-credits-charged"] == "1.0808"
    acct = await account(ledger, customer.user_id)
    assert acct.balance == ENTERPRISE - 10_808 and acct.held == 0 and acct.tokens == 3700


async def test_converse_stream_relays_the_event_stream_unchanged(make_customer, bedrock, ledger):
    customer = await make_customer("enterprise")
    client = runtime(bedrock, customer.api_key, x_mock_chunks="5", x_mock_usage="prompt=4000,completion=800,cached=0")
    response = await call(client.converse_stream, modelId=HAIKU, messages=MESSAGES)
    deltas = [e["contentBlockDelta"]["delta"]["text"] for e in response["stream"] if "contentBlockDelta" in e]
    assert "".join(deltas) == "Hello world! How"
    assert response["stream"][-1]["metadata"]["usage"]["outputTokens"] == 800
    sent = assert_signed_by_operator(bedrock, customer.api_key)
    assert sent.path == "/model/global.anthropic.claude-haiku-4-5-20251001-v1:0/converse-stream"
    # Haiku 4.5: 4000 × 1 + 800 × 5 = 8000
    assert (await account(ledger, customer.user_id)).balance == ENTERPRISE - 8000

    # the same stream read raw, with a Bedrock API key (bearer) instead of SigV4
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{bedrock.url}/bedrock/model/{HAIKU}/converse-stream",
            json={"messages": MESSAGES},
            headers={"Authorization": f"Bearer {customer.api_key}"},
        ) as resp,
    ):
        assert resp.headers["Content-Type"] == "application/vnd.amazon.eventstream"
        raw = await resp.read()
    assert raw == bedrock.app[SENT][-1]
    # default usage: 1200 × 1 + 200 cached × 0.1 + 300 × 5 = 1200 + 20 + 1500 = 2720
    assert (await account(ledger, customer.user_id)).balance == ENTERPRISE - 8000 - 2720


async def test_converse_stream_without_usage_is_charged_an_estimate(make_customer, bedrock, ledger):
    customer = await make_customer("enterprise")
    client = runtime(bedrock, customer.api_key, x_mock_scenario="no-usage")
    response = await call(client.converse_stream, modelId=HAIKU, messages=MESSAGES)
    assert not any("metadata" in e for e in response["stream"])
    body = bedrock.app[RECEIVED][-1].body
    input_tokens = math.ceil((len(body) + 64) / 4)  # the prompt's upper bound, 4 bytes a token
    output_tokens = math.ceil(len("Hello world") / 4)
    assert (await account(ledger, customer.user_id)).balance == ENTERPRISE - math.ceil(input_tokens * 1 + output_tokens * 5)


async def test_invoke_model_claude_body(make_customer, bedrock, ledger):
    customer = await make_customer("enterprise")
    client = runtime(bedrock, customer.api_key, x_mock_usage="prompt=3000,completion=1000,cached=5000,write=2000,write1h=2000")
    native = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 1024, "messages": [{"role": "user", "content": "hi"}]}
    response = await call(client.invoke_model, modelId=HAIKU, body=orjson.dumps(native), contentType="application/json")
    assert response["body"] == bedrock.app[SENT][-1]
    sent = assert_signed_by_operator(bedrock, customer.api_key)
    assert sent.json() == native
    # Haiku 4.5: 3000 × 1 + 5000 × 0.1 + 2000 × 2 (1h writes) + 1000 × 5 = 3000 + 500 + 4000 + 5000
    assert (await account(ledger, customer.user_id)).balance == ENTERPRISE - 12_500


async def test_invoke_model_llama_counts_and_arn_model_id(make_customer, bedrock, ledger):
    customer = await make_customer("enterprise")
    client = runtime(bedrock, customer.api_key, x_mock_usage="prompt=1234,completion=567")
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.meta.llama3-3-70b-instruct-v1:0"
    response = await call(client.invoke_model, modelId=arn, body=orjson.dumps({"prompt": "hi", "max_gen_len": 600}))
    assert orjson.loads(response["body"])["generation_token_count"] == 567
    sent = assert_signed_by_operator(bedrock, customer.api_key)
    profile = "arn:aws:bedrock:us-east-1:123456789012:inference-profile%2Fus.meta.llama3-3-70b-instruct-v1:0"
    assert sent.path == f"/model/{profile}/invoke"
    # priced as us.meta.llama3-3-70b-instruct-v1:0: (1234 + 567) × 0.72 = 1296.72 → 1297
    assert (await account(ledger, customer.user_id)).balance == ENTERPRISE - 1297


async def test_invoke_model_with_response_stream(make_customer, bedrock, ledger):
    customer = await make_customer("enterprise")
    client = runtime(bedrock, customer.api_key, x_mock_usage="prompt=700,completion=90,cached=100,write=50")
    native = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    response = await call(client.invoke_model_with_response_stream, modelId=HAIKU, body=orjson.dumps(native))
    chunks = [orjson.loads(e["chunk"]["bytes"]) for e in response["body"]]
    assert next(c["type"] for c in chunks) == "message_start" and chunks[-1]["type"] == "message_stop"
    sent_chunks = [base64.b64decode(m) for m in _chunk_payloads(bedrock.app[SENT][-1])]
    assert [orjson.dumps(c) for c in chunks] == sent_chunks
    assert_signed_by_operator(bedrock, customer.api_key)
    # Haiku 4.5: 700 × 1 + 100 × 0.1 + 50 × 1.25 + 90 × 5 = 700 + 10 + 62.5 + 450 = 1222.5 → 1223
    assert (await account(ledger, customer.user_id)).balance == ENTERPRISE - 1223


async def test_invoke_stream_of_other_models_uses_invocation_metrics(make_customer, bedrock, ledger):
    customer = await make_customer("enterprise")
    client = runtime(bedrock, customer.api_key, x_mock_usage="prompt=5000,completion=2000,cached=0")
    response = await call(
        client.invoke_model_with_response_stream,
        modelId="us.meta.llama4-maverick-17b-instruct-v1:0",
        body=orjson.dumps({"prompt": "hi", "max_gen_len": 2048}),
    )
    assert "".join(orjson.loads(e["chunk"]["bytes"])["generation"] for e in response["body"]) == "Hello world"
    # Llama 4 Maverick: 5000 × 0.24 + 2000 × 0.97 = 1200 + 1940
    assert (await account(ledger, customer.user_id)).balance == ENTERPRISE - 3140


async def test_claude_stream_cut_short_keeps_the_exact_input_side(make_customer, bedrock, ledger):
    customer = await make_customer("enterprise")
    client = runtime(
        bedrock, customer.api_key, x_mock_scenario="cut", x_mock_usage="prompt=700,completion=90,cached=100,write=50"
    )
    response = await call(
        client.invoke_model_with_response_stream, modelId=HAIKU, body=orjson.dumps({"max_tokens": 100, "messages": []})
    )
    assert orjson.loads(response["body"][-1]["chunk"]["bytes"])["type"] == "content_block_delta"
    # input side as reported in message_start: 700 × 1 + 100 × 0.1 + 50 × 1.25 = 772.5; output
    # estimated from "Hello world" (11 characters, 4 a token): 3 × 5 = 15 → 787.5 → 788
    assert (await account(ledger, customer.user_id)).balance == ENTERPRISE - 788


def _chunk_payloads(stream: bytes) -> list[str]:
    buffer = EventStreamBuffer()
    buffer.add_data(stream)
    return [orjson.loads(m.payload)["bytes"] for m in buffer]


async def test_converse_flex_service_tier_uses_flex_prices(make_customer, bedrock, ledger):
    customer = await make_customer("enterprise")
    client = runtime(bedrock, customer.api_key, x_mock_usage="prompt=10000,completion=1000,cached=0")
    await call(client.converse, modelId="amazon.nova-pro-v1:0", messages=MESSAGES, serviceTier={"type": "flex"})
    # Nova Pro flex: 10000 × 0.4 + 1000 × 1.6 = 5600 (standard would be 11,200)
    assert (await account(ledger, customer.user_id)).balance == ENTERPRISE - 5600


async def test_count_tokens_is_free_and_signed(make_customer, bedrock, ledger):
    customer = await make_customer("enterprise")
    response = await call(
        runtime(bedrock, customer.api_key).count_tokens, modelId=HAIKU, input={"converse": {"messages": MESSAGES}}
    )
    assert response["inputTokens"] == 1200
    assert_signed_by_operator(bedrock, customer.api_key)
    assert (await account(ledger, customer.user_id)).balance == ENTERPRISE


async def test_tier_without_bedrock_gets_access_denied_and_nothing_is_forwarded(make_customer, bedrock, ledger):
    customer = await make_customer("starter")
    with pytest.raises(ClientError) as err:
        await call(runtime(bedrock, customer.api_key).converse, modelId=HAIKU, messages=MESSAGES)
    assert err.value.response["Error"]["Code"] == "AccessDeniedException"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "does not include bedrock" in err.value.response["Error"]["Message"]
    assert bedrock.app[RECEIVED] == []
    assert (await account(ledger, customer.user_id)).held == 0


@pytest.mark.parametrize(("scenario", "code"), [("error-400", "ValidationException"), ("error-429", "ThrottlingException")])
async def test_upstream_errors_reach_boto3_typed_and_cost_nothing(make_customer, bedrock, ledger, scenario, code):
    customer = await make_customer("enterprise")
    client = runtime(bedrock, customer.api_key, x_mock_scenario=scenario)
    with pytest.raises(ClientError) as err:
        await call(client.converse, modelId=HAIKU, messages=MESSAGES)
    assert err.value.response["Error"]["Code"] == code
    assert err.value.response["Error"]["Message"] == f"mock upstream error {scenario[6:]}"
    acct = await account(ledger, customer.user_id)
    assert acct.balance == ENTERPRISE and acct.held == 0 and acct.requests == 0


async def test_proxy_refusals_in_bedrock_shape(make_customer, bedrock, ledger):
    with pytest.raises(ClientError) as err:
        await call(runtime(bedrock, "cpk-unknown").converse, modelId=HAIKU, messages=MESSAGES)
    assert err.value.response["Error"]["Code"] == "UnrecognizedClientException"

    customer = await make_customer("enterprise")
    with pytest.raises(ClientError) as err:
        await call(runtime(bedrock, customer.api_key).converse, modelId="anthropic.claude-imaginary", messages=MESSAGES)
    assert err.value.response["Error"]["Code"] == "ResourceNotFoundException"

    await ledger.redis.hset(ledger.keys.account(customer.user_id), "requests", 100_000)  # the enterprise limit
    client = runtime(bedrock, customer.api_key, attempts=3)
    attempts = []
    client.meta.events.register("before-send.bedrock-runtime.*", lambda **kw: attempts.append(1))
    with pytest.raises(ClientError) as err:
        await call(client.converse, modelId=HAIKU, messages=MESSAGES)
    assert err.value.response["Error"]["Code"] == "ServiceQuotaExceededException"
    assert err.value.response["ResponseMetadata"]["HTTPHeaders"]["x-should-retry"] == "false"
    assert len(attempts) == 1  # not retried by boto3
    assert bedrock.app[RECEIVED] == []


# provider internals --------------------------------------------------------------------------
def provider(config_files, monkeypatch, **env: str) -> BedrockProvider:
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    built = build_providers(Settings(), load_config(*config_files).prices)
    return built["bedrock"]  # type: ignore[return-value]


def test_upstream_bearer_key_without_a_secret(config_files, monkeypatch):
    bedrock = provider(config_files, monkeypatch, AWS_ACCESS_KEY_ID="ABSKbedrock-api-key")
    assert bedrock.region == "us-east-1"  # from base_url's host
    incoming = CIMultiDictProxy(
        CIMultiDict(
            {
                "Authorization": "AWS4-HMAC-SHA256 Credential=cpk-x/...",
                "X-Amz-Date": "20260101T000000Z",
                "X-Amz-Security-Token": "caller",
                "X-Amzn-Bedrock-Service-Tier": "priority",
                "Content-Type": "application/json",
            }
        )
    )
    url, headers = bedrock.prepare("POST", f"model/{HAIKU}/invoke", "", incoming, b"{}")
    assert str(url) == f"https://bedrock-runtime.us-east-1.amazonaws.com/model/{HAIKU}/invoke"
    # the caller's signature is gone, and so is the service tier the price could not follow
    assert dict(headers) == {"Content-Type": "application/json", "Authorization": "Bearer ABSKbedrock-api-key"}


def test_session_token_is_signed_along(config_files, monkeypatch):
    bedrock = provider(config_files, monkeypatch, AWS_ACCESS_KEY_ID="AKIA1", AWS_SECRET_ACCESS_KEY="s", AWS_SESSION_TOKEN="tok")
    _, headers = bedrock.prepare("POST", f"model/{HAIKU}/converse", "", CIMultiDictProxy(CIMultiDict()), b"{}")
    assert headers["X-Amz-Security-Token"] == "tok"
    assert "x-amz-security-token" in headers["Authorization"].split("SignedHeaders=")[1]


def test_usage_from_invoke_model_headers(config_files, monkeypatch):
    bedrock = provider(config_files, monkeypatch)
    call = bedrock.inspect("POST", "model/mistral.mistral-large-2407-v1:0/invoke", b"{}", {"max_tokens": 7})
    assert call.max_output_tokens == 7 and not call.stream
    body = orjson.dumps({"outputs": [{"text": "hi", "stop_reason": "stop"}]})
    headers = {
        "x-amzn-bedrock-input-token-count": "31",
        "x-amzn-bedrock-output-token-count": "9",
        "x-amzn-bedrock-cache-read-input-token-count": "4",
    }
    usage = bedrock.usage_from_response(call, body, CIMultiDictProxy(CIMultiDict(headers)))
    assert (usage.input_tokens, usage.output_tokens, usage.cached_input_tokens) == (31, 9, 4)
    assert bedrock.usage_from_response(call, body, CIMultiDictProxy(CIMultiDict())) is None


def test_inspect_limits_and_refusals(config_files, monkeypatch):
    bedrock = provider(config_files, monkeypatch)
    nova = {"inferenceConfig": {"max_new_tokens": 321}}
    assert bedrock.inspect("POST", "model/amazon.nova-pro-v1:0/invoke-with-response-stream", b"{}", nova).max_output_tokens == 321
    assert (
        bedrock.inspect("POST", "model/m/converse-stream", b"{}", {"inferenceConfig": {"maxTokens": 55}}).max_output_tokens == 55
    )
    for method, tail, payload, status in [
        ("POST", "model/m/converse", {"performanceConfig": {"latency": "optimized"}}, 400),
        ("POST", "model/m/converse", [], 400),
        ("GET", "model/m/converse", {}, 404),
        ("POST", "model/m/count-tokens", {}, 404),
        ("POST", "async-invoke", {}, 404),
    ]:
        with pytest.raises(ProxyError) as err:
            bedrock.inspect(method, tail, b"", payload)
        assert err.value.status == status
