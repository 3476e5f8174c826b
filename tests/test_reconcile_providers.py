"""``costproxy reconcile openai|anthropic``: real traffic through the proxy and the usage log
into Postgres, then the providers' own usage and cost reports (local fakes in their
documented shapes, one bucket a page) compared with it: once matching the traffic, once
with a missing day, a model with more output tokens and a cost a cent off."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import anthropic
import asyncpg
import openai
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from proxy.config import load_config
from proxy.metrics import RECONCILE_LAST_RUN, RECONCILE_RATIO
from proxy.money import MICRO_PER_CENT
from proxy.reconcile.access import ReportAccess, ReportProvider
from proxy.reconcile.compare import ALL_MODELS, Books, Comparison, Figures, compare
from proxy.reconcile.daily import LOOKBACK_DAYS, export_ratios, run_daily, settled_days
from proxy.reconcile.pages import ReportError, amount, to_micro
from proxy.reconcile.providers import reconcile_provider
from proxy.reconcile.report import Difference, Reconciliation, UsageKind
from proxy.reconcile.store import RanBy, has_result, latest_results, ratios_of, store
from proxy.settings import Settings
from proxy.usage import UsageLog

from .support.accounts import Customer
from .support.fake_provider_reports import (
    REFUSED,
    SEEN,
    WORKSPACE,
    Report,
    anthropic_report,
    anthropic_reports_app,
    openai_report,
    openai_reports_app,
    planted,
)
from .support.harness import StartProxy
from .support.http import url_of
from .support.mock_anthropic import anthropic_app
from .support.mock_upstreams import Received, openai_app
from .support.processes import environment, free_port

ADMIN_KEY = "admin-key-of-the-operator"
PROJECT, API_KEY_ID = "proj_gateway", "key_gateway"
OPENAI_KINDS = [UsageKind.REQUESTS, UsageKind.INPUT_TOKENS, UsageKind.CACHED_INPUT_TOKENS, UsageKind.OUTPUT_TOKENS]
KINDS_TEXT = "requests, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, cost_micro"
ANTHROPIC_KINDS = [UsageKind.INPUT_TOKENS, UsageKind.CACHED_INPUT_TOKENS, UsageKind.CACHE_WRITE_TOKENS, UsageKind.OUTPUT_TOKENS]


#: pairs of days handed out in this run, from a random start (random draws collided: two
#: tests' identical traffic on one day doubled "ours")
_DAY_PAIRS = itertools.count(uuid.uuid4().int % 1500)


def two_days() -> tuple[date, date]:
    """Two days of the 1990s no other test of the run uses: the usage log is shared, the days are not."""
    first = date(1990, 1, 1) + timedelta(days=next(_DAY_PAIRS) % 1500 * 2)
    return first, first + timedelta(days=1)


def dated(received: list[Received], first: int, days: tuple[date, date]) -> list[tuple[date, Received]]:
    """The mock's requests, the first ``first`` of them on day one and the rest on day two."""
    return [(days[0] if i < first else days[1], sent) for i, sent in enumerate(received)]


def found(result: Reconciliation) -> set[tuple[date | None, str, str, int, int]]:
    return {(d.day, d.subject, str(d.kind), d.ours, d.theirs) for d in result.differences}


def missing_day(report: Report, day: date, kinds: list[UsageKind]) -> set[tuple[date | None, str, str, int, int]]:
    """Each figure of ``day`` that a report without that day misses: ours as the matching report had it, theirs 0."""
    figures = {
        UsageKind.REQUESTS: lambda r: r.requests,
        UsageKind.INPUT_TOKENS: lambda r: r.uncached,
        UsageKind.CACHED_INPUT_TOKENS: lambda r: r.cached,
        UsageKind.CACHE_WRITE_TOKENS: lambda r: r.write_5m + r.write_1h,
        UsageKind.OUTPUT_TOKENS: lambda r: r.output,
        UsageKind.COST_MICRO: lambda r: r.cost_micro,
    }
    return {
        (day, model, str(kind), figures[kind](row), 0)
        for (d, model), row in report.items()
        if d == day
        for kind in [*kinds, UsageKind.COST_MICRO]
        if figures[kind](row)
    }


