"""Waiting for something another process does."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def until(condition: Callable[[], Awaitable[bool] | bool], within: float, what: str, every: float = 0.05) -> None:
    """Poll ``condition`` (sync or async) until it holds; fail naming ``what`` after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        holds = condition()
        if not isinstance(holds, bool):
            holds = await holds
        if holds:
            return
        assert asyncio.get_running_loop().time() < deadline, f"gave up waiting for {what} after {within} s"
        await asyncio.sleep(every)
