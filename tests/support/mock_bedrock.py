"""A local Amazon Bedrock runtime for tests: checks SigV4 as AWS does, answers JSON and
binary event streams (``application/vnd.amazon.eventstream``).

Requests whose signature does not verify with the operator's credentials get AWS's own 403
(``UnrecognizedClientException`` / ``InvalidSignatureException``). Steered per request like
``mock_upstreams`` by headers a boto3 ``before-sign`` hook adds:

``x-mock-usage``     ``prompt=1200,completion=300,cached=200,write=0,write1h=0`` (``prompt`` is
                     the uncached input, as Bedrock counts it)
``x-mock-scenario``  ``error-400`` | ``error-429`` | ``error-500`` | ``no-usage`` | ``cut`` (a
                     Claude stream that ends after its text, before its usage)
``x-mock-chunks``    number of text deltas in a stream (default 3)

``app[RECEIVED]`` records every request, ``app[SENT]`` the exact bytes of every answer body.
"""

from __future__ import annotations

import base64
import re
import struct
import zlib
from typing import Any

import orjson
from aiohttp import web

from .mock_upstreams import RECEIVED, Received, mock_usage, texts_of

SENT = web.AppKey("sent", list)
CREDENTIALS = web.AppKey("credentials", tuple)

OPERATOR_ACCESS_KEY = "AKIAOPERATORTEST0001"
OPERATOR_SECRET = "operator/secret+key"
OPERATOR_REGION = "us-east-1"
EVENT_STREAM = "application/vnd.amazon.eventstream"

_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request, "
    r"SignedHeaders=(?P<signed>[^,]+), Signature=(?P<signature>[0-9a-f]{64})"
)
_ERROR_TYPES = {400: "ValidationException", 429: "ThrottlingException", 500: "InternalServerException"}


# event-stream encoding ----------------------------------------------------------------------
def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude (total length, headers length, CRC32), string
    headers (name length, name, type 7, value length, value), payload, message CRC32."""
    encoded = b"".join(
        struct.pack("!B", len(name)) + name.encode() + b"\x07" + struct.pack("!H", len(value.encode())) + value.encode()
        for name, value in headers.items()
    )
    prelude = struct.pack("!II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack("!I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack("!I", zlib.crc32(message))


def event(kind: str, payload: dict[str, Any]) -> bytes:
    """An ``event`` message of type ``kind`` with a JSON payload."""
    return encode_message(
        {":event-type": kind, ":content-type": "application/json", ":message-type": "event"}, orjson.dumps(payload)
    )


# SigV4 ---------------------------------------------------------------------------------------
def signature_error(request: web.Request, body: bytes) -> web.Response | None:
    """AWS's refusal if the request is not signed by the operator's credentials, else None."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    access_key, secret, token = request.app[CREDENTIALS]
    auth = _AUTH.fullmatch(request.headers.get("Authorization", ""))
    if auth is None or auth["key"] != access_key or request.headers.get("X-Amz-Security-Token") != token:
        return bedrock_error(403, "UnrecognizedClientException", "The security token included in the request is invalid.")
    signed = auth["signed"].split(";")
    aws = AWSRequest(
        method=request.method,
        url=f"http://{request.host}{request.raw_path}",
        data=body,
        headers={name: request.headers.get(name, "") for name in signed},
    )
    aws.context["timestamp"] = request.headers.get("X-Amz-Date", "")
    signer = SigV4Auth(Credentials(access_key, secret, token), auth["service"], auth["region"])
    expected = signer.signature(signer.string_to_sign(aws, signer.canonical_request(aws)), aws)
    scope = (auth["region"], auth["service"], auth["date"])
    if scope != (OPERATOR_REGION, "bedrock", aws.context["timestamp"][:8]) or expected != auth["signature"]:
        return bedrock_error(
            403, "InvalidSignatureException", "The request signature we calculated does not match the signature you provided."
        )
    return None


def bedrock_error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response(
        {"message": message},
        status=status,
        headers={"x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/"},
    )


# answers -------------------------------------------------------------------------------------
def _usage(request: web.Request) -> dict[str, int]:
    u = mock_usage(request)
    return {
        "prompt": u["prompt"],
        "completion": u["completion"],
        "cached": u["cached"],
        "write": u.get("write", 0),
        "write1h": u.get("write1h", 0),
    }


def converse_usage(u: dict[str, int]) -> dict[str, Any]:
    usage = {
        "inputTokens": u["prompt"],
        "outputTokens": u["completion"],
        "totalTokens": u["prompt"] + u["cached"] + u["write"] + u["completion"],
        "cacheReadInputTokens": u["cached"],
        "cacheWriteInputTokens": u["write"],
    }
    if u["write1h"]:
        usage["cacheDetails"] = [
            {"ttl": "5m", "inputTokens": u["write"] - u["write1h"]},
            {"ttl": "1h", "inputTokens": u["write1h"]},
        ]
    return usage


def claude_usage(u: dict[str, int]) -> dict[str, Any]:
    return {
        "input_tokens": u["prompt"],
        "cache_read_input_tokens": u["cached"],
        "cache_creation_input_tokens": u["write"],
        "cache_creation": {"ephemeral_5m_input_tokens": u["write"] - u["write1h"], "ephemeral_1h_input_tokens": u["write1h"]},
        "output_tokens": u["completion"],
    }


