"""The pipelined Redis connection of the request path, against servers that misbehave."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import BusyLoadingError, OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.ledger import CycleLimits, Hold, Ledger, Policy, UsageEvent, new_id
from proxy.ledger.ledger import SETTLE_SECONDS
from proxy.ledger.pipeline import TRANSIENT_ERRORS, BusyScriptError, NoReplicasError, NotSentError, RedisPipeline
from proxy.spool import Spool

from .support.waiting import until


class ToyServer:
    """A TCP server that either never reads (a stalled Redis) or answers every command
    with one fixed RESP reply; counts the connections it accepted and those still open."""

    def __init__(self, reply: bytes | None):
        self.reply = reply
        self.connections = 0
        self.open = 0
        self._server: asyncio.Server | None = None
        self._closed = asyncio.Event()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        if self.reply is None:
            await self._closed.wait()  # accept, never read
        else:
            while await reader.read(65536):
                writer.write(self.reply)
        self.open -= 1
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
        pipeline = RedisPipeline.from_url(server_url, timeout=0.3)
        big = "x" * 500_000  # more than the socket buffers take: close() alone would wait to send it
        results = await asyncio.gather(*(pipeline.execute("SET", "k", big) for _ in range(20)), return_exceptions=True)
        assert any(isinstance(r, RedisTimeoutError) for r in results)
        assert all(isinstance(r, TRANSIENT_ERRORS) for r in results)
        with pytest.raises(RedisTimeoutError):
            await pipeline.execute("PING")
        assert toy.connections == 2
        pipeline.close()


@pytest.mark.parametrize(
    ("reply", "error", "transient"),
    [
        (b"-LOADING Redis is loading the dataset in memory\r\n", BusyLoadingError, True),
        (b"-READONLY You can't write against a read only replica.\r\n", ReadOnlyError, True),
        (b"-NOREPLICAS Not enough good replicas to write.\r\n", NoReplicasError, True),
        (b"-BUSY Redis is busy running a script.\r\n", BusyScriptError, True),
        (b"-OOM command not allowed when used memory > 'maxmemory'.\r\n", OutOfMemoryError, True),
        (b"-ERR unknown command\r\n", ResponseError, False),
    ],
)
async def test_error_replies_of_a_restarting_or_failing_over_redis_are_retryable(reply, error, transient):
    async with ToyServer(reply) as server_url:
        pipeline = RedisPipeline.from_url(server_url, timeout=5)
        with pytest.raises(error) as raised:
            await pipeline.execute("EVALSHA", "0" * 40, 0)
        assert isinstance(raised.value, TRANSIENT_ERRORS) is transient
        pipeline.close()


async def test_a_call_no_connection_could_carry_is_known_not_sent():
    """Nothing listens: the admission that failed this way placed no hold to release."""
    pipeline = RedisPipeline.from_url("redis://127.0.0.1:9", timeout=1)
    with pytest.raises(NotSentError):
        await pipeline.execute("PING")
    async with ToyServer(b"-ERR unknown command\r\n") as server_url:  # a connection that opens: maybe sent
        pipeline = RedisPipeline.from_url(server_url, timeout=1)
        with pytest.raises(ResponseError) as raised:
            await pipeline.execute("PING")
        assert not isinstance(raised.value, NotSentError)
        pipeline.close()


async def test_a_refused_password_closes_its_socket():
    """Every call would otherwise leave one more connection open until descriptors ran out."""
    toy = ToyServer(b"-WRONGPASS invalid username-password pair\r\n")
    async with toy as server_url:
        pipeline = RedisPipeline.from_url(server_url.replace("redis://", "redis://:secret@"), timeout=1)
        for _ in range(3):
            with pytest.raises(ResponseError, match="WRONGPASS"):
                await pipeline.execute("PING")
        await until(lambda: toy.open == 0, within=5, what="every refused connection to close")
        assert toy.connections == 3
        pipeline.close()


async def test_a_settlement_redis_does_not_answer_goes_to_the_spool_within_the_deadline(tmp_path, redis):
    """A Redis that takes the connection and never replies (a stalled server, a dropped
    route) must not hold the answer for attempts × the connection timeout."""
    async with ToyServer(reply=None) as server_url:
        spool = Spool(tmp_path)
        spool.open()
        pipeline = RedisPipeline.from_url(server_url, timeout=10)
        ledger = Ledger(redis, "t:", pipeline=pipeline, spool=spool)  # the request-path scripts go to the silent server
        usage = UsageEvent(key_id="k", provider="openai", model="gpt-4o-mini", tier="starter", input_tokens=1)
        started = asyncio.get_running_loop().time()
        posted = await ledger.post(Hold(new_id("hold"), "usr_x", 100), cost=7, usage=usage, limits=_LIMITS)
        waited = asyncio.get_running_loop().time() - started
        assert posted is None and len(spool) == 1
        assert waited < SETTLE_SECONDS + 1  # not 5 attempts × 10 s
        pipeline.close()
        spool.close()


_LIMITS = CycleLimits(
    allowance=1_000, monthly_tokens=None, monthly_requests=None, rpm=None, policy=Policy.LENIENT, warning_permille=800
)


def test_the_pipelined_connection_works_on_uvloop(settings):
    """`costproxy serve` runs on uvloop, whose transports are not asyncio.Transport subclasses."""
    import uvloop

    async def round_trip() -> object:
        pipeline = RedisPipeline.from_url(settings.redis_url)
        try:
            return await pipeline.execute("PING")
        finally:
            pipeline.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(round_trip()) in (b"PONG", "PONG")
