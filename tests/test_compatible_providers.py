"""OpenAI-compatible providers by configuration alone: the ``openai`` SDK → proxy → mock
upstreams for Groq (API under a path prefix), Mistral (rejects ``stream_options``, reports
usage by itself) and the Hugging Face router; and Azure OpenAI through ``AsyncAzureOpenAI``.

Prices are µ$ per token (= $ per 1M tokens) from pricing.yaml; enterprise accounts start
at their allowance.
"""

from __future__ import annotations

from types import SimpleNamespace

import aiohttp
import openai
import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import load_config
from proxy.errors import ProxyError
from proxy.providers.azure import AzureOpenAIProvider
from proxy.providers.registry import build_providers
from proxy.settings import Settings

from .support.accounts import account
from .support.mock_compatible import SENT, azure_app, mistral_app, prefixed_openai_app
from .support.mock_upstreams import RECEIVED, openai_app
from .support.money import ALLOWANCE

ENTERPRISE = ALLOWANCE["enterprise"]
KEYS = {"groq": "gsk-operator", "mistral": "mistral-operator", "huggingface": "hf_operator", "azure": "azure-operator"}
AZURE_VERSION = "2024-10-21"


@pytest.fixture
async def compat(start_proxy):
    proxy = await start_proxy(
        {"groq": prefixed_openai_app("/openai"), "mistral": mistral_app(), "huggingface": openai_app(), "azure": azure_app()},
        env={
            "GROQ_API_KEY": KEYS["groq"],
            "MISTRAL_API_KEY": KEYS["mistral"],
            "HF_TOKEN": KEYS["huggingface"],
            "AZURE_OPENAI_API_KEY": KEYS["azure"],
        },
        base_paths={"groq": "/openai"},  # as base_url https://api.groq.com/openai
        database=False,
    )
    received = {name: server.app[RECEIVED] for name, server in proxy.upstreams.items()}
    return SimpleNamespace(url=proxy.url, received=received, mistral=proxy.upstreams["mistral"].app)


def client(compat, provider: str, api_key: str) -> openai.AsyncOpenAI:
    if provider == "azure":
        return openai.AsyncAzureOpenAI(
            azure_endpoint=f"{compat.url}/azure", api_key=api_key, api_version=AZURE_VERSION, max_retries=0
        )
    return openai.AsyncOpenAI(base_url=f"{compat.url}/{provider}/v1", api_key=api_key, max_retries=0)


def assert_swapped(sent, provider: str, proxy_key: str) -> None:
    """The upstream saw the operator's key where the provider expects it, never the proxy key."""
    if provider == "azure":
        assert sent.headers["api-key"] == KEYS["azure"] and "Authorization" not in sent.headers
    else:
        assert sent.headers["Authorization"] == f"Bearer {KEYS[provider]}"
    assert proxy_key not in orjson.dumps(sent.headers).decode()


def say_hi(**extra):
    return {"messages": [{"role": "user", "content": "hi"}], **extra}


async def test_groq_api_under_a_path_prefix(make_customer, compat, ledger):
    customer = await make_customer("enterprise")
    groq = client(compat, "groq", customer.api_key)
    raw = await groq.chat.completions.with_raw_response.create(
        model="openai/gpt-oss-120b", **say_hi(), extra_headers={"x-mock-usage": "prompt=10000,completion=2000,cached=4000"}
    )
    assert raw.parse().choices[0].message.content == "Hello world"
    sent = compat.received["groq"][-1]
    assert sent.path == "/openai/v1/chat/completions"
    assert_swapped(sent, "groq", customer.api_key)
    # 6000 uncached × 0.15 + 4000 cached × 0.075 + 2000 out × 0.6 = 900 + 300 + 1200
    assert raw.headers["x-credits-charged"] == "0.2400"
    assert (await account(ledger, customer.user_id)).balance == ENTERPRISE - 2400

    text = ""
    async for chunk in await groq.chat.completions.create(model="openai/gpt-oss-20b", **say_hi(), stream=True):
        text += "".join(choice.delta.content or "" for choice in chunk.choices)
    assert text == "Hello world"
    assert compat.received["groq"][-1].json()["stream_options"] == {"include_usage": True}
    # default usage on gpt-oss-20b: 1000 × 0.075 + 200 × 0.0375 + 300 × 0.3 = 75 + 7.5 + 90 = 172.5 → 173
    assert (await account(ledger, customer.user_id)).balance == ENTERPRISE - 2400 - 173