@dataclass
class Traffic:
    """Real requests through a proxy in front of a mock upstream, written to the usage log and
    dated on two days; each method returns the provider's report of them and the two days."""

    start_proxy: StartProxy
    make_customer: Callable[..., Awaitable[Customer]]
    usage_log: UsageLog
    pool: asyncpg.Pool
    pricing_file: Path

    async def settle(self, user_id: str, day: date) -> None:
        """Write the user's charges to Postgres and date the ones made now on ``day`` (noon UTC)."""
        while await self.usage_log.drain_once():
            pass
        await self.pool.execute(
            "UPDATE usage_events SET created_at = $2 WHERE user_id = $1 AND created_at > now() - interval '1 hour'",
            user_id,
            datetime(day.year, day.month, day.day, 12, tzinfo=UTC),
        )

    async def openai(self) -> tuple[Report, tuple[date, date]]:
        """Chat (streamed and not), Responses and embeddings on two days; OpenAI's report of them."""
        proxy = await self.start_proxy({"openai": openai_app()})
        customer = await self.make_customer("professional")
        client = openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=customer.api_key, max_retries=0)
        days = two_days()
        hello = [{"role": "user", "content": "hi"}]
        await client.chat.completions.create(model="gpt-4o-mini", messages=hello)
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=hello, stream=True, extra_headers={"x-mock-usage": "prompt=2200,cached=1000,completion=500"}
        )
        async for _ in stream:
            pass
        await client.responses.create(
            model="gpt-4o-mini", input="hi", extra_headers={"x-mock-usage": "prompt=3000,cached=0,completion=100"}
        )
        await client.embeddings.create(model="text-embedding-3-small", input="hi", extra_headers={"x-mock-usage": "prompt=1000"})
        await self.settle(customer.user_id, days[0])
        first = len(proxy.received("openai"))
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=hello, extra_headers={"x-mock-usage": "completion=700"}
        )
        await client.chat.completions.create(model="gpt-4o", messages=hello)
        await self.settle(customer.user_id, days[1])
        return openai_report(dated(proxy.received("openai"), first, days), self.pricing_file), days

    async def anthropic(self) -> tuple[Report, tuple[date, date]]:
        """Messages (streamed and not, cache reads and writes of both TTLs) on two days; Anthropic's report of them."""
        proxy = await self.start_proxy({"anthropic": anthropic_app()})
        customer = await self.make_customer("professional")
        client = anthropic.AsyncAnthropic(base_url=f"{proxy.url}/anthropic", api_key=customer.api_key, max_retries=0)
        days = two_days()
        hello = [{"role": "user", "content": "hi"}]
        writes = {"x-mock-usage": "prompt=1000,cached=200,write5m=400,write1h=80,completion=300"}
        await client.messages.create(model="claude-haiku-4-5", max_tokens=500, messages=hello, extra_headers=writes)
        async with client.messages.stream(model="claude-sonnet-4-6", max_tokens=900, messages=hello) as stream:
            await stream.get_final_message()
        await self.settle(customer.user_id, days[0])
        first = len(proxy.received("anthropic"))
        await client.messages.create(model="claude-haiku-4-5", max_tokens=500, messages=hello)
        await self.settle(customer.user_id, days[1])
        return anthropic_report(dated(proxy.received("anthropic"), first, days), self.pricing_file), days


@pytest.fixture
def traffic(start_proxy, make_customer, usage_log, pool, settings) -> Traffic:
    return Traffic(start_proxy, make_customer, usage_log, pool, settings.pricing_file)


def seen(app) -> list[tuple[str, str | None]]:
    """(path, page asked for) of every request a fake received, in order."""
    return [(r.path, dict(r.query).get("page")) for r in app[SEEN]]


def midnight_of(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def midnight(day: date) -> int:
    return int(midnight_of(day).timestamp())


class Clock:
    """A settable UTC clock that counts how often it was read (once per round of the worker)."""

    def __init__(self, at: datetime) -> None:
        self.at, self.reads = at, 0

    def __call__(self) -> datetime:
        self.reads += 1
        return self.at

    async def rounds(self, count: int) -> None:
        """Wait until the worker has finished ``count`` more rounds."""
        until = self.reads + count + 1
        for _ in range(400):
            if self.reads >= until:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"the worker ran {self.reads} rounds, not {until}")


