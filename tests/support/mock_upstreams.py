"""A local server that speaks OpenAI's API, for tests and the benchmark, and the steering and
recording every mock upstream here shares.

Behaviour is steered per request by headers the official SDKs pass through untouched
(``extra_headers``):

``x-mock-usage``     ``prompt=1200,completion=300,cached=200,reasoning=50`` (the defaults)
``x-mock-scenario``  ``error-400`` | ``error-429`` | ``error-500`` | ``no-usage`` | ``slow`` | ``hang`` |
                     ``late`` (a stream's headers come after 0.3 s)
``x-mock-chunks``    number of text chunks in a stream (default 3)
``x-mock-served-tier`` the ``service_tier`` chat answers and chunks say they were served at

Every request is recorded in ``app[RECEIVED]`` (method, path, query, headers, raw body).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

RECEIVED = web.AppKey("received", list)
#: the paths of the event streams the OpenAI mock wrote to the end (``write_eof`` returned:
#: every byte is with the kernel, whether or not the proxy has read it)
FINISHED = web.AppKey("finished", list)
DEFAULT_USAGE = {"prompt": 1200, "completion": 300, "cached": 200, "reasoning": 50}
CHUNK_TEXTS = ("Hel", "lo", " world", "!", " How", " are", " you", "?")


@dataclass
class Received:
    """One request as a mock upstream received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    #: the path as it came on the wire, still percent-encoded, without the query ("" when the
    #: mock did not record it); ``path`` is aiohttp's decoded one
    raw_path: str = ""

    def json(self) -> Any:
        return orjson.loads(self.body)


def mock_usage(request: web.Request) -> dict[str, int]:
    """The usage a request asks the mock to report: :data:`DEFAULT_USAGE` overridden by ``x-mock-usage``."""
    usage = dict(DEFAULT_USAGE)
    for part in filter(None, request.headers.get("x-mock-usage", "").split(",")):
        name, _, value = part.partition("=")
        usage[name.strip()] = int(value)
    return usage


def scenario_of(request: web.Request) -> str:
    """The ``x-mock-scenario`` a request asks for (empty: a normal answer)."""
    return request.headers.get("x-mock-scenario", "")


def texts_of(request: web.Request) -> list[str]:
    """The text pieces of an answer, ``x-mock-chunks`` of them (default 3)."""
    n = int(request.headers.get("x-mock-chunks", "3"))
    return [CHUNK_TEXTS[i % len(CHUNK_TEXTS)] for i in range(n)]


async def record(request: web.Request) -> bytes:
    """Append the request to ``app[RECEIVED]`` (its decoded path, and its raw one in
    ``raw_path``); its raw body."""
    body = await request.read()
    headers = {str(k): v for k, v in request.headers.items()}
    raw_path = request.raw_path.partition("?")[0]
    request.app[RECEIVED].append(Received(request.method, request.path, request.query_string, headers, body, raw_path))
    return body


def _openai_error(status: int) -> web.Response:
    kinds = {400: "invalid_request_error", 429: "rate_limit_error", 500: "server_error"}
    error = {"message": f"mock upstream error {status}", "type": kinds.get(status, "api_error"), "param": None, "code": None}
    body = {"error": error}
    return web.json_response(body, status=status)


