"""Business figures from Postgres: accounts, usage, revenue, cost, profit and the margin model.

Every figure is defined once, here and in the README ("Business figures"). Usage comes from the daily
rollup (``usage_daily``), never from a scan of ``usage_events``; revenue from ``invoices``
(cents); allowance grants from the ledger entries paid invoices made (``inv_<invoice id>``);
sign-ups, tier moves and cancellations from ``tier_changes``. Money stays in integer cents
and micro-dollars; strings with 2 (cents) or 6 (µ$) decimals are added for display.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Protocol

from ..money import cents_to_micro, cents_usd, micro_usd, percent, usd_ratio
from ..tiers import TiersFile
from .periods import Period

TARGET_MARGIN_PCT = Decimal("80.00")
CHURN_KINDS = ("cancel", "lapse")


class Queryable(Protocol):
    """An asyncpg connection or pool."""

    async def fetch(self, query: str, *args: Any) -> list[Any]: ...
    async def fetchrow(self, query: str, *args: Any) -> Any: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...


USAGE_SQL = """
SELECT coalesce(sum(requests), 0)::bigint AS requests,
       coalesce(sum(input_tokens), 0)::bigint AS input_tokens,
       coalesce(sum(output_tokens), 0)::bigint AS output_tokens,
       coalesce(sum(cost_micro), 0)::bigint AS cost_micro,
       coalesce(sum(cost_micro) FILTER (WHERE tier = ANY($3::text[])), 0)::bigint AS paid_cost_micro
FROM usage_daily WHERE day >= $1 AND day < $2
"""
PROVIDERS_SQL = """
SELECT provider, sum(requests)::bigint AS requests, sum(input_tokens + output_tokens)::bigint AS tokens,
       sum(cost_micro)::bigint AS cost_micro
FROM usage_daily WHERE day >= $1 AND day < $2 GROUP BY provider ORDER BY provider
"""
REVENUE_SQL = """
SELECT count(*) AS invoices, coalesce(sum(amount_paid), 0)::bigint AS gross, coalesce(sum(stripe_fee), 0)::bigint AS fees,
       coalesce(sum(refunded), 0)::bigint AS refunded, coalesce(sum(disputed), 0)::bigint AS disputed
FROM invoices WHERE paid_at >= $1 AND paid_at < $2
"""
CHANGES_SQL = """
SELECT count(*) FILTER (WHERE kind = 'signup') AS signups,
       count(*) FILTER (WHERE kind = 'upgrade') AS upgrades,
       count(*) FILTER (WHERE kind = 'downgrade') AS downgrades,
       count(DISTINCT user_id) FILTER (WHERE kind = ANY($3::text[])) AS cancellations
FROM tier_changes WHERE changed_at >= $1 AND changed_at < $2
"""
# A user's tier at $1: the from_tier of their first change at or after $1, else their tier now.
# Only changes after $1 are read (tier_changes_time), plus one pass over users.
PAYING_AT_SQL = """
SELECT count(*) FROM users u
LEFT JOIN (
    SELECT DISTINCT ON (user_id) user_id, from_tier FROM tier_changes
    WHERE changed_at >= $1 ORDER BY user_id, changed_at, id
) later ON later.user_id = u.id
WHERE (CASE WHEN later.user_id IS NULL THEN u.tier ELSE later.from_tier END) = ANY($2::text[])
"""
TIERS_SQL = "SELECT tier, count(*) AS users FROM users GROUP BY tier"
# The allowance each paid invoice put on its account: an upgrade's prorated grant, or the
# cycle a new invoice started (its balance, less what rolled over from the last cycle).
ALLOCATED_SQL = """
SELECT coalesce(sum(CASE
           WHEN l.kind <> 'reset' THEN l.amount_micro
           WHEN i.billing_reason = 'subscription_cycle' AND i.tier = ANY($3::text[]) THEN least(l.balance_micro, l.amount_micro)
           ELSE l.balance_micro END), 0)::bigint
