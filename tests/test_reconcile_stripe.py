"""Stripe reconciliation against revenue records written by the real webhook listener.

Billing events signed with the ``stripe`` package go through the listener into a database
of the test's own; the fake Stripe then lists the same invoices, refunds and balance
transactions (two per page), once matching and once with planted differences.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from fractions import Fraction

import pytest

from proxy.money import round_half_up
from proxy.reconcile.report import Difference
from proxy.reconcile.store import latest_results
from proxy.reconcile.stripe import StripeKind, reconcile_stripe

from .support import ROOT
from .support.fake_stripe import (
    CALLS,
    DAY,
    FakeState,
    charge_id,
    charge_transaction,
    checkout_completed,
    dispute,
    dispute_transaction,
    event,
    invoice,
    line,
    payment_intent_id,
    payout_transaction,
    refund,
    with_fake_stripe,
)
from .support.processes import environment
from .support.servers import fresh_database

STARTER, PRO = "price_starter_monthly", "price_professional_monthly"
MONTH = 30 * DAY
NOW = int(time.time())
T0 = NOW - 20 * DAY  # the first subscriptions, 20 days ago
START, END = datetime.fromtimestamp(T0, UTC).date(), datetime.fromtimestamp(NOW, UTC).date()
FEES = {"subscription_create": 85, "subscription_update": 174}  # Stripe's fee on each invoice, cents


def day(ts: int) -> date:
    return datetime.fromtimestamp(ts, UTC).date()


@pytest.fixture
def own_database(servers):
    """Revenue records are global: the test's figures must not see other tests' invoices."""
    with fresh_database(servers[1]) as url:
        yield url


@pytest.fixture
def settings(settings, fake_stripe, own_database):
    return replace(with_fake_stripe(settings, fake_stripe), database_url=own_database)


@dataclass
class Billed:
    """What the listener recorded; the Stripe objects are what the fake will list."""

    first: dict  # A's first invoice, starter
    upgrade: dict  # A's upgrade to professional
    second: dict  # B's first invoice
    old: dict  # C's invoice, paid before the range and refunded within it


async def bill(deliver, make_customer, state: FakeState) -> Billed:
    """Three subscribers' payments through the listener, with their Stripe fees."""
    a, b, c = [(await make_customer("free")).user_id for _ in range(3)]

    def paid(user: str, n: int, reason: str, lines: list[dict], created: int) -> dict:
        inv = invoice(f"in_{n}_{user}", reason, lines, created, user_id=user, sub=f"sub_{user}", customer=f"cus_{user}")
        state.fees[inv["id"]] = FEES[reason]
        return inv

    def subscribe(user: str, created: int) -> tuple[dict, list[dict]]:
        inv = paid(user, 1, "subscription_create", [line(STARTER, created, created + MONTH, 1900)], created)
        return inv, [checkout_completed(user, created, f"sub_{user}", f"cus_{user}"), event("invoice.paid", inv, created)]

    first, a_events = subscribe(a, T0)
    t_up = T0 + 15 * DAY
    prorated = [line(STARTER, t_up, T0 + MONTH, -950, proration=True), line(PRO, t_up, T0 + MONTH, 4950, proration=True)]
    upgrade = paid(a, 2, "subscription_update", prorated, t_up)
    second, b_events = subscribe(b, T0 + DAY)
    old, c_events = subscribe(c, T0 - 25 * DAY)
    refunded = {"id": "ch_c", "object": "charge", "payment_intent": payment_intent_id(old["id"]), "amount_refunded": 300}
    events = [*a_events, event("invoice.paid", upgrade, t_up), *b_events, *c_events]
    assert await deliver(*events, event("charge.refunded", refunded, T0 + 2 * DAY)) == [200] * (len(events) + 1)
    return Billed(first, upgrade, second, old)


def publish(state: FakeState, billed: Billed) -> None:
    """Stripe's lists as they are for what the listener recorded (and a payout, no payment's)."""
    state.invoices += [billed.old, billed.first, billed.second, billed.upgrade]
    state.balance_transactions += [
        charge_transaction(inv["id"], inv["amount_paid"], FEES[inv["billing_reason"]], inv["created"]) for inv in state.invoices
    ]
    state.balance_transactions.append(payout_transaction("po_1", 5000, T0 + 3 * DAY))
    state.refunds.append(refund("re_c", billed.old["id"], 300, T0 + 2 * DAY))


