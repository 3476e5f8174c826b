"""A local server that speaks the Gemini API (``generativelanguage.googleapis.com``), for tests and the benchmark.

Steered per request like :mod:`tests.support.mock_upstreams` (the same header names):

``x-mock-usage``     ``prompt`` = ``promptTokenCount`` (cached tokens included), ``cached`` =
                     ``cachedContentTokenCount``, ``completion`` = ``candidatesTokenCount``,
                     ``reasoning`` = ``thoughtsTokenCount``, ``tool`` = ``toolUsePromptTokenCount``
``x-mock-scenario``  ``error-<status>`` | ``slow`` | ``hang`` | ``no-usage``
``x-mock-chunks``    number of streamed chunks (default 3)

``streamGenerateContent`` answers with SSE when the query has ``alt=sse``, else with a
JSON array streamed element by element, each element written in two pieces. Every chunk
carries the usage so far (output counts grow, the last chunk has the totals). Responses are
deterministic, so a direct request gives the very bytes the proxy relays. Every request is
recorded in ``app[RECEIVED]``.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from aiohttp import web

from .mock_upstreams import RECEIVED, mock_usage, record, scenario_of, stream_events, texts_of

_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def google_error(status: int) -> web.Response:
    """An error in Google's shape."""
    body = {"error": {"code": status, "message": f"mock upstream error {status}", "status": _STATUS.get(status, "UNKNOWN")}}
    return web.json_response(body, status=status)


def _usage_metadata(u: dict[str, int], completion: int) -> dict[str, Any]:
    meta: dict[str, Any] = {"promptTokenCount": u["prompt"], "candidatesTokenCount": completion}
    optional = (("cachedContentTokenCount", "cached"), ("thoughtsTokenCount", "reasoning"), ("toolUsePromptTokenCount", "tool"))
    for field, name in optional:
        if u.get(name):
            meta[field] = u[name]
    meta["totalTokenCount"] = u["prompt"] + completion + u.get("reasoning", 0) + u.get("tool", 0)
    meta["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": u["prompt"]}]
    return meta


def _chunk(model: str, text: str, usage: dict[str, Any] | None, finished: bool) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if finished:
        candidate["finishReason"] = "STOP"
    chunk: dict[str, Any] = {"candidates": [candidate]}
    if usage is not None:
        chunk["usageMetadata"] = usage
    chunk.update(modelVersion=model, responseId="mock-response-id")
    return chunk


def _json_array_pieces(chunks: list[dict[str, Any]]) -> list[bytes]:
    pieces = []
    for i, chunk in enumerate(chunks):
        element = (b"[" if i == 0 else b",\r\n") + orjson.dumps(chunk, option=orjson.OPT_INDENT_2)
        middle = len(element) // 2
        pieces += [element[:middle], element[middle:]]
    pieces[-1] += b"]"
    return pieces


async def model_call(request: web.Request) -> web.StreamResponse:
    raw = await record(request)
    model, _, action = request.match_info["call"].partition(":")
    u = mock_usage(request)
    if action == "countTokens":
        details = [{"modality": "TEXT", "tokenCount": u["prompt"]}]
        return web.json_response({"totalTokens": u["prompt"], "promptTokensDetails": details})
    scenario = scenario_of(request)
    if scenario.startswith("error-"):
        return google_error(int(scenario[6:]))
    with_usage = scenario != "no-usage"
    if action in ("embedContent", "batchEmbedContents"):
        count = len(orjson.loads(raw).get("requests") or [None])
        vectors = [{"values": [0.1, -0.2, 0.3]} for _ in range(count)]
        out: dict[str, Any] = {"embeddings": vectors} if action == "batchEmbedContents" else {"embedding": vectors[0]}
        if with_usage:
            out["usageMetadata"] = {"promptTokenCount": u["prompt"], "totalTokenCount": u["prompt"]}
        return web.json_response(out)
    texts = texts_of(request)
    if action == "generateContent":
        return web.json_response(_chunk(model, "".join(texts), _usage_metadata(u, u["completion"]) if with_usage else None, True))
    if action != "streamGenerateContent":
        return google_error(404)
    n = len(texts)
    chunks = [
        _chunk(model, text, _usage_metadata(u, math.ceil(u["completion"] * (i + 1) / n)) if with_usage else None, i == n - 1)
        for i, text in enumerate(texts)
    ]
    if request.query.get("alt") == "sse":
        return await stream_events(request, [b"data: " + orjson.dumps(c) + b"\r\n\r\n" for c in chunks])
    return await stream_events(request, _json_array_pieces(chunks))


async def list_models(request: web.Request) -> web.Response:
    await record(request)
    return web.json_response(
        {
            "models": [
                {
                    "name": "models/gemini-2.5-flash",
                    "displayName": "Gemini 2.5 Flash",
                    "supportedGenerationMethods": ["generateContent", "countTokens"],
                }
            ]
        }
    )


async def _array_stream_is_json(request: web.Request, response: web.StreamResponse) -> None:
    # The shared stream writer labels everything SSE; Google labels the array form JSON.
    if request.path.endswith(":streamGenerateContent") and request.query.get("alt") != "sse":
        response.headers["Content-Type"] = "application/json; charset=UTF-8"


def google_app() -> web.Application:
    """An upstream that speaks the Gemini API (v1 and v1beta)."""
    app = web.Application()
    app[RECEIVED] = []
    app.on_response_prepare.append(_array_stream_is_json)
    for version in ("v1", "v1beta"):
        app.router.add_post(f"/{version}/models/{{call}}", model_call)
        app.router.add_get(f"/{version}/models", list_models)
    return app
