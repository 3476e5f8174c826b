"""`costproxy serve` as an operator runs it: SIGTERM during live streams finishes them all,
settles every hold and exits 0; `--workers 2` shares one port and one /metrics; SIGHUP
reloads the config files. The supervisor of `--workers N`: signals at awkward moments, a
worker's crash reason, the metrics directory an operator names."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import psutil
import pytest
import yaml

from proxy.supervisor import prepare_metrics

from .support import ROOT
from .support.accounts import settled
from .support.mock_upstreams import openai_app
from .support.money import ALLOWANCE
from .support.processes import answers, costproxy, environment, free_port
from .support.waiting import until


@pytest.fixture
async def live_settings(settings, aiohttp_server):
    """The test's settings with the mock OpenAI upstream the processes will call."""
    upstream = await aiohttp_server(openai_app())
    return replace(settings, upstream_urls={"openai": str(upstream.make_url("")).rstrip("/")})


async def _stream(url: str, api_key: str, chunks: int) -> bytes:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"Authorization": f"Bearer {api_key}", "x-mock-scenario": "slow", "x-mock-chunks": str(chunks)}
    async with aiohttp.ClientSession() as http, http.post(f"{url}/openai/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200
        return await r.read()


async def _open_holds(ledger, user_id: str, count: int) -> bool:
    found = await ledger.account(user_id)
    return found is not None and found.open_holds == count


def _readyz_refuses(url: str) -> bool:
    return answers(f"{url}/readyz") == 503


async def test_sigterm_during_live_streams_finishes_them_settles_every_hold_and_exits_0(
    live_settings, make_customer, ledger, redis, tmp_path
):
    customer = await make_customer("professional")
    env = environment(live_settings, STOP_GRACE_SECONDS="1")
    with costproxy(["serve"], env, tmp_path / "serve.log") as proxy:
        streams = [asyncio.create_task(_stream(proxy.url, customer.api_key, chunks=60)) for _ in range(10)]
        await until(lambda: _open_holds(ledger, customer.user_id, 10), within=10, what="every stream to be running")
        proxy.process.send_signal(signal.SIGTERM)
        # load balancers stop sending at once
        await until(lambda: asyncio.to_thread(_readyz_refuses, proxy.url), within=5, what="/readyz to answer 503")
        bodies = await asyncio.gather(*streams)
        code = await asyncio.to_thread(proxy.process.wait, 30)
        assert await asyncio.to_thread(answers, f"{proxy.url}/healthz") is None  # the port is closed
    assert code == 0, proxy.output()
    assert all(body.rstrip().endswith(b"data: [DONE]") for body in bodies)  # every stream whole
    account = await settled(ledger, customer.user_id)
    assert (account.balance, account.held, account.open_holds, account.requests) == (
        ALLOWANCE["professional"] - 10 * 345,
        0,
        0,
        10,
    )
    assert not await redis.zcard(ledger.keys.holds(customer.user_id))


async def test_two_workers_share_the_port_and_report_one_set_of_metrics(live_settings, make_customer, tmp_path):
    customer = await make_customer("enterprise")
    metrics_dir = tmp_path / "metrics"
    env = environment(live_settings, STOP_GRACE_SECONDS="0", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    with costproxy(["serve", "--workers", "2"], env, tmp_path / "serve.log") as proxy:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"Authorization": f"Bearer {customer.api_key}", "Connection": "close"}  # a new connection each time

        def serving() -> set[str]:
            """The workers that have served a request (their metric files)."""
            return {
                path.stem.rsplit("_", 1)[1]
                for path in metrics_dir.glob("counter_*.db")
                if b"costproxy_requests_total" in path.read_bytes()
            }

        sent = 0
        while sent < 40 or (len(serving()) < 2 and sent < 400):  # a worker may start later on a busy machine
            async with (
                aiohttp.ClientSession() as http,
                http.post(f"{proxy.url}/openai/v1/chat/completions", json=body, headers=headers) as r,
            ):
                assert r.status == 200
            sent += 1
        async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/metrics") as r:
            text = await r.text()
        served = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("costproxy_requests_total{"))
        assert served == sent  # one /metrics, every worker's requests
        assert len(serving()) == 2  # both workers took requests
        code = await asyncio.to_thread(proxy.stop, 30)
    assert code == 0, proxy.output()


async def test_workers_stop_when_their_supervisor_is_killed(live_settings, tmp_path):
    env = environment(live_settings, STOP_GRACE_SECONDS="0")
    with costproxy(["serve", "--workers", "2"], env, tmp_path / "serve.log") as proxy:
        workers = psutil.Process(proxy.process.pid).children()
        assert len(workers) == 2
        proxy.kill()  # SIGKILL: the supervisor cannot pass anything on
        _, alive = await asyncio.to_thread(psutil.wait_procs, workers, 15)
        assert not alive, f"orphaned workers still running: {alive}"
        assert await asyncio.to_thread(answers, f"{proxy.url}/healthz") is None  # nobody serves the port any more


async def test_sighup_reloads_the_config_at_once(live_settings, make_customer, tmp_path):
    customer = await make_customer("free")
    env = environment(live_settings, CONFIG_RELOAD_SECONDS="3600", STOP_GRACE_SECONDS="0")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    headers = {"Authorization": f"Bearer {customer.api_key}"}
    with costproxy(["serve"], env, tmp_path / "serve.log") as proxy:

        async def status() -> int:
            async with (
                aiohttp.ClientSession() as http,
                http.post(f"{proxy.url}/openai/v1/chat/completions", json=body, headers=headers) as r,
            ):
                return r.status

        assert await status() == 200
        tiers = yaml.safe_load(live_settings.tiers_file.read_text())
        tiers["tiers"]["free"]["models"] = ["gpt-4.1-nano*"]
        live_settings.tiers_file.write_text(yaml.safe_dump(tiers))
        assert await status() == 200  # not polled for an hour
        proxy.process.send_signal(signal.SIGHUP)

        async def refused() -> bool:
            return await status() == 403

        await until(refused, 5, "the SIGHUP reload")