async def test_openai_reports_match_the_traffic_then_each_planted_difference_is_found(traffic, pool, aiohttp_server):
    report, days = await traffic.openai()
    fake = await aiohttp_server(openai_reports_app(report))
    access = ReportAccess(ReportProvider.OPENAI, url_of(fake), ADMIN_KEY, PROJECT, API_KEY_ID)

    clean = await reconcile_provider(access, pool, *days)
    assert clean.differences == () and not clean.exceeds(Decimal(0))
    assert clean.rows == len(report) == 5  # day 1: gpt-4o-mini, gpt-4o, text-embedding-3-small; day 2: the two chat models
    assert list(clean.kinds) == [*OPENAI_KINDS[:3], UsageKind.CACHE_WRITE_TOKENS, UsageKind.OUTPUT_TOKENS, UsageKind.COST_MICRO]
    usage, costs = "/v1/organization/usage/", "/v1/organization/costs"
    assert seen(fake.app) == [  # one bucket a page: every page of every report followed
        (f"{usage}completions", None), (f"{usage}completions", "page_1"),
        (f"{usage}embeddings", None), (f"{usage}embeddings", "page_1"),
        (costs, None), (costs, "page_1"),
    ]  # fmt: skip
    for request in fake.app[SEEN]:
        assert request.headers["Authorization"] == f"Bearer {ADMIN_KEY}"
        assert {("bucket_width", "1d"), ("project_ids", PROJECT)} <= set(request.query)
        assert ("start_time", str(midnight(days[0]))) in request.query
        assert ("end_time", str(midnight(days[1] + timedelta(days=1)))) in request.query
        grouping = ("group_by", "line_item") if request.path == costs else ("group_by", "model")
        assert grouping in request.query
        assert (("api_key_ids", API_KEY_ID) in request.query) == (request.path != costs)  # the Costs API filters no keys

    out, cost = report[(days[0], "gpt-4o")].output, report[(days[0], "gpt-4o-mini")].cost_micro
    changed = planted(report, drop_day=days[1], more_output=(days[0], "gpt-4o", 7), cent_on=(days[0], "gpt-4o-mini"))
    fake = await aiohttp_server(openai_reports_app(changed))
    result = await reconcile_provider(ReportAccess(ReportProvider.OPENAI, url_of(fake), ADMIN_KEY, PROJECT, ""), pool, *days)
    expected = missing_day(report, days[1], OPENAI_KINDS) | {
        (days[0], "gpt-4o", "output_tokens", out, out + 7),
        (days[0], "gpt-4o-mini", "cost_micro", cost, cost + 10_000),  # a cent is 10,000 µ$
    }
    assert len(expected) == 12 and found(result) == expected and len(result.differences) == len(expected)
    assert result.exceeds(Decimal("0.01"))
    output = next(d for d in result.differences if d.kind is UsageKind.OUTPUT_TOKENS and d.day == days[0])
    assert output.share == Fraction(-7, out + 7) and output.to_json()["difference"] == -7


async def test_anthropic_reports_match_the_traffic_then_each_planted_difference_is_found(traffic, pool, aiohttp_server):
    report, days = await traffic.anthropic()
    fake = await aiohttp_server(anthropic_reports_app(report))
    access = ReportAccess(ReportProvider.ANTHROPIC, url_of(fake), ADMIN_KEY, WORKSPACE, API_KEY_ID)

    # the cost report also holds another workspace's $1.50 a day: left out, or this would differ
    clean = await reconcile_provider(access, pool, *days)
    assert clean.differences == () and clean.rows == len(report) == 3
    assert list(clean.kinds) == [*ANTHROPIC_KINDS, UsageKind.COST_MICRO]  # its usage report counts no requests
    assert report[(days[0], "claude-haiku-4-5")].write_5m == 400  # cache writes were compared, not zero on both sides
    usage, costs = "/v1/organizations/usage_report/messages", "/v1/organizations/cost_report"
    assert seen(fake.app) == [(usage, None), (usage, "page_1"), (costs, None), (costs, "page_1")]
    for request in fake.app[SEEN]:
        assert request.headers["x-api-key"] == ADMIN_KEY and request.headers["anthropic-version"] == "2023-06-01"
        assert ("starting_at", f"{days[0].isoformat()}T00:00:00Z") in request.query
        assert ("ending_at", f"{(days[1] + timedelta(days=1)).isoformat()}T00:00:00Z") in request.query
        assert ("bucket_width", "1d") in request.query
    assert {("group_by[]", "model"), ("workspace_ids[]", WORKSPACE), ("api_key_ids[]", API_KEY_ID)} <= set(
        fake.app[SEEN][0].query
    )
    assert {("group_by[]", "description"), ("group_by[]", "workspace_id")} <= set(fake.app[SEEN][2].query)

    out, cost = report[(days[0], "claude-sonnet-4-6")].output, report[(days[0], "claude-haiku-4-5")].cost_micro
    changed = planted(
        report, drop_day=days[1], more_output=(days[0], "claude-sonnet-4-6", 7), cent_on=(days[0], "claude-haiku-4-5")
    )
    fake = await aiohttp_server(anthropic_reports_app(changed))
    result = await reconcile_provider(ReportAccess(ReportProvider.ANTHROPIC, url_of(fake), ADMIN_KEY, WORKSPACE, ""), pool, *days)
    expected = missing_day(report, days[1], ANTHROPIC_KINDS) | {
        (days[0], "claude-sonnet-4-6", "output_tokens", out, out + 7),
        (days[0], "claude-haiku-4-5", "cost_micro", cost, cost + 10_000),
    }
    assert len(expected) == 6 and found(result) == expected and len(result.differences) == len(expected)


