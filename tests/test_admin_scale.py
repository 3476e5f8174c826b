"""A million usage rows: every dashboard query reads indexes or the daily rollup, never a
full scan of usage_events or the ledger (checked with EXPLAIN, not with timings). Also:
the rollup writer counts a replayed batch once and agrees with a rebuild."""

from __future__ import annotations

import json
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from proxy.accounts import Accounts
from proxy.config import load_config
from proxy.keys import KeyMirror
from proxy.ledger import LedgerEntry, UsageEvent, decode_entry
from proxy.reports import figures, usage_query
from proxy.reports.periods import day_of, month_of, utc_today
from proxy.rollup import refresh_rollup, write_usage
from proxy.usage import usage_row

from .support.admin import Recorder
from .support.money import ALLOWANCE
from .support.servers import fresh_database

ROWS = 1_000_000
USERS = 200
DAYS = 90

SEED = f"""
INSERT INTO users (id, email, tier, created_at)
SELECT 'u' || g, 'user' || g || '@example.com', (ARRAY['free', 'starter', 'professional', 'enterprise'])[g % 4 + 1],
       now() - interval '100 days'
FROM generate_series(0, {USERS - 1}) g;
INSERT INTO tier_changes (user_id, from_tier, to_tier, kind, source, changed_at)
SELECT id, NULL, tier, 'signup', 'seed', created_at FROM users;
-- Bulk load as a restore would: keys and indexes are dropped and built again afterwards
-- from their own definitions, and the foreign key (every usage row has its ledger entry)
-- comes back NOT VALID instead of being checked row by row.
ALTER TABLE usage_events DROP CONSTRAINT usage_events_id_fkey;
CREATE TEMP TABLE saved_indexes AS
SELECT indexname, indexdef FROM pg_indexes WHERE tablename IN ('ledger', 'usage_events') AND indexname NOT LIKE '%pkey';
CREATE TEMP TABLE saved_keys AS
SELECT conrelid::regclass::text AS tab, conname, pg_get_constraintdef(oid) AS def FROM pg_constraint
WHERE contype = 'p' AND conrelid IN ('ledger'::regclass, 'usage_events'::regclass);
DO $$ DECLARE r record; BEGIN
  FOR r IN SELECT indexname FROM saved_indexes LOOP EXECUTE format('DROP INDEX %I', r.indexname); END LOOP;
  FOR r IN SELECT * FROM saved_keys LOOP EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', r.tab, r.conname); END LOOP;
END $$;
CREATE TEMP TABLE seed AS
SELECT g, 'chg_' || g AS id, 'u' || (g % {USERS}) AS user_id, g % 5000 AS cost,
       now() - (g % ({DAYS} * 1440)) * interval '1 minute' AS at
FROM generate_series(1, {ROWS}) g;
INSERT INTO ledger (id, user_id, kind, amount_micro, balance_micro, created_at)
SELECT id, user_id, 'charge', -cost, 0, at FROM seed;
INSERT INTO usage_events (id, user_id, key_id, provider, model, tier, input_tokens, cached_input_tokens, cache_write_tokens,
    output_tokens, reasoning_tokens, cost_micro, estimated, stream, status, latency_ms, created_at)
SELECT id, user_id, 'key_' || user_id, (ARRAY['openai', 'anthropic', 'google'])[g % 3 + 1],
       (ARRAY['gpt-4o-mini', 'gpt-4o', 'claude-sonnet-4', 'gemini-2.5-pro'])[g % 4 + 1],
       (ARRAY['free', 'starter', 'professional', 'enterprise'])[(g % {USERS}) % 4 + 1],
       1000, 100, 0, 200, 0, cost, false, false, 200, 300, at
FROM seed;
DO $$ DECLARE r record; BEGIN
  FOR r IN SELECT * FROM saved_keys LOOP EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I %s', r.tab, r.conname, r.def); END LOOP;
  FOR r IN SELECT indexdef FROM saved_indexes LOOP EXECUTE r.indexdef; END LOOP;
END $$;
ALTER TABLE usage_events ADD CONSTRAINT usage_events_id_fkey FOREIGN KEY (id) REFERENCES ledger (id) NOT VALID;
INSERT INTO invoices (id, user_id, billing_reason, tier, currency, amount_paid, stripe_fee, paid_at)
SELECT 'in_' || u.id || '_' || m, u.id, 'subscription_cycle', u.tier, 'usd', 1900, 85, now() - m * interval '30 days'
FROM users u, generate_series(0, 2) m WHERE u.tier <> 'free';
INSERT INTO ledger (id, user_id, kind, amount_micro, balance_micro, created_at)
SELECT 'inv_' || id, user_id, 'reset', {ALLOWANCE["starter"]}, {ALLOWANCE["starter"]}, paid_at FROM invoices;
"""


async def seed(conn: asyncpg.Connection) -> None:
    started = time.perf_counter()
    await conn.execute("SET work_mem = '128MB'; SET maintenance_work_mem = '256MB'")  # this session only
    await conn.execute(SEED)
    await refresh_rollup(conn, utc_today() - timedelta(days=DAYS + 1))
    await conn.execute("ANALYZE")
    print(f"seeded {ROWS:,} usage rows in {time.perf_counter() - started:.1f} s")


@pytest.fixture(scope="module")
def million_db(servers: tuple[str, str]):
    with fresh_database(servers[1], seed) as url:
        yield url


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes += plan_nodes(child)
    return nodes