async def test_mistral_stream_is_forwarded_unchanged_and_metered_from_its_own_usage(make_customer, compat, ledger):
    customer = await make_customer("enterprise")
    body = {"model": "mistral-small-latest", **say_hi(), "stream": True}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{compat.url}/mistral/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {customer.api_key}", "x-mock-usage": "prompt=3001,completion=777"},
        ) as resp,
    ):
        assert resp.status == 200
        streamed = await resp.read()
    sent = compat.received["mistral"][-1]
    assert sent.json() == body  # no stream_options: Mistral would answer 422
    assert_swapped(sent, "mistral", customer.api_key)
    assert streamed == compat.mistral[SENT][-1]
    # 3001 × 0.15 + 777 × 0.6 = 450.15 + 466.2 = 916.35 → 917
    assert (await account(ledger, customer.user_id)).balance == ENTERPRISE - 917

    mistral = client(compat, "mistral", customer.api_key)
    stream = await mistral.chat.completions.create(model="mistral-small-latest", **say_hi(), stream=True)
    usage = [chunk.usage async for chunk in stream if chunk.usage]
    assert usage[0].completion_tokens == 300
    # default usage, no cache on Mistral: 1200 × 0.15 + 300 × 0.6 = 360
    assert (await account(ledger, customer.user_id)).balance == ENTERPRISE - 917 - 360


async def test_mistral_whole_answer_reaches_the_client_byte_for_byte(make_customer, compat, ledger):
    customer = await make_customer("enterprise")
    mistral = client(compat, "mistral", customer.api_key)
    raw = await mistral.chat.completions.with_raw_response.create(model="codestral-latest", **say_hi())
    assert raw.content == compat.mistral[SENT][-1]
    # 1200 × 0.3 + 300 × 0.9 = 630
    assert (await account(ledger, customer.user_id)).balance == ENTERPRISE - 630


@pytest.mark.parametrize("stream", [False, True])
async def test_huggingface_router_with_a_pinned_provider(make_customer, compat, ledger, stream):
    customer = await make_customer("enterprise")
    hf = client(compat, "huggingface", customer.api_key)
    usage = {"x-mock-usage": "prompt=2000,completion=500,cached=1000"}
    if stream:
        chunks = [
            c
            async for c in await hf.chat.completions.create(
                model="moonshotai/Kimi-K3:together", **say_hi(), stream=True, extra_headers=usage
            )
        ]
        assert all(c.usage is None for c in chunks)  # the usage chunk the proxy asked for is not passed on
    else:
        completion = await hf.chat.completions.create(model="moonshotai/Kimi-K3:together", **say_hi(), extra_headers=usage)
        assert completion.usage.prompt_tokens == 2000
    sent = compat.received["huggingface"][-1]
    assert sent.path == "/v1/chat/completions" and sent.json()["model"] == "moonshotai/Kimi-K3:together"
    assert_swapped(sent, "huggingface", customer.api_key)
    # 1000 × 3 + 1000 cached × 0.3 + 500 × 15 = 3000 + 300 + 7500
    assert (await account(ledger, customer.user_id)).balance == ENTERPRISE - 10_800


async def test_azure_deployment_chat_and_embeddings(make_customer, compat, ledger):
    customer = await make_customer("enterprise")
    azure = client(compat, "azure", customer.api_key)
    raw = await azure.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", **say_hi(), extra_headers={"x-mock-usage": "prompt=5000,completion=700,cached=1000"}
    )
    assert raw.parse().choices[0].message.content == "Hello world"
    sent = compat.received["azure"][-1]
    assert sent.path == "/openai/deployments/gpt-4o-mini/chat/completions" and sent.query == f"api-version={AZURE_VERSION}"
    assert_swapped(sent, "azure", customer.api_key)
    # 4000 × 0.15 + 1000 × 0.075 + 700 × 0.6 = 600 + 75 + 420
    assert raw.headers["x-credits-charged"] == "0.1095"

    emb = await azure.embeddings.create(model="text-embedding-3-small", input="a", extra_headers={"x-mock-usage": "prompt=12345"})
    assert len(emb.data) == 1
    assert compat.received["azure"][-1].path == "/openai/deployments/text-embedding-3-small/embeddings"
    # 12345 × 0.022 = 271.59 → 272
    assert (await account(ledger, customer.user_id)).balance == ENTERPRISE - 1095 - 272


async def test_azure_prices_the_deployment_not_the_body_model(make_customer, compat, ledger):
    customer = await make_customer("enterprise")
    azure = openai.AsyncAzureOpenAI(
        azure_endpoint=f"{compat.url}/azure",
        azure_deployment="gpt-4.1",
        api_key=customer.api_key,
        api_version=AZURE_VERSION,
        max_retries=0,
    )
    await azure.chat.completions.create(
        model="gpt-4o-mini", **say_hi(), extra_headers={"x-mock-usage": "prompt=1000,completion=100,cached=0"}
    )
    assert compat.received["azure"][-1].path == "/openai/deployments/gpt-4.1/chat/completions"
    # gpt-4.1, which the deployment runs: 1000 × 2 + 100 × 8 (gpt-4o-mini would be 210)
    assert (await account(ledger, customer.user_id)).balance == ENTERPRISE - 2800


