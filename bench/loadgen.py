"""Closed-loop load generator: its own process, commands as JSON lines on stdin.

Each command line is a measurement::

    {"url": ..., "method": "POST", "headers": {...}, "body": "<latin-1 str>", "stream": false,
     "concurrency": 16, "duration": 3.0, "warmup": 0.3}

and is answered with one JSON line on stdout::

    {"count": n, "errors": e, "error_samples": [...], "elapsed": s,
     "latency_ms": [...], "ttfb_ms": [...]}

``concurrency`` workers share one keep-alive ``ClientSession`` and send requests back to
back for ``warmup + duration`` seconds. Only requests *started* in the measured window
count; latency is ``time.perf_counter()`` from sending to the last byte read (for streams
also to the first body byte). A response counts as an error unless it is a 200 whose body
is complete (a stream must end with ``done_marker`` when one is given).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson
import uvloop
from aiohttp import ClientSession, ClientTimeout, TCPConnector


async def one_request(
    session: ClientSession, method: str, url: str, headers: dict[str, str], body: bytes | None, done_marker: bytes | None
) -> tuple[bool, float, str]:
    """One request: (succeeded, time of its first body byte for a stream, why it failed).
    ``done_marker`` None reads a whole answer; else a stream whose end must carry it (b"": any end)."""
    first = 0.0
    try:
        async with session.request(method, url, headers=headers, data=body) as resp:
            if done_marker is None:
                ok = resp.status == 200 and bool(await resp.read())
            else:
                tail = b""
                async for chunk in resp.content.iter_any():
                    first = first or time.perf_counter()
                    tail = (tail + chunk)[-64:]
                ok = resp.status == 200 and (not done_marker or tail.rstrip().endswith(done_marker))
            return ok, first, "" if ok else f"status {resp.status}"
    except Exception as exc:  # any failure is an error sample, the loop goes on
        return False, first, repr(exc)


async def measure(cmd: dict[str, Any]) -> dict[str, Any]:
    url, method, stream = cmd["url"], cmd.get("method", "POST"), bool(cmd.get("stream"))
    headers = cmd.get("headers") or {}
    body = cmd["body"].encode("latin-1") if cmd.get("body") else None
    concurrency = int(cmd["concurrency"])
    done_marker = cmd.get("done_marker", "").encode() if stream else b""
    perf = time.perf_counter
    latencies: list[float] = []
    ttfbs: list[float] = []
    errors: list[str] = []
    last_done = [0.0]

    async with ClientSession(
        connector=TCPConnector(limit=0, force_close=False), timeout=ClientTimeout(total=60), auto_decompress=False
    ) as session:
        start = perf() + float(cmd.get("warmup", 0.3))
        end = start + float(cmd["duration"])

        async def worker() -> None:
            while True:
                t0 = perf()
                if t0 >= end:
                    return
                ok, first, why = await one_request(session, method, url, headers, body, done_marker if stream else None)
                t1 = perf()
                if t0 < start:
                    continue
                last_done[0] = max(last_done[0], t1)
                if ok:
                    latencies.append((t1 - t0) * 1000)
                    if stream:
                        ttfbs.append((first - t0) * 1000)
                else:
                    errors.append(why)
                    if len(errors) > 1000:
                        await asyncio.sleep(0.01)  # don't spin on a dead target

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = max(last_done[0], end) - start
    return {
        "count": len(latencies),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "elapsed": elapsed,
        "latency_ms": [round(v, 4) for v in latencies],
        "ttfb_ms": [round(v, 4) for v in ttfbs],
    }


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while line := await reader.readline():
        if not line.strip():
            continue
        result = await measure(orjson.loads(line))
        sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
        sys.stdout.flush()


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
