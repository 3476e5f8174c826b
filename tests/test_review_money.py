"""Regressions from a review of the money path that landed with receipts, price versions,
the per-request cap, the out-of-quota typing and the cluster TRYAGAIN retry: each test
reproduces one finding and asserts the fixed behaviour."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import orjson
import pytest
import yaml
from redis.crc import key_slot

from proxy.forward import REQUEST_ID_HEADER
from proxy.ledger import now_ms
from proxy.ledger.pipeline import ClusterPipeline
from proxy.receipts import STREAM_SEARCH_LIMIT
from proxy.state import LEDGER

from .support.accounts import settled
from .support.cluster import Cluster
from .support.http import fetch
from .support.mock_upstreams import openai_app

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _fill_stream(ledger, user_id: str, entries: int) -> None:
    """``entries`` ledger entries of another account in ``user_id``'s shard stream (a usage log behind)."""
    stream = ledger.keys.stream(user_id)
    await ledger.redis.delete(stream)
    async with ledger.redis.pipeline(transaction=False) as pipe:
        for n in range(entries):
            pipe.xadd(stream, {"kind": "grant", "id": f"g{n}", "user": "usr_someone_else", "amount": "0"})
        await pipe.execute()


async def test_a_script_naming_a_missing_key_waits_out_a_slot_migration(cluster: Cluster):
    tag = f"{{review{time.time_ns()}}}"
    present, missing = f"{tag}:account", f"{tag}:marker"  # resolve.lua's lost-hold marker never exists, e.g.
    slot = key_slot(present.encode())
    source_port = cluster.owner(slot)
    target_port = next(port for port in cluster.ports if port != source_port)
    source, target = cluster.node(source_port), cluster.node(target_port)
    source.set(present, "1")
    target.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", cluster.node_id(source_port))
    source.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", cluster.node_id(target_port))
    # the account's key has moved; the slot's other keys (other accounts of the shard) are still moving
    source.execute_command("MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", present)
    pipeline = ClusterPipeline([("127.0.0.1", p) for p in cluster.ports], tls=False, username=None, password=None, timeout=5)
    await pipeline.refresh()

    async def finish_migration() -> None:
        await asyncio.sleep(0.5)  # well within the 3 s the retry promises to wait
        for port in cluster.ports:
            await asyncio.to_thread(
                cluster.node(port).execute_command, "CLUSTER SETSLOT", slot, "NODE", cluster.node_id(target_port)
            )

    finisher = asyncio.create_task(finish_migration())
    try:
        script = "return redis.call('GET', KEYS[1])"
        reply = await pipeline.execute("EVAL", script, 2, present, missing, key=present)
        assert reply == b"1"
    finally:
        await finisher
        cluster.node(target_port).delete(present)


# max_request_credits ------------------------------------------------------------------------
@pytest.fixture
async def capped_proxy(start_proxy, config_files):
    """A proxy whose starter tier allows 0.5 credits (5,000 µ$) per request."""
    tiers = yaml.safe_load(config_files[1].read_text())
    tiers["tiers"]["starter"]["max_request_credits"] = 0.5
    config_files[1].write_text(yaml.safe_dump(tiers))
    return await start_proxy({"openai": openai_app()}, database=False)


async def test_following_the_cap_advice_on_a_body_that_set_max_tokens_is_admitted(capped_proxy, make_customer):
    customer = await make_customer("starter")
    url = f"{capped_proxy.url}/openai/v1/chat/completions"
    body = {**CHAT, "max_tokens": 16_384}  # the model's cap: ~9,830 µ$, over the 5,000 µ$ cap
    raw = await fetch(url, _bearer(customer.api_key), body)
    assert (raw.status, raw.json()["error"]["code"]) == (403, "request_too_expensive"), raw.body
    found = re.search(r"Set (\S+) to ([\d,]+) or less", raw.json()["error"]["message"])
    assert found, raw.json()["error"]["message"]
    field, limit = found.group(1), int(found.group(2).replace(",", ""))
    advised = await fetch(url, _bearer(customer.api_key), {**body, field: limit})  # exactly what the message says
    assert advised.status == 200, advised.body