async def reconcile_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.cli", "reconcile", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_exit_codes_and_json(traffic, pool, settings, aiohttp_server):
    report, days = await traffic.openai()
    clean = await aiohttp_server(openai_reports_app(report))
    changed = planted(report, drop_day=days[1], more_output=(days[0], "gpt-4o", 7), cent_on=(days[0], "gpt-4o-mini"))
    differing = await aiohttp_server(openai_reports_app(changed))
    env = environment(settings, OPENAI_ADMIN_KEY=ADMIN_KEY, PATH="")
    period = ("--from", days[0].isoformat(), "--to", days[1].isoformat())
    ok, bad, no_key, backwards, not_a_date, unreachable, far = await asyncio.gather(
        reconcile_cli("openai", *period, "--json", env={**env, "OPENAI_UPSTREAM_URL": url_of(clean)}),
        reconcile_cli("openai", *period, env={**env, "OPENAI_UPSTREAM_URL": url_of(differing)}),
        reconcile_cli("anthropic", *period, env=env),
        reconcile_cli("openai", "--from", days[1].isoformat(), "--to", days[0].isoformat(), env=env),
        reconcile_cli("openai", "--from", "1990-02-30", "--to", days[0].isoformat(), env=env),
        reconcile_cli("openai", *period, env={**env, "OPENAI_UPSTREAM_URL": "http://127.0.0.1:9"}),
        reconcile_cli("openai", "--from", days[0].isoformat(), "--to", "9999-12-31", env=env),  # overflowed once
    )
    assert ok[0] == 0, ok[2]
    shown = json.loads(ok[1])
    assert shown["differences"] == [] and shown["exceeds"] is False and shown["tolerance"] == "0.01"
    assert (shown["source"], shown["from"], shown["to"], shown["rows"]) == ("openai", *map(date.isoformat, days), 5)
    assert bad[0] == 1, bad[2]
    lines = bad[1].splitlines()
    assert lines[0] == f"openai {days[0]}..{days[1]}: 5 rows compared ({KINDS_TEXT}); 12 differences"
    assert f"{days[0]}  gpt-4o  output_tokens: ours {report[(days[0], 'gpt-4o')].output}" in bad[1]
    assert f"{days[1]}  gpt-4o-mini  requests: ours 1, theirs 0, difference +1 (not in their report)" in lines
    assert no_key == (2, "", "error: ANTHROPIC_ADMIN_KEY is not set: the provider's reports need an admin key\n")
    assert backwards[0] == 2 and backwards[2].count("\n") == 1 and "to must not be before from" in backwards[2]
    assert not_a_date[0] == 2 and "got '1990-02-30'" in not_a_date[2]
    assert far[0] == 2 and "from 1900-01-01 to 2999-12-31, got '9999-12-31'" in far[2] and "Traceback" not in far[2]
    assert unreachable[0] == 2 and unreachable[1] == "" and unreachable[2].count("\n") == 1
    assert unreachable[2].startswith("error: http://127.0.0.1:9/v1/organization/usage/completions: ")


def gauge(kind: str) -> float | None:
    return REGISTRY.get_sample_value("costproxy_reconcile_difference_ratio", {"provider": "openai", "kind": kind})