async def test_azure_v1_api_with_the_plain_openai_sdk(make_customer, compat, ledger):
    customer = await make_customer("enterprise")
    v1 = openai.AsyncOpenAI(base_url=f"{compat.url}/azure/openai/v1", api_key=customer.api_key, max_retries=0)
    text = ""
    async for chunk in await v1.chat.completions.create(model="gpt-4.1", **say_hi(), stream=True):
        text += "".join(choice.delta.content or "" for choice in chunk.choices)
    assert text == "Hello world"
    sent = compat.received["azure"][-1]
    assert sent.path == "/openai/v1/chat/completions"
    assert_swapped(sent, "azure", customer.api_key)
    # 1000 × 2 + 200 × 0.5 + 300 × 8 = 4500
    assert (await account(ledger, customer.user_id)).balance == ENTERPRISE - 4500
    assert [m.id async for m in v1.models.list()] == ["gpt-4o-mini"]  # free, forwarded
    assert (await account(ledger, customer.user_id)).balance == ENTERPRISE - 4500


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("groq", "openai/gpt-oss-120b"),
        ("huggingface", "openai/gpt-oss-120b:groq"),
        ("mistral", "mistral-small-latest"),
        ("azure", "gpt-4o-mini"),
    ],
)
async def test_tier_without_the_provider_gets_403_and_nothing_is_forwarded(make_customer, compat, ledger, provider, model):
    customer = await make_customer("starter")
    with pytest.raises(openai.PermissionDeniedError) as err:
        await client(compat, provider, customer.api_key).chat.completions.create(model=model, **say_hi())
    assert err.value.code == "provider_not_in_tier"
    assert err.value.response.headers["x-should-retry"] == "false"
    assert compat.received[provider] == []
    assert (await account(ledger, customer.user_id)).held == 0


@pytest.mark.parametrize(
    ("provider", "model", "error"),
    [
        ("groq", "openai/gpt-oss-120b", openai.BadRequestError),
        ("mistral", "mistral-small-latest", openai.RateLimitError),
        ("azure", "gpt-4o-mini", openai.InternalServerError),
    ],
)
async def test_upstream_errors_cost_nothing(make_customer, compat, ledger, provider, model, error):
    customer = await make_customer("enterprise")
    scenario = {"groq": "error-400", "mistral": "error-429", "azure": "error-500"}[provider]
    with pytest.raises(error):
        await client(compat, provider, customer.api_key).chat.completions.create(
            model=model, **say_hi(), extra_headers={"x-mock-scenario": scenario}
        )
    assert len(compat.received[provider]) == 1
    acct = await account(ledger, customer.user_id)
    assert acct.balance == ENTERPRISE and acct.held == 0 and acct.requests == 0


def azure_provider(config_files, monkeypatch) -> AzureOpenAIProvider:
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", KEYS["azure"])
    prices = load_config(*config_files).prices
    return build_providers(Settings(upstream_urls={"azure": "https://res.openai.azure.com"}), prices)["azure"]  # type: ignore[return-value]


def test_azure_deployment_request_without_a_model_field(config_files, monkeypatch):
    provider = azure_provider(config_files, monkeypatch)
    body = orjson.dumps({"messages": [], "stream": True})
    call = provider.inspect("POST", "openai/deployments/prod-mini/chat/completions", body, orjson.loads(body))
    assert call.model == "prod-mini" and call.stream
    # include_usage added, the borrowed deployment name not sent upstream
    assert orjson.loads(call.body) == {"messages": [], "stream": True, "stream_options": {"include_usage": True}}
    plain = orjson.dumps({"input": "a"})
    assert provider.inspect("POST", "openai/deployments/emb/embeddings", plain, orjson.loads(plain)).body is plain


def test_azure_routes_and_credentials(config_files, monkeypatch):
    provider = azure_provider(config_files, monkeypatch)
    assert provider.route("GET", "openai/v1/models").free and provider.route("GET", "openai/deployments").free
    assert provider.route("GET", "openai/deployments/prod-mini").free
    assert not provider.route("POST", "openai/deployments/prod-mini/chat/completions").free
    for method, tail in [("POST", "openai/v1/models"), ("GET", "openai/deployments/a/b"), ("POST", "openai/v1/files")]:
        with pytest.raises(ProxyError) as err:
            provider.route(method, tail)
        assert (err.value.status, err.value.code) == (404, "unsupported_endpoint")
    for tail in ("openai/deployments/x/images/generations", "openai/v1/files", "v1/chat/completions"):
        with pytest.raises(ProxyError) as err:
            provider.inspect("POST", tail, b"{}", {})
        assert err.value.status == 404
    incoming = CIMultiDictProxy(CIMultiDict({"api-key": "cpk-x", "Authorization": "Bearer cpk-x", "x-trace": "1"}))
    url, headers = provider.prepare("POST", "openai/v1/responses", "api-version=preview", incoming, b"")
    assert str(url) == "https://res.openai.azure.com/openai/v1/responses?api-version=preview"
    assert dict(headers) == {"x-trace": "1", "api-key": KEYS["azure"]}