async def test_the_cap_advice_on_a_compatible_route_names_the_field_that_provider_takes(start_proxy, config_files, make_customer):
    tiers = yaml.safe_load(config_files[1].read_text())
    tiers["tiers"]["enterprise"]["max_request_credits"] = 0.5
    config_files[1].write_text(yaml.safe_dump(tiers))
    proxy = await start_proxy({"deepseek": openai_app()}, env={"DEEPSEEK_API_KEY": "sk-operator"}, database=False)
    customer = await make_customer("enterprise")
    body = {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "hi"}]}
    raw = await fetch(f"{proxy.url}/deepseek/v1/chat/completions", _bearer(customer.api_key), body)
    assert (raw.status, raw.json()["error"]["code"]) == (403, "request_too_expensive"), raw.body
    assert "Set max_tokens to" in raw.json()["error"]["message"], raw.json()["error"]["message"]


# out-of-quota typing and retry-after -----------------------------------------------------------
async def test_a_refusal_after_the_cycle_ended_does_not_ask_to_retry_in_a_second(start_proxy, make_customer, ledger):
    proxy = await start_proxy({"openai": openai_app()}, database=False)
    customer = await make_customer("starter", balance_micro=0)
    ended = now_ms() - 3_600_000  # the Stripe cycle ended an hour ago; invoice.paid has not arrived (past due)
    await ledger.redis.hset(ledger.keys.account(customer.user_id), mapping={"cycle_end": ended, "auto_renew": "0"})
    raw = await fetch(f"{proxy.url}/openai/v1/chat/completions", _bearer(customer.api_key), CHAT)
    assert (raw.status, raw.json()["error"]["code"]) == (403, "insufficient_credits"), raw.body
    assert "retry-after" not in raw.headers or int(raw.headers["retry-after"]) >= 60, raw.headers["retry-after"]


async def test_a_strict_request_that_does_not_fit_is_not_typed_as_spent_quota(start_proxy, make_customer):
    proxy = await start_proxy({"openai": openai_app()}, database=False)
    customer = await make_customer("free", balance_micro=5_000)  # 0.5 credit left; no max_tokens holds ~9,900 µ$
    url = f"{proxy.url}/openai/v1/chat/completions"
    raw = await fetch(url, _bearer(customer.api_key), CHAT)
    assert (raw.status, raw.json()["error"]["code"]) == (403, "insufficient_credits"), raw.body
    smaller = await fetch(url, _bearer(customer.api_key), {**CHAT, "max_tokens": 100})
    assert smaller.status == 200, smaller.body  # the credits are not spent: the request was too big
    assert raw.json()["error"]["type"] != "insufficient_quota" and "retry-after" not in raw.headers


# receipts -------------------------------------------------------------------------------------
async def test_request_ids_do_not_count_other_accounts_requests(start_proxy, make_customer):
    proxy = await start_proxy({"openai": openai_app()}, database=False)
    watcher, other = await make_customer("starter"), await make_customer("starter")
    url = f"{proxy.url}/openai/v1/chat/completions"
    before = now_ms()
    first = (await fetch(url, _bearer(watcher.api_key), CHAT)).headers[REQUEST_ID_HEADER]
    for _ in range(3):
        assert (await fetch(url, _bearer(other.api_key), CHAT)).status == 200
    second = (await fetch(url, _bearer(watcher.api_key), CHAT)).headers[REQUEST_ID_HEADER]
    after = now_ms()
    # "hold_<admission ms, 11 hex>_<96 random bits, 24 hex>": nothing of the process or of the ids before it
    shapes = [re.fullmatch(r"hold_([0-9a-f]{11})_([0-9a-f]{24})", request_id) for request_id in (first, second)]
    assert shapes[0] and shapes[1], (first, second)
    assert all(before - 1 <= int(shape[1], 16) <= after + 1 for shape in shapes), (before, first, second, after)
    bits = [int(shape[2], 16) for shape in shapes]
    assert bits[0] >> 64 != bits[1] >> 64, (first, second)  # no tag shared (a chance of 2^-32)
    assert bits[1] - bits[0] != 4, (first, second)  # nor a count