def _converse_events(request: web.Request, u: dict[str, int]) -> list[bytes]:
    events = [event("messageStart", {"role": "assistant"})]
    events += [event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": t}}) for t in texts_of(request)]
    events += [event("contentBlockStop", {"contentBlockIndex": 0}), event("messageStop", {"stopReason": "end_turn"})]
    if request.headers.get("x-mock-scenario") != "no-usage":
        events.append(event("metadata", {"usage": converse_usage(u), "metrics": {"latencyMs": 42}}))
    return events


def _metrics(u: dict[str, int]) -> dict[str, Any]:
    return {
        "inputTokenCount": u["prompt"],
        "outputTokenCount": u["completion"],
        "invocationLatency": 42,
        "firstByteLatency": 7,
        "cacheReadInputTokenCount": u["cached"],
        "cacheWriteInputTokenCount": u["write"],
    }


def _invoke_chunks(model: str, request: web.Request, u: dict[str, int]) -> list[bytes]:
    """InvokeModelWithResponseStream: the model's own chunks, base64 in ``chunk`` events."""
    natives = (
        _claude_natives(request, u)
        if "anthropic." in model
        else [
            *({"generation": t, "stop_reason": None} for t in texts_of(request)),
            {"generation": "", "stop_reason": "stop", "amazon-bedrock-invocationMetrics": _metrics(u)},
        ]
    )
    return [event("chunk", {"bytes": base64.b64encode(orjson.dumps(n)).decode()}) for n in natives]


def _claude_natives(request: web.Request, u: dict[str, int]) -> list[dict[str, Any]]:
    start = {**claude_usage(u), "output_tokens": 1}
    natives: list[dict[str, Any]] = [
        {
            "type": "message_start",
            "message": {
                "id": "msg_mock",
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": "claude-mock",
                "stop_reason": None,
                "usage": start,
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ]
    natives += [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}} for t in texts_of(request)
    ]
    if request.headers.get("x-mock-scenario") != "cut":
        natives += [
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": u["completion"]}},
            {"type": "message_stop", "amazon-bedrock-invocationMetrics": _metrics(u)},
        ]
    return natives


def _invoke_body(model: str, request: web.Request, u: dict[str, int]) -> dict[str, Any]:
    text = "".join(texts_of(request))
    if "anthropic." in model:
        return {
            "id": "msg_mock",
            "type": "message",
            "role": "assistant",
            "model": "claude-mock",
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "usage": claude_usage(u),
        }
    if "meta." in model:
        return {
            "generation": text,
            "prompt_token_count": u["prompt"],
            "generation_token_count": u["completion"],
            "stop_reason": "stop",
        }
    return {"outputs": [{"text": text, "stop_reason": "stop"}]}  # Mistral: usage in headers only


async def _answer(
    request: web.Request, body: bytes, content_type: str, headers: dict[str, str] | None = None
) -> web.StreamResponse:
    request.app[SENT].append(body)
    response = web.StreamResponse(headers={"Content-Type": content_type, "x-amzn-RequestId": "req-mock", **(headers or {})})
    await response.prepare(request)
    for start in range(0, len(body), 50):  # small writes: messages arrive split across chunks
        await response.write(body[start : start + 50])
    await response.write_eof()
    return response


async def bedrock_handler(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    request.app[RECEIVED].append(
        Received(request.method, request.raw_path, request.query_string, {str(k): v for k, v in request.headers.items()}, body)
    )
    refused = signature_error(request, body)
    if refused is not None:
        return refused
    scenario = request.headers.get("x-mock-scenario", "")
    if scenario.startswith("error-"):
        status = int(scenario[6:])
        return bedrock_error(status, _ERROR_TYPES[status], f"mock upstream error {status}")
    model, action = request.match_info["model"], request.match_info["action"]
    u = _usage(request)
    if action == "count-tokens":
        return await _answer(request, orjson.dumps({"inputTokens": u["prompt"]}), "application/json")
    if action == "converse":
        out = {
            "output": {"message": {"role": "assistant", "content": [{"text": "".join(texts_of(request))}]}},
            "stopReason": "end_turn",
            "metrics": {"latencyMs": 42},
        }
        if scenario != "no-usage":
            out["usage"] = converse_usage(u)
        return await _answer(request, orjson.dumps(out), "application/json")
    if action == "converse-stream":
        return await _answer(request, b"".join(_converse_events(request, u)), EVENT_STREAM)
    if action == "invoke":
        counts = {"X-Amzn-Bedrock-Input-Token-Count": str(u["prompt"]), "X-Amzn-Bedrock-Output-Token-Count": str(u["completion"])}
        return await _answer(request, orjson.dumps(_invoke_body(model, request, u)), "application/json", counts)
    chunks = b"".join(_invoke_chunks(model, request, u))
    return await _answer(request, chunks, EVENT_STREAM, {"X-Amzn-Bedrock-Content-Type": "application/json"})


def bedrock_app(
    access_key: str = OPERATOR_ACCESS_KEY, secret: str = OPERATOR_SECRET, token: str | None = None
) -> web.Application:
    """A Bedrock runtime that accepts requests signed with these credentials."""
    app = web.Application()
    app[RECEIVED], app[SENT] = [], []
    app[CREDENTIALS] = (access_key, secret, token)
    actions = "converse|converse-stream|invoke|invoke-with-response-stream|count-tokens"
    app.router.add_post(r"/model/{model:.+}/{action:" + actions + "}", bedrock_handler)
    return app
