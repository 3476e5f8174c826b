"""The public port under abuse: slow request heads are cut off, open connections are
capped below the descriptor limit, and health probes keep answering."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from .support.accounts import assert_untouched
from .support.mock_upstreams import openai_app
from .support.money import ALLOWANCE
from .support.processes import answers, costproxy, environment

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _slowloris(port: int, sockets: int) -> list[Connection]:
    """Open ``sockets`` connections that each send the start of a request head and no more."""
    opened = []
    for _ in range(sockets):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            continue
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: slow\r\n")
        opened.append((reader, writer))
    return opened


async def _closed_by_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Whether the server has cut this connection: end of stream, or a reset / broken pipe.
    A connection that is still open (the read times out) is *not* cut."""
    try:
        writer.write(b"X")  # one more header byte, as a slowloris does
        await writer.drain()
        return await asyncio.wait_for(reader.read(1), 0.5) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


async def _all_cut(slow: list[Connection], within: float) -> int:
    """Wait until the server has cut every slow connection; how many it has not cut after ``within`` s."""
    left = list(slow)
    deadline = time.monotonic() + within
    while left and time.monotonic() < deadline:
        cut = await asyncio.gather(*(_closed_by_server(r, w) for r, w in left))
        left = [conn for conn, gone in zip(left, cut, strict=True) if not gone]
    return len(left)


async def test_slow_heads_are_cut_and_health_probes_keep_answering(settings, tmp_path):
    env = environment(settings, HEADER_TIMEOUT_SECONDS="1")
    with costproxy(["serve"], env, tmp_path / "serve.log", open_files=256) as proxy:
        port = int(proxy.url.rsplit(":", 1)[1])
        slow = await _slowloris(port, 300)  # more than the 256 descriptors the process has
        assert len(slow) >= 190
        started = time.monotonic()
        while (status := await asyncio.to_thread(answers, f"{proxy.url}/healthz")) != 200:
            assert time.monotonic() - started < 4, "health probes went unanswered"
            await asyncio.sleep(0.1)
        still_open = await _all_cut(slow, within=10)  # the deadline is 1 s; a busy machine is slower
        assert still_open == 0, f"{still_open} slow connections still open"
        assert status == 200 and await asyncio.to_thread(answers, f"{proxy.url}/healthz") == 200
        metrics = await asyncio.to_thread(lambda: __import__("urllib.request").request.urlopen(f"{proxy.url}/metrics").read())
        assert b'costproxy_connections_cut_total{reason="header_timeout"}' in metrics
        for _, writer in slow:
            writer.close()
    print(f"slowloris: {len(slow)} slow connections, all cut by the 1 s head deadline; probes answered")


async def _get_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str = "/healthz") -> tuple[bytes, bytes]:
    """Send a whole ``GET`` on an open connection (kept alive); its status line and body."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: capped\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    return head.split(b"\r\n", 1)[0], body


async def _healthz_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """Send a whole ``GET /healthz`` on an open connection (kept alive) and read its status line."""
    return (await _get_on(reader, writer))[0]


async def _open_served(port: int, count: int, within: float = 10.0) -> tuple[list[Connection], int]:
    """``count`` connections the server keeps and serves, and how many it refused on the way.

    Connections a client closed are freed when the server notices, which a busy machine may
    delay: while some are refused, all are closed and tried again. Every refusal is counted
    by the server's metric, so the caller adds them to what it expects there."""
    refused = 0
    deadline = time.monotonic() + within
    while True:
        opened = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]
        served = 0
        for reader, writer in opened:
            try:
                await _healthz_on(reader, writer)
                served += 1
            except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError):
                refused += 1
        if served == count:
            return opened, refused
        for _, writer in opened:
            writer.close()
        assert time.monotonic() < deadline, f"only {served} of {count} connections served"
        await asyncio.sleep(0.1)


async def _refused_at_once(port: int) -> bool:
    """Whether a fresh connection is closed by the server without a request being answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.read(1), 2) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    finally:
        writer.close()


async def test_connections_beyond_max_connections_are_closed_at_once_and_open_ones_keep_working(settings, tmp_path):
    """README: ``MAX_CONNECTIONS`` client connections a process keeps open at once; more are
    closed at once. The connections already open keep being served, and a slot freed by a
    client closing is taken by the next connection (refused ones do not leak slots)."""
    cap = 6
    env = environment(settings, MAX_CONNECTIONS=str(cap), HEADER_TIMEOUT_SECONDS="30")
    with costproxy(["serve"], env, tmp_path / "serve.log") as proxy:
        port = int(proxy.url.rsplit(":", 1)[1])
        assert f"at most {cap} connections" in proxy.output()
        # every open connection is served (kept alive), so the server has accepted all of them
        held, refused_meanwhile = await _open_served(port, cap)  # once the start-up probe's connection has gone

        # one more: closed at once, by the server, with nothing answered
        for _ in range(3):
            assert await _refused_at_once(port), "a connection beyond MAX_CONNECTIONS was kept open"
        # a health probe is a connection like any other and is refused too while at the cap
        assert await asyncio.to_thread(answers, f"{proxy.url}/healthz") is None
        # the connections open before the cap was reached are untouched by the refusals
        assert [await _healthz_on(r, w) for r, w in held] == [b"HTTP/1.1 200 OK"] * cap

        # a client closing frees its slot for the next connection
        _, first = held.pop(0)
        first.close()
        await first.wait_closed()
        (freed,), refused = await _open_served(port, 1)
        refused_meanwhile += refused
        held.append(freed)
        assert await _refused_at_once(port), "the cap did not hold after a slot was reused"

        for _, writer in held:
            writer.close()
        # all slots are free again: the refused connections were not counted as open
        again, refused = await _open_served(port, cap)
        refused_meanwhile += refused
        for _, writer in again[1:]:
            writer.close()
        status, metrics = await _get_on(*again[0], "/metrics")
        again[0][1].close()
        assert status == b"HTTP/1.1 200 OK"
        cut = 5 + refused_meanwhile  # the 3 + 1 + 1 above, and those a busy machine added
        assert f'costproxy_connections_cut_total{{reason="connection_cap"}} {cut}.0'.encode() in metrics


async def test_a_body_that_trickles_in_is_refused_with_408_and_costs_nothing(make_customer, start_proxy, ledger):
    proxy = await start_proxy({"openai": openai_app()}, body_timeout=0.5)
    customer = await make_customer("starter")
    port = int(proxy.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {customer.api_key}\r\nContent-Length: 1000\r\n\r\n".encode()
        + b'{"model": "gpt-4o-mini", '
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 408")
    writer.close()
    await assert_untouched(ledger, customer.user_id, ALLOWANCE["starter"])
    assert not proxy.received("openai")


def test_settings_refuse_a_hold_ttl_shorter_than_three_heartbeats():
    import pytest

    from proxy.settings import Settings

    with pytest.raises(SystemExit, match="HOLD_TTL_SECONDS"):
        Settings.from_env({"HOLD_TTL_SECONDS": "10", "HEARTBEAT_SECONDS": "5"})
    assert replace(Settings(), hold_ttl_seconds=15, heartbeat_seconds=5).check() is None