def _openai_usage(u: dict[str, int], responses_api: bool = False) -> dict[str, Any]:
    if responses_api:
        return {
            "input_tokens": u["prompt"],
            "input_tokens_details": {"cached_tokens": u["cached"]},
            "output_tokens": u["completion"],
            "output_tokens_details": {"reasoning_tokens": u["reasoning"]},
            "total_tokens": u["prompt"] + u["completion"],
        }
    return {
        "prompt_tokens": u["prompt"],
        "completion_tokens": u["completion"],
        "total_tokens": u["prompt"] + u["completion"],
        "prompt_tokens_details": {"cached_tokens": u["cached"], "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": u["reasoning"],
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def sse(payload: Any, event: str | None = None) -> bytes:
    """One server-sent event: JSON (or raw bytes) as ``data``, with an ``event`` name if given."""
    head = f"event: {event}\n".encode() if event else b""
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return head + b"data: " + data + b"\n\n"


async def stream_events(request: web.Request, events: list[bytes]) -> web.StreamResponse:
    """Answer with ``events`` as an event stream, paced by the ``slow``, ``hang`` and ``late`` scenarios."""
    scenario = scenario_of(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    if scenario == "late":
        await asyncio.sleep(0.3)
    await response.prepare(request)
    for i, event in enumerate(events):
        if scenario == "slow" and i:
            await asyncio.sleep(0.05)
        if scenario == "hang" and i == 2:
            await asyncio.sleep(3600)
        await response.write(event)
    await response.write_eof()
    if (finished := request.app.get(FINISHED)) is not None:
        finished.append(request.path)
    return response


async def openai_chat(request: web.Request) -> web.StreamResponse:
    raw = await record(request)
    scenario = scenario_of(request)
    if scenario.startswith("error-"):
        return _openai_error(int(scenario[6:]))
    body = orjson.loads(raw)
    u = mock_usage(request)
    base = {"id": "chatcmpl-mock", "created": int(time.time()), "model": body["model"], "system_fingerprint": "fp_mock"}
    if "x-mock-served-tier" in request.headers:
        base["service_tier"] = request.headers["x-mock-served-tier"]
    completions = request.path.endswith("/v1/completions")
    texts = texts_of(request)
    if not body.get("stream"):
        if completions:
            choice = {"index": 0, "text": "".join(texts), "finish_reason": "stop", "logprobs": None}
            out = {**base, "object": "text_completion", "choices": [choice]}
        else:
            message = {"role": "assistant", "content": "".join(texts), "refusal": None}
            choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
            out = {**base, "object": "chat.completion", "choices": [choice]}
        if scenario != "no-usage":
            out["usage"] = _openai_usage(u)
        return web.json_response(out)

    include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and scenario != "no-usage"
    obj = "text_completion" if completions else "chat.completion.chunk"

    def chunk(choices: list[dict[str, Any]], usage: Any = None, with_usage_field: bool = include_usage) -> bytes:
        c = {**base, "object": obj, "choices": choices}
        if with_usage_field:
            c["usage"] = usage
        return sse(c)

    if completions:
        events = [chunk([{"index": 0, "text": t, "finish_reason": None, "logprobs": None}]) for t in texts]
        events.append(chunk([{"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}]))
    else:
        events = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}])]
        events += [chunk([{"index": 0, "delta": {"content": t}, "finish_reason": None, "logprobs": None}]) for t in texts]
        events.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}]))
    if include_usage:
        events.append(chunk([], _openai_usage(u)))
    events.append(b"data: [DONE]\n\n")
    return await stream_events(request, events)


async def openai_embeddings(request: web.Request) -> web.Response:
    raw = await record(request)
    scenario = scenario_of(request)
    if scenario.startswith("error-"):
        return _openai_error(int(scenario[6:]))
    body = orjson.loads(raw)
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    u = mock_usage(request)
    return web.json_response(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": [0.1, -0.2, 0.3]} for i in range(len(inputs))],
            "model": body["model"],
            "usage": {"prompt_tokens": u["prompt"], "total_tokens": u["prompt"]},
        }
    )


async def openai_responses(request: web.Request) -> web.StreamResponse:
    raw = await record(request)
    scenario = scenario_of(request)
    if scenario.startswith("error-"):
        return _openai_error(int(scenario[6:]))
    body = orjson.loads(raw)
    u = mock_usage(request)
    text = "".join(texts_of(request))
    message = {
        "id": "msg_mock",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    response = {
        "id": "resp_mock",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": body["model"],
        "output": [message],
        "usage": _openai_usage(u, responses_api=True),
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }
    if not body.get("stream"):
        return web.json_response(response)
    started = {**response, "status": "in_progress", "output": [], "usage": None}
    events = [sse({"type": "response.created", "sequence_number": 0, "response": started}, "response.created")]
    for i, t in enumerate(texts_of(request)):
        events.append(
            sse(
                {
                    "type": "response.output_text.delta",
                    "sequence_number": i + 1,
                    "item_id": "msg_mock",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": t,
                    "logprobs": [],
                },
                "response.output_text.delta",
            )
        )
    if scenario != "no-usage":
        events.append(sse({"type": "response.completed", "sequence_number": 99, "response": response}, "response.completed"))
    return await stream_events(request, events)


async def openai_models(request: web.Request) -> web.Response:
    await record(request)
    model = {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "system"}
    return web.json_response({"object": "list", "data": [model]})


async def openai_model(request: web.Request) -> web.Response:
    await record(request)
    model = request.match_info["model"]
    return web.json_response({"id": model, "object": "model", "created": 0, "owned_by": "system"})


def openai_app() -> web.Application:
    """An upstream that speaks OpenAI's API."""
    app = web.Application()
    app[RECEIVED] = []
    app[FINISHED] = []
    app.router.add_post("/v1/chat/completions", openai_chat)
    app.router.add_post("/v1/completions", openai_chat)
    app.router.add_post("/v1/embeddings", openai_embeddings)
    app.router.add_post("/v1/responses", openai_responses)
    app.router.add_get("/v1/models", openai_models)
    app.router.add_get("/v1/models/{model}", openai_model)
    return app