async def test_worker_reconciles_the_day_once_stores_it_and_sets_the_gauge(traffic, pool, settings, aiohttp_server):
    report, days = await traffic.openai()
    changed = planted(report, drop_day=days[1], more_output=(days[0], "gpt-4o", 7), cent_on=(days[0], "gpt-4o-mini"))
    fake = await aiohttp_server(openai_reports_app(changed))
    live = replace(settings, openai_admin_key=ADMIN_KEY, upstream_urls={"openai": url_of(fake)})
    stop = asyncio.Event()
    prices = load_config(settings.pricing_file, settings.tiers_file).prices
    settled = Clock(midnight_of(days[1]) + timedelta(hours=24))  # days[0] has just settled, days[1] has not
    workers = [  # two workers side by side: one of them runs the day
        asyncio.create_task(run_daily(live, pool, lambda: prices, stop, every=0.05, now=settled, lookback=1)) for _ in range(2)
    ]
    for _ in range(200):
        if await has_result(pool, "openai", days[0]):
            break
        await asyncio.sleep(0.05)
    await settled.rounds(6)  # several more rounds (of the two workers): the stored day is not run again
    stop.set()
    await asyncio.wait_for(asyncio.gather(*workers), 5)

    runs = await pool.fetchval("SELECT count(*) FROM reconcile_runs WHERE source = 'openai' AND period_start = $1", days[0])
    assert runs == 1 and len(fake.app[SEEN]) == 3  # completions, embeddings, costs: one page each for one day
    last = (await latest_results(pool))["openai"]
    out, cost = report[(days[0], "gpt-4o")].output, report[(days[0], "gpt-4o-mini")].cost_micro
    assert (last["from"], last["to"], last["exceeds"], last["tolerance"]) == (
        days[0].isoformat(),
        days[0].isoformat(),
        True,
        "0.01",
    )
    assert {(d["subject"], d["kind"], d["ours"], d["theirs"]) for d in last["differences"]} == {
        ("gpt-4o", "output_tokens", out, out + 7),
        ("gpt-4o-mini", "cost_micro", cost, cost + 10_000),
    }
    # the shares' magnitudes, as stored: six decimals
    assert (gauge("output_tokens"), gauge("cost_micro")) == (round(7 / (out + 7), 6), round(10_000 / (cost + 10_000), 6))
    assert gauge("requests") == 0 and gauge("input_tokens") == 0
    assert REGISTRY.get_sample_value("costproxy_reconcile_tolerance_ratio") == 0.01
    ran_at = REGISTRY.get_sample_value("costproxy_reconcile_last_run_timestamp_seconds", {"provider": "openai"})
    assert ran_at is not None and abs(ran_at - datetime.now(UTC).timestamp()) < 60  # the stale-run alert reads it

    # a later `costproxy reconcile` of the same day: the dashboard's last result, not the worker's gauge
    theirs_only = Difference(days[0], "gpt-4o", UsageKind.OUTPUT_TOKENS, ours=5, theirs=0)
    cli_run = Reconciliation("openai", days[0], days[0], 1, (UsageKind.OUTPUT_TOKENS,), (theirs_only,))
    await store(pool, cli_run, Decimal("0.01"), RanBy.CLI)
    assert (await latest_results(pool))["openai"]["ratios"] == {"output_tokens": None}
    RECONCILE_RATIO.labels(provider="openai", kind="output_tokens").set(-1)
    RECONCILE_LAST_RUN.labels(provider="openai").set(0)
    restarted = asyncio.Event()
    restarted.set()  # a worker that starts and stops at once still exports the worker's stored result
    await run_daily(live, pool, lambda: prices, restarted, now=settled, lookback=1)
    assert gauge("output_tokens") == round(7 / (out + 7), 6)
    restored = REGISTRY.get_sample_value("costproxy_reconcile_last_run_timestamp_seconds", {"provider": "openai"})
    assert restored == pytest.approx(ran_at, abs=5)  # the stored run's time


def test_a_day_whose_cost_lines_name_no_model_is_compared_as_a_whole():
    day = date(1990, 1, 1)
    ours, theirs = Books(), Books()
    for books in (ours, theirs):
        books.add_usage(day, "gpt-4o-mini", Figures(requests=2, input_tokens=100, output_tokens=30))
    ours.add_cost(day, "gpt-4o-mini", 300)
    ours.add_cost(day, "gpt-4o", 700)
    theirs.add_cost(day, "gpt-4o-mini-2024-07-18", 250)  # a snapshot of the same model
    theirs.add_cost(day, None, 800)  # e.g. OpenAI's "Image models" line, or an Anthropic web search
    result = compare(Comparison("openai", day, day, (UsageKind.REQUESTS,)), ours, theirs)
    assert found(result) == {(day, ALL_MODELS, "cost_micro", 1000, 1050)}
    assert result.rows == 2 and result.differences[0].share == Fraction(-50, 1050)