async def test_matching_records_reconcile_clean_and_every_page_is_read(
    deliver, make_customer, stripe_state, fake_stripe, settings, pool
):
    billed = await bill(deliver, make_customer, stripe_state)
    publish(stripe_state, billed)

    result = await reconcile_stripe(settings, pool, START, END)

    assert result.differences == ()
    # the three invoices paid in the range, and the older one whose refund falls in it
    assert result.rows == 4
    assert result.kinds == tuple(StripeKind)
    # every object of every list within the range was served, page by page
    since, until = T0 - T0 % DAY, NOW - NOW % DAY + DAY
    listed = {
        "/v1/invoices": stripe_state.invoices,  # all of them created within the lookback
        "/v1/balance_transactions": [t for t in stripe_state.balance_transactions if since <= t["created"] < until],
        "/v1/refunds": stripe_state.refunds,
    }
    calls = fake_stripe.app[CALLS]
    for path, objects in listed.items():
        assert stripe_state.served[path] == {obj["id"] for obj in objects}, path
    for path in ("/v1/invoices", "/v1/balance_transactions"):  # 4 objects each: two pages, newest first
        newest = sorted(listed[path], key=lambda obj: -obj["created"])
        assert [call.form.get("starting_after") for call in calls if call.path == path] == [None, newest[1]["id"]]


async def test_each_planted_difference_is_found_and_nothing_else(deliver, make_customer, stripe_state, settings, pool):
    billed = await bill(deliver, make_customer, stripe_state)
    publish(stripe_state, billed)
    state = stripe_state
    # an invoice Stripe was paid for that the listener never recorded, with its fee
    ghost = invoice(
        "in_ghost", "subscription_create", [line(STARTER, T0 + 4 * DAY, T0 + 34 * DAY, 1900)], T0 + 4 * DAY, user_id="nobody"
    )
    state.invoices.append(ghost)
    state.balance_transactions.append(charge_transaction("in_ghost", 1900, 85, T0 + 4 * DAY))
    # the upgrade's amount, one cent more in Stripe
    state.invoices[state.invoices.index(billed.upgrade)] = {**billed.upgrade, "amount_paid": 4001}
    # the second invoice's fee, one cent more in Stripe
    second_charge = next(t for t in state.balance_transactions if t["source"]["id"] == charge_id(billed.second["id"]))
    second_charge["fee"] = 86
    # a refund of the first invoice costproxy never heard of; a failed one that returned nothing
    state.refunds += [
        refund("re_a", billed.first["id"], 1900, T0 + 5 * DAY),
        refund("re_failed", billed.second["id"], 1900, T0 + 5 * DAY, status="failed"),
    ]
    # a lost dispute of the second invoice, its fee; and a won one of the upgrade
    lost = dispute("dp_lost", billed.second["id"], 1900, "lost", T0 + 6 * DAY)
    state.disputes += [lost, dispute("dp_won", billed.upgrade["id"], 4000, "won", T0 + 16 * DAY)]
    state.balance_transactions.append(dispute_transaction(lost, 1500, T0 + 6 * DAY))

    result = await reconcile_stripe(settings, pool, START, END)

    first, upgrade, second = billed.first, billed.upgrade, billed.second
    assert set(result.differences) == {
        Difference(day(ghost["created"]), "in_ghost", StripeKind.AMOUNT_PAID, 0, 1900),
        Difference(day(ghost["created"]), "in_ghost", StripeKind.FEE, 0, 85),
        Difference(day(upgrade["created"]), upgrade["id"], StripeKind.AMOUNT_PAID, 4000, 4001),
        Difference(day(second["created"]), second["id"], StripeKind.FEE, 85, 86),
        Difference(day(first["created"]), first["id"], StripeKind.REFUNDED, 0, 1900),
        Difference(day(second["created"]), second["id"], StripeKind.DISPUTED, 0, 1900),
        Difference(day(second["created"]), second["id"], StripeKind.OTHER_FEE, 0, 1500),
    }
    assert len(result.differences) == 7
    assert result.rows == 5
    # the per-payment totals were read for every refunded or disputed payment
    assert state.served["/v1/disputes"] == {"dp_lost", "dp_won"}
    assert state.served["/v1/refunds"] == {"re_a", "re_c", "re_failed"}


async def test_the_cli_stores_its_run_for_the_dashboard_judged_with_tolerance_0(
    deliver, make_customer, stripe_state, settings, pool
):
    billed = await bill(deliver, make_customer, stripe_state)
    publish(stripe_state, billed)
    stripe_state.invoices[stripe_state.invoices.index(billed.upgrade)] = {**billed.upgrade, "amount_paid": 4001}
    env = environment(settings, STRIPE_API_KEY=settings.stripe_api_key, STRIPE_API_BASE=settings.stripe_api_base)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy.cli", "reconcile", "stripe", "--from", START.isoformat(), "--to", END.isoformat()],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr  # one cent off: any difference counts
    last = (await latest_results(pool))["stripe"]  # what GET /admin/api/reconcile and the dashboard show
    assert (last["from"], last["to"], last["tolerance"], last["exceeds"], last["rows"]) == (
        START.isoformat(), END.isoformat(), "0", True, 4,
    )  # fmt: skip
    assert last["ratios"]["amount_paid_cents"] == str(round_half_up(Fraction(1, 4001), 6))
    assert [(d["subject"], d["kind"], d["ours"], d["theirs"]) for d in last["differences"]] == [
        (billed.upgrade["id"], "amount_paid_cents", 4000, 4001)
    ]
    assert await pool.fetchval("SELECT ran_by FROM reconcile_runs WHERE source = 'stripe'") == "cli"
