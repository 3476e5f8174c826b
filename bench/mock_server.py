"""Run mock upstreams from ``tests/support/mock_upstreams.py`` in their own process, on uvloop.

    python -m bench.mock_server --listen 8001=tests.support.mock_upstreams:openai_app [--listen ...]

The mocks record every request in ``app[RECEIVED]`` for the tests; here that list is
replaced by a short ring buffer so a long benchmark does not grow the mock's memory (and
its garbage collector's work) without bound.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib
import signal
from collections.abc import Callable

import uvloop
from aiohttp import web


def load_app(spec: str) -> web.Application:
    module, _, factory = spec.partition(":")
    app: web.Application = getattr(importlib.import_module(module), factory)()
    from tests.support.mock_upstreams import RECEIVED

    if RECEIVED in app:
        app[RECEIVED] = collections.deque(maxlen=64)  # type: ignore[misc]  # a capped deque for the list
    return app


async def serve(listeners: list[tuple[int, web.Application]], host: str) -> None:
    """Serve each app on its port until SIGINT or SIGTERM (used by the floor too)."""
    runners = []
    for port, app in listeners:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, host, port, backlog=1024).start()
        runners.append(runner)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for runner in runners:
        await runner.cleanup()


def serve_from_command_line(description: str, metavar: str, make_app: Callable[[str], web.Application]) -> None:
    """``--listen PORT=SPEC`` (repeatable): serve ``make_app(SPEC)`` on each PORT (the floor uses it too)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--listen", action="append", required=True, metavar=f"PORT={metavar}")
    args = parser.parse_args()
    listeners = []
    for item in args.listen:
        port, _, spec = item.partition("=")
        listeners.append((int(port), make_app(spec)))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(listeners, args.host))


def main() -> None:
    serve_from_command_line(__doc__ or "", "MODULE:FACTORY", load_app)


if __name__ == "__main__":
    main()
