"""A local server that speaks Anthropic's Messages API, for tests and the benchmark.

Steered per request like :mod:`tests.support.mock_upstreams` (the same header names):

``x-mock-usage``     ``prompt`` = ``input_tokens`` (uncached, as Anthropic counts it), ``cached`` =
                     cache reads, ``write5m`` / ``write1h`` = cache writes by TTL, ``completion`` =
                     ``output_tokens``, ``reasoning`` = thinking tokens (``thinking`` scenario only)
``x-mock-scenario``  ``error-<status>`` | ``slow`` | ``hang`` | ``thinking`` (a thinking block first) |
                     ``cut`` (the stream ends before ``message_delta``)
``x-mock-chunks``    number of text deltas in a stream (default 3)

Responses are deterministic (fixed ids, no clock), so a direct request gives the very bytes
the proxy relays. Every request is recorded in ``app[RECEIVED]``.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from .mock_upstreams import RECEIVED, mock_usage, record, scenario_of, sse, stream_events, texts_of

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
THINKING_TEXT = "Let me think."


def anthropic_error(status: int) -> web.Response:
    """An error in Anthropic's shape."""
    body = {
        "type": "error",
        "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": f"mock upstream error {status}"},
        "request_id": "req_mock",
    }
    return web.json_response(body, status=status)


def _usage(u: dict[str, int], thinking: bool) -> dict[str, Any]:
    write5m, write1h = u.get("write5m", 0), u.get("write1h", 0)
    usage: dict[str, Any] = {
        "input_tokens": u["prompt"],
        "cache_creation_input_tokens": write5m + write1h,
        "cache_read_input_tokens": u["cached"],
        "cache_creation": {"ephemeral_5m_input_tokens": write5m, "ephemeral_1h_input_tokens": write1h},
        "output_tokens": u["completion"],
        "service_tier": "standard",
    }
    if thinking:
        usage["output_tokens_details"] = {"thinking_tokens": u["reasoning"]}
    return usage


def _message(model: str, content: list[dict[str, Any]], usage: dict[str, Any], stop_reason: str | None) -> dict[str, Any]:
    return {
        "id": "msg_mock",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }


def _block_events(index: int, start: dict[str, Any], deltas: list[dict[str, Any]]) -> list[bytes]:
    events = [sse({"type": "content_block_start", "index": index, "content_block": start}, "content_block_start")]
    events += [sse({"type": "content_block_delta", "index": index, "delta": d}, "content_block_delta") for d in deltas]
    events.append(sse({"type": "content_block_stop", "index": index}, "content_block_stop"))
    return events


async def messages(request: web.Request) -> web.StreamResponse:
    raw = await record(request)
    scenario = scenario_of(request)
    if scenario.startswith("error-"):
        return anthropic_error(int(scenario[6:]))
    body = orjson.loads(raw)
    u = mock_usage(request)
    thinking = scenario == "thinking"
    texts = texts_of(request)
    usage = _usage(u, thinking)
    if not body.get("stream"):
        content = [{"type": "thinking", "thinking": THINKING_TEXT, "signature": "sig"}] if thinking else []
        content.append({"type": "text", "text": "".join(texts)})
        return web.json_response(_message(body["model"], content, usage, "end_turn"))

    start_usage = {**usage, "output_tokens": 1}
    start_usage.pop("output_tokens_details", None)
    blocks = []
    if thinking:
        blocks += _block_events(
            0,
            {"type": "thinking", "thinking": "", "signature": ""},
            [{"type": "thinking_delta", "thinking": THINKING_TEXT}, {"type": "signature_delta", "signature": "sig"}],
        )
    blocks += _block_events(int(thinking), {"type": "text", "text": ""}, [{"type": "text_delta", "text": t} for t in texts])
    start = sse({"type": "message_start", "message": _message(body["model"], [], start_usage, None)}, "message_start")
    events = [start, blocks[0], sse({"type": "ping"}, "ping"), *blocks[1:]]
    if scenario != "cut":
        # message_delta counts are cumulative: the final output count replaces message_start's.
        final = {k: usage[k] for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")}
        if thinking:
            final["output_tokens_details"] = usage["output_tokens_details"]
        delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": final}
        events.append(sse(delta, "message_delta"))
        events.append(sse({"type": "message_stop"}, "message_stop"))
    return await stream_events(request, events)


async def count_tokens(request: web.Request) -> web.Response:
    await record(request)
    return web.json_response({"input_tokens": mock_usage(request)["prompt"]})


async def models(request: web.Request) -> web.Response:
    await record(request)
    model = {
        "type": "model",
        "id": "claude-sonnet-4-6",
        "display_name": "Claude Sonnet 4.6",
        "created_at": "2026-02-17T00:00:00Z",
    }
    return web.json_response({"data": [model], "has_more": False, "first_id": model["id"], "last_id": model["id"]})


def anthropic_app() -> web.Application:
    """An upstream that speaks Anthropic's Messages API."""
    app = web.Application()
    app[RECEIVED] = []
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_get("/v1/models", models)
    return app
