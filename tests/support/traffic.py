"""Traffic the fault tests keep up while they break something."""

from __future__ import annotations

import asyncio
import collections
import time

import aiohttp


async def steady_load(url: str, api_key: str, until_time: float, outcomes: collections.Counter[str]) -> None:
    """Chat completions (every third one streamed) to ``url`` one after another until
    ``until_time`` (monotonic); counts each answer in ``outcomes`` as its status and error
    code (``"200"``, ``"503 ledger_unavailable"``) or the client error."""
    headers = {"Authorization": f"Bearer {api_key}"}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    async with aiohttp.ClientSession() as http:
        n = 0
        while time.monotonic() < until_time:
            n += 1
            stream = n % 3 == 0
            try:
                async with http.post(url, json={**body, "stream": stream}, headers=headers) as response:
                    payload = await response.read()
                    code = ""
                    if response.status != 200:
                        code = (await response.json(content_type=None))["error"]["code"]
                    outcomes[f"{response.status} {code}".strip()] += 1
                    if response.status == 200 and not stream:
                        assert b'"usage"' in payload
            except aiohttp.ClientError as exc:
                outcomes[f"client error {type(exc).__name__}"] += 1
            await asyncio.sleep(0.01)
