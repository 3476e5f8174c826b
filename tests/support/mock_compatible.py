"""Local upstreams for OpenAI-compatible providers: one under a path prefix (Groq), a strict
one that reports usage by itself (Mistral), and Azure OpenAI's deployment paths.

They reuse ``mock_upstreams``' OpenAI handlers and its steering headers; ``app[RECEIVED]``
records requests as there, and the Mistral mock keeps the exact bytes it answered in
``app[SENT]``.
"""

from __future__ import annotations

import time

import orjson
from aiohttp import web

from .mock_upstreams import (
    RECEIVED,
    mock_usage,
    openai_app,
    openai_chat,
    openai_embeddings,
    openai_models,
    record,
    sse,
    stream_events,
    texts_of,
)

SENT = web.AppKey("sent", list)


def prefixed_openai_app(prefix: str) -> web.Application:
    """The OpenAI mock served under ``prefix`` (Groq: ``/openai/v1/...``)."""
    inner = openai_app()
    outer = web.Application()
    outer[RECEIVED] = inner[RECEIVED]
    outer.add_subapp(prefix, inner)
    return outer


async def mistral_chat(request: web.Request) -> web.StreamResponse:
    """Mistral's chat completions: ``stream_options`` is a 422, every stream ends with usage."""
    raw = await record(request)
    body = orjson.loads(raw)
    if "stream_options" in body:
        detail = [{"type": "extra_forbidden", "loc": ["body", "stream_options"], "msg": "Extra inputs are not permitted"}]
        return web.json_response({"object": "error", "message": {"detail": detail}, "type": "invalid_request_error"}, status=422)
    scenario = request.headers.get("x-mock-scenario", "")
    if scenario.startswith("error-"):
        status = int(scenario[6:])
        error = {"object": "error", "message": f"mock upstream error {status}", "type": "api_error", "code": str(status)}
        return web.json_response(error, status=status)
    u = mock_usage(request)
    usage = {"prompt_tokens": u["prompt"], "completion_tokens": u["completion"], "total_tokens": u["prompt"] + u["completion"]}
    base = {"id": "cmpl-mistral", "created": int(time.time()), "model": body["model"]}
    texts = texts_of(request)
    if not body.get("stream"):
        message = {"role": "assistant", "content": "".join(texts), "tool_calls": None}
        out = orjson.dumps(
            {
                **base,
                "object": "chat.completion",
                "usage": usage,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            }
        )
        request.app[SENT].append(out)
        return web.Response(body=out, content_type="application/json")
    chunk = {**base, "object": "chat.completion.chunk"}
    events = [
        sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": t}, "finish_reason": None}]})
        for t in texts
    ]
    events.append(sse({**chunk, "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    request.app[SENT].append(b"".join(events))
    return await stream_events(request, events)


def mistral_app() -> web.Application:
    """An upstream that speaks Mistral's dialect of the OpenAI chat API."""
    app = web.Application()
    app[RECEIVED], app[SENT] = [], []
    app.router.add_post("/v1/chat/completions", mistral_chat)
    return app


def azure_app() -> web.Application:
    """Azure OpenAI's routes: ``/openai/deployments/{name}/...`` and the ``/openai/v1`` API."""
    app = web.Application()
    app[RECEIVED] = []
    app.router.add_post("/openai/deployments/{deployment}/chat/completions", openai_chat)
    app.router.add_post("/openai/deployments/{deployment}/embeddings", openai_embeddings)
    app.router.add_post("/openai/v1/chat/completions", openai_chat)
    app.router.add_get("/openai/v1/models", openai_models)
    return app