async def explain(conn: asyncpg.Connection, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
    raw = await conn.fetchval("EXPLAIN (FORMAT JSON) " + sql, *args)
    return plan_nodes(json.loads(raw)[0]["Plan"])


def full_scans(nodes: list[dict[str, Any]]) -> set[str]:
    return {n["Relation Name"] for n in nodes if n["Node Type"] == "Seq Scan"}


async def test_dashboard_queries_use_indexes_and_the_rollup(million_db, settings, ledger, redis):
    conn = await asyncpg.connect(million_db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM usage_events") == ROWS
        # the rollup holds the same totals in far fewer rows
        totals = "SELECT count(*), sum(requests), sum(cost_micro) FROM usage_daily"
        rollup_rows, rollup_requests, rollup_cost = await conn.fetchrow(totals)
        assert rollup_requests == ROWS and rollup_cost == await conn.fetchval("SELECT sum(cost_micro) FROM usage_events")
        assert rollup_rows < ROWS / 10

        tiers = load_config(settings.pricing_file, settings.tiers_file).tiers
        recorder = Recorder(conn)
        today = utc_today()
        started = time.perf_counter()
        today_report = await figures.report(recorder, day_of(today), tiers)
        month_report = await figures.report(recorder, month_of(today), tiers)
        await usage_query.run(recorder, usage_query.parse({"group": "day", "from": str(month_of(today).start), "to": str(today)}))
        await usage_query.run(recorder, usage_query.parse({"group": "day,model", "user": "u7"}))
        last_30_days = {"group": "day", "key": "key_u7", "from": str(today - timedelta(days=29))}
        await usage_query.run(recorder, usage_query.parse(last_30_days))
        service = Accounts(
            recorder, ledger, KeyMirror(redis, settings.redis_prefix), load_config(settings.pricing_file, settings.tiers_file)
        )
        await service.list_users("user1", 50, 0)
        await service.show("u7", 100)
        print(f"dashboard queries over {ROWS:,} rows took {time.perf_counter() - started:.3f} s")
        assert today_report["current"]["usage"]["requests"] > 0 and month_report["current"]["usage"]["requests"] > 0

        assert len(recorder.queries) > 20
        for sql, args in recorder.queries:
            nodes = await explain(conn, sql, args)
            scanned = full_scans(nodes)
            assert not scanned & {"usage_events", "ledger"}, (sql, scanned)

        # one day of ninety is read through the rollup's primary key, not a scan of it
        nodes = await explain(conn, figures.USAGE_SQL, (today, today + timedelta(days=1), ["starter"]))
        daily = [n for n in nodes if n.get("Relation Name") == "usage_daily"]
        assert daily and all(n["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan") for n in daily), daily
    finally:
        await conn.close()


@pytest.fixture
def empty_db(servers: tuple[str, str]):
    with fresh_database(servers[1]) as url:
        yield url


async def test_rollup_counts_a_replayed_batch_once_and_matches_a_rebuild(empty_db):
    def row(n: int, at: datetime, cost: int) -> tuple[Any, ...]:
        """A usage row as the usage log makes it from a charge on the ledger stream."""
        usage = UsageEvent(
            key_id="key_ur",
            provider="openai",
            model="gpt-4o",
            tier="starter",
            input_tokens=100,
            cached_input_tokens=10,
            cache_write_tokens=5,
            output_tokens=50,
            reasoning_tokens=0,
            estimated=False,
            stream=True,
            status=200,
            latency_ms=90,
        )
        fields = {
            "kind": "charge",
            "id": f"chg_r{n}",
            "user": "ur",
            "amount": str(-cost),
            "balance": "0",
            "ts": str(int(at.timestamp() * 1000)),
            "hold": f"hold_r{n}",
            "e": usage.encode().decode(),
        }
        entry = decode_entry(fields, f"{n}-0")
        assert isinstance(entry, LedgerEntry)
        made = usage_row(entry)
        assert made is not None
        return made

    columns = "SELECT day, requests, input_tokens, cached_input_tokens, output_tokens, cost_micro FROM usage_daily ORDER BY day"
    conn = await asyncpg.connect(empty_db)
    try:
        day = datetime(2024, 5, 1, 23, 59, 59, tzinfo=UTC)
        rows = [row(1, day, 100), row(2, day, 200), row(3, day + timedelta(seconds=1), 400)]
        for r in rows:
            await conn.execute(
                "INSERT INTO ledger (id, user_id, kind, amount_micro, balance_micro, created_at)"
                " VALUES ($1, 'ur', 'charge', $2, 0, $3)",
                r[0],
                -r[11],
                r[16],
            )
        async with conn.transaction():
            await write_usage(conn, rows[:2])
        async with conn.transaction():
            await write_usage(conn, rows)  # the first two again: a replay after a lost acknowledgement
        await write_usage(conn, [])
        written = [tuple(r) for r in await conn.fetch(columns)]
        # input tokens count cached tokens and cache writes: 100 + 10 + 5 per request
        assert written == [(date(2024, 5, 1), 2, 230, 20, 100, 300), (date(2024, 5, 2), 1, 115, 10, 50, 400)]
        assert await conn.fetchval("SELECT count(*) FROM usage_events") == 3

        await conn.execute("UPDATE usage_daily SET cost_micro = 0")  # damage it, then rebuild
        assert await refresh_rollup(conn, date(2024, 5, 1)) == 2
        assert [tuple(r) for r in await conn.fetch(columns)] == written
    finally:
        await conn.close()