def _serve_workers(count: int, port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``costproxy serve --workers <count>`` started, its output to ``log``; not waited for."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--workers", str(count), "--port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (Linux: /proc/<pid>/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signum - 1) & 1)


async def test_a_reload_while_the_workers_start_kills_none_of_them(live_settings, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    process = _serve_workers(2, port, environment(live_settings, STOP_GRACE_SECONDS="0"), log)
    try:
        supervisor = psutil.Process(process.pid)
        await until(lambda: process.poll() is not None or _catches(process.pid, signal.SIGHUP), 30, "the supervisor")
        workers = supervisor.children()

        def listening() -> int:
            """How many workers listen on the port yet."""
            return sum(
                any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in worker.net_connections("tcp"))
                for worker in workers
                if worker.is_running()
            )

        deadline = time.monotonic() + 30
        while process.poll() is None and listening() < 2 and time.monotonic() < deadline:
            process.send_signal(signal.SIGHUP)  # reloads, arriving while the workers are starting
            await asyncio.sleep(0.01)
        assert process.poll() is None, log.read_text()
        assert len(workers) == 2 and supervisor.children() == workers, log.read_text()  # none died, none restarted
        assert await asyncio.to_thread(answers, f"http://127.0.0.1:{port}/healthz") == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0, log.read_text()
        assert "exited with" not in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _supervise(worker: str, count: int, tmp_path: Path, prelude: str = "") -> subprocess.Popen[str]:
    """A process running ``supervisor.run_workers(count, worker)``: real forks and signals
    around a stand-in worker (the source of a function ``worker``, run in each child)."""
    script = "\n".join(
        [
            "import logging, os, signal, sys, time",
            "from pathlib import Path",
            "from proxy import supervisor",
            "logging.basicConfig(level=logging.INFO)",
            textwrap.dedent(prelude),
            textwrap.dedent(worker),
            f"sys.exit(supervisor.run_workers({count}, worker, supervisor.prepare_metrics()))",
        ]
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "MARK": str(tmp_path / "mark"),
    }
    return subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def _ended(process: subprocess.Popen[str], within: float) -> tuple[int | None, str]:
    """The exit status (None if still running after ``within`` seconds: then killed, with
    its workers) and the output."""
    try:
        process.wait(within)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return None, output
    return process.returncode, process.communicate()[0]


def test_a_sigterm_right_after_a_fork_reaches_that_worker_and_no_more_start(tmp_path):
    prelude = """
        fork = os.fork

        def fork_then_sigterm():  # the operator's SIGTERM arrives the moment the first worker is forked
            pid = fork()
            if pid:
                os.kill(os.getpid(), signal.SIGTERM)
            return pid

        os.fork = fork_then_sigterm
    """
    worker = """
        def worker():
            signal.pause()  # until a signal ends it
            return 0
    """
    code, output = _ended(_supervise(worker, 3, tmp_path, prelude), 15)
    assert code is not None, f"a worker never got the SIGTERM:\n{output}"
    assert "1 workers serving" in output  # none forked once stopping


def test_a_reload_after_sigterm_is_not_passed_on(tmp_path):
    worker = """
        def worker():
            heard, stopping = [], []
            signal.signal(signal.SIGHUP, lambda *_: heard.append("SIGHUP"))
            signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
            Path(os.environ["MARK"]).write_text("serving")
            while not stopping:
                time.sleep(0.01)
            Path(os.environ["MARK"]).write_text("stopping")
            time.sleep(2)  # draining, after serve() stopped listening for SIGHUP
            Path(os.environ["MARK"]).write_text(" ".join(heard) or "nothing")
            return 0
    """
    process = _supervise(worker, 1, tmp_path)
    mark = tmp_path / "mark"
    deadline = time.monotonic() + 15
    while not mark.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    # SIGHUP only once the supervisor has passed SIGTERM on: pending together, Python would
    # run the lower-numbered SIGHUP's handler first
    deadline = time.monotonic() + 15
    while mark.read_text() != "stopping" and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGHUP)
    code, output = _ended(process, 15)
    assert code == 0, output
    assert mark.read_text() == "nothing"


def test_a_worker_that_cannot_start_says_why(settings, tmp_path):
    log = tmp_path / "serve.log"
    process = _serve_workers(2, free_port(), environment(settings, REDIS_URL="nonsense"), log)
    assert process.wait(60) == 1
    assert "ValueError: REDIS_URL 'nonsense' has no scheme" in log.read_text(), log.read_text()


def test_a_metrics_directory_the_operator_names_keeps_all_but_the_samples(tmp_path, monkeypatch):
    shared = tmp_path / "shared"  # where the spool also is, say
    shared.mkdir()
    (shared / "spool-1234.jsonl").write_text('{"money": true}\n')
    (shared / "counter_1234.db").write_bytes(b"stale samples")
    (shared / "gauge_livesum_1234.db").write_bytes(b"stale samples")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))
    assert prepare_metrics() == (shared, False)
    assert [p.name for p in shared.iterdir()] == ["spool-1234.jsonl"]

    missing = tmp_path / "not" / "yet"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(missing))
    assert prepare_metrics() == (missing, False)
    assert missing.is_dir()
