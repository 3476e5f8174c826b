"""The pipelined Redis connection of the request path, against servers that misbehave."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import BusyLoadingError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.ledger.pipeline import TRANSIENT_ERRORS, RedisPipeline


class ToyServer:
    """A TCP server that either never reads (a stalled Redis) or answers every command
    with one fixed RESP reply; counts the connections it accepted."""

    def __init__(self, reply: bytes | None):
        self.reply = reply
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._closed = asyncio.Event()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.reply is None:
            await self._closed.wait()  # accept, never read
        else:
            while await reader.read(65536):
                writer.write(self.reply)
        writer.close()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._closed.set()
        self._server.close()
        await asyncio.sleep(0)


async def test_a_stalled_server_is_given_up_and_the_next_call_opens_a_new_connection():
    toy = ToyServer(reply=None)
    async with toy as server_url:
        pipeline = RedisPipeline(server_url, timeout=0.3)
        big = "x" * 500_000  # more than the socket buffers take: close() alone would wait to send it
        results = await asyncio.gather(*(pipeline.execute("SET", "k", big) for _ in range(20)), return_exceptions=True)
        assert any(isinstance(r, RedisTimeoutError) for r in results)
        assert all(isinstance(r, TRANSIENT_ERRORS) for r in results)
        with pytest.raises(RedisTimeoutError):
            await pipeline.execute("PING")
        assert toy.connections == 2
        pipeline.close()


@pytest.mark.parametrize(("reply", "error", "transient"), [
    (b"-LOADING Redis is loading the dataset in memory\r\n", BusyLoadingError, True),
    (b"-READONLY You can't write against a read only replica.\r\n", ReadOnlyError, True),
    (b"-ERR unknown command\r\n", ResponseError, False),
])
async def test_error_replies_of_a_restarting_or_failing_over_redis_are_retryable(reply, error, transient):
    async with ToyServer(reply) as server_url:
        pipeline = RedisPipeline(server_url, timeout=5)
        with pytest.raises(error) as raised:
            await pipeline.execute("EVALSHA", "0" * 40, 0)
        assert isinstance(raised.value, TRANSIENT_ERRORS) is transient
        pipeline.close()