def test_a_share_beyond_the_tolerance_fails_and_a_figure_they_lack_always_does():
    day = date(1990, 1, 1)
    at_tolerance = Difference(day, "gpt-4o", UsageKind.OUTPUT_TOKENS, ours=101, theirs=100)
    assert not at_tolerance.exceeds(Decimal("0.01")) and at_tolerance.exceeds(Decimal("0.0099"))
    missing = Difference(day, "gpt-4o", UsageKind.REQUESTS, ours=1, theirs=0)
    assert missing.share is None and missing.exceeds(Decimal(1000))
    assert missing.to_json() == {
        "day": "1990-01-01", "subject": "gpt-4o", "kind": "requests", "ours": 1, "theirs": 0, "difference": 1, "share": None,
    }  # fmt: skip
    assert Difference(day, "gpt-4o", UsageKind.COST_MICRO, ours=2, theirs=3).to_json()["share"] == "-0.333333"
    report = Reconciliation("openai", day, day, 1, (UsageKind.REQUESTS, UsageKind.OUTPUT_TOKENS), (at_tolerance, missing))
    assert report.largest_shares() == {"requests": None, "output_tokens": Fraction(1, 100)}
    assert ratios_of(report) == {"requests": None, "output_tokens": "0.010000"}
    export_ratios("test-provider", ratios_of(report))
    ratio = "costproxy_reconcile_difference_ratio"
    assert REGISTRY.get_sample_value(ratio, {"provider": "test-provider", "kind": "requests"}) == math.inf
    assert REGISTRY.get_sample_value(ratio, {"provider": "test-provider", "kind": "output_tokens"}) == 0.01
    assert report.render().splitlines()[1:] == [
        "1990-01-01  gpt-4o  output_tokens: ours 101, theirs 100, difference +1 (+1.00%)",
        "1990-01-01  gpt-4o  requests: ours 1, theirs 0, difference +1 (not in their report)",
    ]


def test_settings_read_the_admin_keys_scopes_and_tolerance():
    env = {
        "OPENAI_ADMIN_KEY": "sk-admin-o", "ANTHROPIC_ADMIN_KEY": "sk-ant-admin-a",
        "OPENAI_RECONCILE_PROJECT_ID": "proj_1", "OPENAI_RECONCILE_API_KEY_ID": "key_1",
        "ANTHROPIC_RECONCILE_WORKSPACE_ID": "wrkspc_1", "ANTHROPIC_RECONCILE_API_KEY_ID": "apikey_1",
        "RECONCILE_TOLERANCE": "0.005",
    }  # fmt: skip
    settings = Settings.from_env(env)
    assert (settings.openai_admin_key, settings.anthropic_admin_key) == ("sk-admin-o", "sk-ant-admin-a")
    assert (settings.openai_reconcile_project_id, settings.openai_reconcile_api_key_id) == ("proj_1", "key_1")
    assert (settings.anthropic_reconcile_workspace_id, settings.anthropic_reconcile_api_key_id) == ("wrkspc_1", "apikey_1")
    assert settings.reconcile_tolerance == Decimal("0.005") and settings.provider_keys == {}  # no admin key is an upstream key
    assert Settings.from_env({}).reconcile_tolerance == Decimal("0.01")
    for bad in ("1%", "-0.1", "NaN"):
        with pytest.raises(SystemExit, match="RECONCILE_TOLERANCE"):
            Settings.from_env({"RECONCILE_TOLERANCE": bad})


def worker_runs(pool: asyncpg.Pool, day: date) -> Awaitable[list[asyncpg.Record]]:
    return pool.fetch(
        "SELECT exceeds, report FROM reconcile_runs WHERE source = 'openai' AND ran_by = 'worker'"
        " AND period_start = $1 AND period_end = $1",
        day,
    )


def asked_for(app, day: date) -> int:
    """How many report requests asked for ``day`` alone."""
    return sum(1 for r in app[SEEN] if ("start_time", str(midnight(day))) in r.query)