def _id_at(ms: int, n: int) -> str:
    """A well-formed request id admitted at ``ms`` that no request has."""
    return f"hold_{ms:011x}_{n:024x}"


async def test_an_unknown_id_is_not_found_when_the_stream_holds_exactly_the_search_limit(start_proxy, make_customer, ledger):
    proxy = await start_proxy({"openai": openai_app()})
    customer = await make_customer("starter")
    unknown = _id_at(now_ms(), 1)  # admitted before every entry below: each could be its settlement
    await _fill_stream(ledger, customer.user_id, STREAM_SEARCH_LIMIT)
    raw = await fetch(f"{proxy.url}/api/usage/{unknown}", _bearer(customer.api_key), method="GET")
    assert (raw.status, raw.json()["error"]["code"]) == (404, "not_found"), raw.body
    # one entry more than the search reads: the settlement could be the one not read (pending, as documented)
    await ledger.redis.xadd(ledger.keys.stream(customer.user_id), {"kind": "grant", "id": "g", "user": "usr_x", "amount": "0"})
    raw = await fetch(f"{proxy.url}/api/usage/{unknown}", _bearer(customer.api_key), method="GET")
    assert (raw.status, raw.json()["error"]["code"]) == (404, "receipt_pending"), raw.body


async def test_a_receipt_lookup_does_not_read_the_shard_stream_wholesale(start_proxy, make_customer, ledger, monkeypatch):
    proxy = await start_proxy({"openai": openai_app()})
    customer = await make_customer("free")
    admitted = now_ms()  # the ids below are of requests admitted before the 2,000 entries
    await _fill_stream(ledger, customer.user_id, 2000)
    client = proxy.app[LEDGER].redis
    shard = {ledger.keys.stream(customer.user_id), ledger.keys.holds(customer.user_id), ledger.keys.progress(customer.user_id)}
    read, commands = 0, []
    original = client.execute_command

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal read
        reply = await original(*args, **kwargs)
        if len(args) > 1 and str(args[1]) in shard:
            commands.append(str(args[0]).upper())
            read += len(reply or []) if commands[-1] in ("XRANGE", "XREVRANGE") else 0
        return reply

    monkeypatch.setattr(client, "execute_command", counting)
    for n in range(5):
        await fetch(f"{proxy.url}/api/usage/{_id_at(admitted, n)}", _bearer(customer.api_key), method="GET")
    assert read <= 5 * 100, read  # the admission time in the id: from there on, a bounded number of entries
    assert "ZSCAN" not in commands, commands  # the pending check reads the hold's own record
    commands.clear()
    malformed = [f"hold_{0:024x}", f"hold_{admitted:x}", f"hold_{admitted:011x}_{0:020x}", f"hold_{admitted:011x}_{'g' * 24}"]
    for request_id in [*malformed, _id_at(admitted + 3_600_000, 0)]:
        raw = await fetch(f"{proxy.url}/api/usage/{request_id}", _bearer(customer.api_key), method="GET")
        assert (raw.status, raw.json()["error"]["code"]) == (404, "not_found"), raw.body
    assert commands == []  # no time in the id (or one to come): unknown without a look at the ledger


# service tiers --------------------------------------------------------------------------------
async def test_the_recorded_service_tier_is_one_the_gateway_knows(start_proxy, make_customer, ledger):
    proxy = await start_proxy({"deepseek": openai_app()}, env={"DEEPSEEK_API_KEY": "sk-operator"}, database=False)
    customer = await make_customer("enterprise")
    body = {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "hi"}], "service_tier": "z" * 20_000}
    raw = await fetch(f"{proxy.url}/deepseek/v1/chat/completions", _bearer(customer.api_key), body)
    assert raw.status == 200, raw.body  # an upstream that ignores the field serves and bills it
    await settled(ledger, customer.user_id)
    entries = await ledger.redis.xrange(ledger.keys.stream(customer.user_id))
    events = [orjson.loads(fields[b"e"]) for _, fields in entries if fields.get(b"kind") == b"charge"]
    assert len(events) == 1
    assert "svc" not in events[0]  # an unknown tier is no tier: the standard prices, nothing recorded