FROM invoices i JOIN ledger l ON l.id = 'inv_' || i.id
WHERE i.paid_at >= $1 AND i.paid_at < $2
"""


def paid_tiers(tiers: TiersFile) -> list[str]:
    """Tiers with a price above zero."""
    return [name for name, tier in tiers.tiers.items() if tier.price_usd > 0]


def rollover_tiers(tiers: TiersFile) -> list[str]:
    """Tiers whose renewals carry unused credits over."""
    return [name for name, tier in tiers.tiers.items() if tier.rollover]


def _tier_rows(tiers: TiersFile, counts: dict[str, int]) -> list[dict[str, Any]]:
    rows = [
        {"tier": name, "price_usd": f"{tier.price_usd:.2f}", "paid": tier.price_usd > 0, "users": counts.get(name, 0)}
        for name, tier in tiers.tiers.items()
    ]
    rows += [
        {"tier": name, "price_usd": None, "paid": None, "users": n}
        for name, n in sorted(counts.items())
        if name not in tiers.tiers
    ]
    return rows


def _provider_rows(rows: list[Any], requests: int, cost: int) -> list[dict[str, Any]]:
    return [
        {
            "provider": r["provider"],
            "requests": r["requests"],
            "tokens": r["tokens"],
            "cost_micro": r["cost_micro"],
            "cost_usd": micro_usd(r["cost_micro"]),
            "request_share_pct": percent(r["requests"], requests),
            "cost_share_pct": percent(r["cost_micro"], cost),
        }
        for r in rows
    ]


async def compute(db: Queryable, period: Period, tiers: TiersFile) -> dict[str, Any]:
    """Every figure for ``period`` (defined in the README, "Business figures")."""
    paid = paid_tiers(tiers)
    span = (period.start_at, period.end_at)
    usage = await db.fetchrow(USAGE_SQL, period.start, period.end, paid)
    providers = await db.fetch(PROVIDERS_SQL, period.start, period.end)
    revenue = await db.fetchrow(REVENUE_SQL, *span)
    changes = await db.fetchrow(CHANGES_SQL, *span, list(CHURN_KINDS))
    paying_start = await db.fetchval(PAYING_AT_SQL, period.start_at, paid)
    paying_end = await db.fetchval(PAYING_AT_SQL, period.end_at, paid)
    tier_counts = {r["tier"]: r["users"] for r in await db.fetch(TIERS_SQL)}
    allocated = await db.fetchval(ALLOCATED_SQL, *span, rollover_tiers(tiers))

    net_cents = revenue["gross"] - revenue["fees"] - revenue["refunded"] - revenue["disputed"]
    net = cents_to_micro(net_cents)
    cost, used = usage["cost_micro"], usage["paid_cost_micro"]
    profit = net - cost
    margin = percent(profit, net)
    return {
        "period": period.as_json(),
        "accounts": {
            "signups": changes["signups"],
            "upgrades": changes["upgrades"],
            "downgrades": changes["downgrades"],
            "cancellations": changes["cancellations"],
            "paying_users_start": paying_start,
            "paying_users_end": paying_end,
        },
        "usage": {
            "requests": usage["requests"],
            "input_tokens": usage["input_tokens"],
            "output_tokens": usage["output_tokens"],
            "tokens": usage["input_tokens"] + usage["output_tokens"],
        },
        "revenue": {
            "invoices": revenue["invoices"],
            "gross_cents": revenue["gross"],
            "stripe_fee_cents": revenue["fees"],
            "refunded_cents": revenue["refunded"],
            "disputed_cents": revenue["disputed"],
            "net_cents": net_cents,
            "gross_usd": cents_usd(revenue["gross"]),
            "net_usd": cents_usd(net_cents),
        },
        "api_cost": {
            "micro": cost,
            "usd": micro_usd(cost),
            "paid_tiers_micro": used,
            "free_tiers_micro": cost - used,
        },
        "profit": {"micro": profit, "usd": micro_usd(profit)},
        "margin": {
            "pct": margin,
            "target_pct": str(TARGET_MARGIN_PCT),
            "vs_target_pct": None if margin is None else str(Decimal(margin) - TARGET_MARGIN_PCT),
        },
        "arpu": {"usd": usd_ratio(net, paying_end), "paying_users": paying_end},
        "churn": {
            "cancellations": changes["cancellations"],
            "paying_users_start": paying_start,
            "rate_pct": percent(changes["cancellations"], paying_start),
        },
        "budget": {
            "allocated_micro": allocated,
            "allocated_usd": micro_usd(allocated),
            "used_micro": used,
            "used_usd": micro_usd(used),
            "unused_micro": allocated - used,
            "unused_usd": micro_usd(allocated - used),
            "used_pct": percent(used, allocated),
        },
        "margin_model": {
            "net_revenue_micro": net,
            "api_budget_micro": allocated,
            "planned_profit_micro": net - allocated,
            "unused_allowance_micro": allocated - used,
            "free_tier_cost_micro": cost - used,
            "profit_micro": profit,
            "net_revenue_usd": micro_usd(net),
            "planned_profit_usd": micro_usd(net - allocated),
            "unused_allowance_usd": micro_usd(allocated - used),
            "free_tier_cost_usd": micro_usd(cost - used),
            "planned_margin_pct": percent(net - allocated, net),
            "actual_margin_pct": margin,
            "target_margin_pct": str(TARGET_MARGIN_PCT),
        },
        "tiers": _tier_rows(tiers, tier_counts),
        "providers": _provider_rows(providers, usage["requests"], cost),
    }


def change(current: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """How the headline figures moved from ``previous`` to ``current``."""

    def delta(section: str, field: str) -> int:
        return int(current[section][field] - previous[section][field])

    margin_now, margin_before = current["margin"]["pct"], previous["margin"]["pct"]
    return {
        "signups": delta("accounts", "signups"),
        "upgrades": delta("accounts", "upgrades"),
        "downgrades": delta("accounts", "downgrades"),
        "requests": delta("usage", "requests"),
        "tokens": delta("usage", "tokens"),
        "net_revenue_cents": delta("revenue", "net_cents"),
        "net_revenue_usd": cents_usd(delta("revenue", "net_cents")),
        "api_cost_micro": delta("api_cost", "micro"),
        "api_cost_usd": micro_usd(delta("api_cost", "micro")),
        "profit_micro": delta("profit", "micro"),
        "profit_usd": micro_usd(delta("profit", "micro")),
        "margin_pct_points": None
        if margin_now is None or margin_before is None
        else str(Decimal(margin_now) - Decimal(margin_before)),
    }


async def report(db: Queryable, period: Period, tiers: TiersFile) -> dict[str, Any]:
    """Figures for ``period`` and the one before it, with the change between them."""
    current = await compute(db, period, tiers)
    previous = await compute(db, period.previous(), tiers)
    return {"current": current, "previous": previous, "change": change(current, previous)}