async def test_the_worker_waits_for_a_day_to_settle_and_retries_a_failed_one_after_midnight(
    traffic, pool, settings, aiohttp_server
):
    report, days = await traffic.openai()
    fake = await aiohttp_server(openai_reports_app(report))  # the final report: both days match the usage log
    live = replace(settings, openai_admin_key=ADMIN_KEY, upstream_urls={"openai": url_of(fake)})
    prices = load_config(settings.pricing_file, settings.tiers_file).prices
    # `costproxy reconcile` runs of days[1], alone and with days[0], before they settled: they are not the worker's
    for start in days:
        early = Reconciliation("openai", start, days[1], 0, (UsageKind.REQUESTS,), ())
        await store(pool, early, Decimal("0.01"), RanBy.CLI)
    assert not await has_result(pool, "openai", days[1])

    now = Clock(midnight_of(days[1]) + timedelta(minutes=5))  # just after days[0] ended: its report is partial
    stop = asyncio.Event()
    worker = asyncio.create_task(run_daily(live, pool, lambda: prices, stop, every=0.01, now=now, lookback=2))
    try:
        await now.rounds(3)
        assert asked_for(fake.app, days[0]) == 0 and not await worker_runs(pool, days[0])

        fake.app[REFUSED].add(days[0])  # the provider's report of days[0] is unavailable when it settles
        now.at = midnight_of(days[1]) + timedelta(hours=settings.reconcile_settle_hours)
        await now.rounds(3)
        assert asked_for(fake.app, days[0]) >= 3 and not await worker_runs(pool, days[0])  # retried every round

        now.at = midnight_of(days[1] + timedelta(days=1)) + timedelta(hours=24)  # the next midnight: days[1] settles
        await now.rounds(3)
        assert len(await worker_runs(pool, days[1])) == 1 and not await worker_runs(pool, days[0])

        fake.app[REFUSED].clear()  # days[0] is still within the lookback: retried, and stored once it can be read
        await now.rounds(3)
    finally:
        stop.set()
        await asyncio.wait_for(worker, 5)
    for day in days:
        (run,) = await worker_runs(pool, day)
        assert run["exceeds"] is False and json.loads(run["report"])["rows"] == len([d for d, _ in report if d == day])
    assert asked_for(fake.app, days[1]) == 3  # completions, embeddings, costs once: a stored day is not run again


def test_a_day_settles_a_day_after_its_end_and_the_worker_looks_back_a_week():
    settle = timedelta(hours=24)
    week = [date(2026, 11, 26) + timedelta(days=n) for n in range(7)]
    assert LOOKBACK_DAYS == 7
    assert settled_days(datetime(2026, 12, 4, 0, 5, tzinfo=UTC), settle) == week  # not 12-03, which has just ended
    assert settled_days(datetime(2026, 12, 4, 23, 59, 59, tzinfo=UTC), settle)[-1] == date(2026, 12, 2)
    assert settled_days(datetime(2026, 12, 5, tzinfo=UTC), settle)[-1] == date(2026, 12, 3)  # 12-03 ended 24 h ago
    assert settled_days(datetime(2026, 12, 5, 6, tzinfo=UTC), timedelta(hours=30), 2) == [date(2026, 12, 2), date(2026, 12, 3)]
    assert Settings.from_env({}).reconcile_settle_hours == 24
    assert Settings.from_env({"RECONCILE_SETTLE_HOURS": "36"}).reconcile_settle_hours == 36
    for bad in ("-1", "NaN", "a day"):
        with pytest.raises(SystemExit, match="RECONCILE_SETTLE_HOURS"):
            Settings.from_env({"RECONCILE_SETTLE_HOURS": bad})


def _hostile_openai_app(usage: object, costs: object, pages: Callable[[int], dict] | None = None) -> web.Application:
    """OpenAI's report endpoints answering ``usage`` results and ``costs`` results in one
    bucket of 2026-12-01, or every page from ``pages(n)`` when given."""
    start = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp())
    asked = 0

    async def report(request: web.Request) -> web.Response:
        nonlocal asked
        asked += 1
        if pages is not None:
            return web.json_response(pages(asked))
        results = costs if request.path.endswith("/costs") else usage
        return web.json_response({"data": [{"start_time": start, "results": results}], "has_more": False})

    app = web.Application()
    app.router.add_get("/v1/organization/{report:.*}", report)
    return app


@pytest.mark.parametrize(
    ("usage", "costs"),
    [
        ([5], []),  # a result that is not an object
        ([{"model": "gpt-4o", "output_tokens": 1.5}], []),  # a fraction of a token
        ([{"model": "gpt-4o", "output_tokens": -3}], []),
        ([{"model": "gpt-4o", "output_tokens": "12"}], []),
        ([{"model": "gpt-4o", "input_tokens": 10, "input_cached_tokens": 50}], []),  # more cached than input
        ([], [{"line_item": "gpt-4o, input", "amount": 5}]),  # an amount that is not an object
        ([], [{"line_item": "gpt-4o, input", "amount": {"value": "NaN", "currency": "usd"}}]),
        ([], [{"line_item": "gpt-4o, input", "amount": {"value": "a lot", "currency": "usd"}}]),
        ([], [{"line_item": "gpt-4o, input", "amount": {"value": True, "currency": "usd"}}]),
    ],
)
async def test_a_report_with_broken_figures_is_a_report_error(pool, aiohttp_server, usage, costs):
    """Whatever a report holds, reconcile raises ReportError (exit 2, and the worker retries
    the day next round), never another exception that would end the worker."""
    fake = await aiohttp_server(_hostile_openai_app(usage, costs))
    access = ReportAccess(ReportProvider.OPENAI, url_of(fake), ADMIN_KEY, "", "")
    with pytest.raises(ReportError):
        await reconcile_provider(access, pool, date(2026, 12, 1), date(2026, 12, 1))


@pytest.mark.parametrize("token", [lambda n: "same", lambda n: f"page-{n}"])  # a page comes round again; pages never end
async def test_a_report_whose_pages_never_end_is_a_report_error(pool, aiohttp_server, token):
    fake = await aiohttp_server(_hostile_openai_app([], [], lambda n: {"data": [], "has_more": True, "next_page": token(n)}))
    access = ReportAccess(ReportProvider.OPENAI, url_of(fake), ADMIN_KEY, "", "")
    with pytest.raises(ReportError, match="pages do not end"):
        await reconcile_provider(access, pool, date(2026, 12, 1), date(2026, 12, 1))


def test_report_amounts_are_exact_and_rounded_half_up_once():
    tiny = "0.0000004" + "9" * 30  # 0.49999… µ$: a 28-digit Decimal context would round it up to 1
    assert to_micro(amount(tiny, "x")) == 0
    assert to_micro(amount("0.0000005", "x")) == 1 and to_micro(amount(Decimal("12.3456785"), "x")) == 12_345_679
    assert to_micro(amount("123.45", "x"), MICRO_PER_CENT) == 1_234_500  # Anthropic's cents


async def test_cli_runs_are_stored_and_a_broken_config_or_postgres_is_one_line_exit_2(
    traffic, pool, settings, aiohttp_server, tmp_path
):
    report, days = await traffic.openai()
    fake = await aiohttp_server(openai_reports_app(report))
    env = environment(settings, OPENAI_ADMIN_KEY=ADMIN_KEY, OPENAI_UPSTREAM_URL=url_of(fake), PATH="")
    period = ("--from", days[0].isoformat(), "--to", days[1].isoformat())
    status, _, err = await reconcile_cli("openai", *period, env=env)
    assert status == 0, err
    last = (await latest_results(pool))["openai"]  # what the dashboard shows
    assert (last["from"], last["to"], last["rows"], last["exceeds"], last["tolerance"]) == (
        days[0].isoformat(), days[1].isoformat(), 5, False, "0.01",
    )  # fmt: skip
    ran_by = await pool.fetchval("SELECT ran_by FROM reconcile_runs WHERE source = 'openai' ORDER BY id DESC LIMIT 1")
    assert ran_by == "cli" and not await has_result(pool, "openai", days[0])  # not the worker's run of days[0]
    status, _, err = await reconcile_cli("openai", "--from", days[1].isoformat(), "--to", days[1].isoformat(), env=env)
    assert status == 0 and not await has_result(pool, "openai", days[1])  # nor of days[1], run alone

    invalid = tmp_path / "broken-pricing.yaml"  # not the pricing file of the test's settings
    invalid.write_text("providers:\n  openai:\n    models: 5\n  anthropic: 3\n")
    port = free_port()
    no_server = f"postgresql://costproxy:secret@127.0.0.1:{port}/costproxy"
    parts = urlsplit(settings.database_url)
    no_role = urlunsplit(parts._replace(netloc="costproxy_no_such_role@" + parts.netloc.rpartition("@")[2]))
    stored = await pool.fetchval("SELECT count(*) FROM reconcile_runs")
    config, unreachable, refused, stripe_unreachable = await asyncio.gather(
        reconcile_cli("openai", *period, env={**env, "PRICING_FILE": str(invalid)}),
        reconcile_cli("openai", *period, env={**env, "DATABASE_URL": no_server}),
        reconcile_cli("anthropic", *period, env={**env, "DATABASE_URL": no_role, "ANTHROPIC_ADMIN_KEY": ADMIN_KEY}),
        reconcile_cli("stripe", *period, env={**env, "DATABASE_URL": no_server, "STRIPE_API_KEY": "sk_test_x"}),
    )
    for status, out, err in (config, unreachable, refused, stripe_unreachable):
        assert (status, out) == (2, ""), err
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err and "secret" not in err, err
    assert config[2] == (
        f"error: {invalid}: providers.openai.models: Input should be a valid dictionary (got 5)"
        " (and 1 more: see costproxy config check)\n"
    )
    assert unreachable[2].startswith(f"error: cannot connect to PostgreSQL at 127.0.0.1:{port}: ")
    assert stripe_unreachable[2] == unreachable[2]
    assert refused[2] == 'error: PostgreSQL: role "costproxy_no_such_role" does not exist\n'
    assert await pool.fetchval("SELECT count(*) FROM reconcile_runs") == stored
