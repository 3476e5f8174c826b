"""Stripe billing: signed events replayed as whole customer histories, in any order, twice.

The webhook listener runs for real against Postgres and Redis; the Stripe API calls it
and the proxy make go to a local fake that records their form fields.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import random
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from proxy.billing.webhooks import EFFECTS

from .support.accounts import account
from .support.fake_stripe import (
    CALLS,
    DAY,
    FakeState,
    checkout_completed,
    event,
    invoice,
    line,
    subscription_obj,
    with_fake_stripe,
)
from .support.money import ALLOWANCE

STARTER, PRO = "price_starter_monthly", "price_professional_monthly"
T0 = int(time.time()) - 20 * DAY  # subscribed 20 days ago
MONTH = 30 * DAY
SEED = int(os.environ.get("BILLING_SEED") or random.randrange(1 << 32))  # set it to replay a failed order
#: upgrading from starter to professional with 15 of 30 days left adds the allowances' difference for 15 days
PRORATED_UPGRADE = (ALLOWANCE["professional"] - ALLOWANCE["starter"]) * 15 // 30


@pytest.fixture
def settings(settings, fake_stripe, smtp):
    return replace(
        with_fake_stripe(settings, fake_stripe), smtp_url=f"smtp://127.0.0.1:{smtp[1]}", mail_from="billing@costproxy.test"
    )


async def shuffled_twice(deliver, *events) -> None:
    """Deliver every event twice, in a random order, and redeliver refused ones, as Stripe does."""
    pending = list(events) * 2
    print(f"shuffled with BILLING_SEED={SEED}")  # shown by pytest when the test fails
    shuffle = random.Random(SEED).shuffle
    for _ in range(5):
        shuffle(pending)
        statuses = await deliver(*pending)
        pending = [evt for evt, status in zip(pending, statuses, strict=True) if status != 200]
        if not pending:
            return
    raise AssertionError(f"{len(pending)} events never accepted")


async def state(ledger, pool, user_id):
    acct = await account(ledger, user_id)
    user = await pool.fetchrow("SELECT * FROM users WHERE id = $1", user_id)
    return {
        "tier": acct.tier,
        "balance": acct.balance,
        "status": acct.status,
        "cycle": (acct.cycle_start // 1000, acct.cycle_end // 1000),
        "auto_renew": acct.auto_renew,
        "db_tier": user["tier"],
        "db_status": user["status"],
    }


class Subscriber:
    """Builds the Stripe objects of one user, with Stripe ids unique to the test."""

    def __init__(self, user_id: str, state: FakeState):
        self.user_id, self.sub, self.customer = user_id, f"sub_{user_id}", f"cus_{user_id}"
        self.state = state

    def inv(self, n: int) -> str:
        return f"in_{n}_{self.user_id}"

    def invoice(self, n: int, reason: str, lines: list[dict], created: int, fee: int = 0) -> dict:
        self.state.fees[self.inv(n)] = fee
        return invoice(self.inv(n), reason, lines, created, user_id=self.user_id, sub=self.sub, customer=self.customer)

    def subscription(self, price: str, start: int, end: int, **kwargs) -> dict:
        return subscription_obj(price, start, end, user_id=self.user_id, sub=self.sub, customer=self.customer, **kwargs)

    def checkout(self, created: int) -> dict:
        return checkout_completed(self.user_id, created, self.sub, self.customer)

    def subscribe(self, created: int = T0) -> list[dict]:
        return [
            self.checkout(created),
            event(
                "invoice.paid",
                self.invoice(1, "subscription_create", [line(STARTER, created, created + MONTH, 1900)], created, 85),
                created,
            ),
        ]


@pytest.fixture
def subscriber(stripe_state):
    return lambda customer: Subscriber(customer.user_id, stripe_state)


def history(c: Subscriber) -> list[list[dict]]:
    """A customer's year in events, one list per step."""
    t_up, t_renew, t_fail = T0 + 15 * DAY, T0 + MONTH, T0 + 2 * MONTH
    t_paid, t_cancel = T0 + 2 * MONTH + 2 * DAY, T0 + 2 * MONTH + 10 * DAY
    return [
        [  # subscribe to starter
            *c.subscribe(),
            event("customer.subscription.updated", c.subscription(STARTER, T0, T0 + MONTH), T0),
        ],
        [  # upgrade to professional with 15 of 30 days left
            event(
                "invoice.paid",
                c.invoice(
                    2,
                    "subscription_update",
                    [
                        line(STARTER, t_up, T0 + MONTH, -950, proration=True),
                        line(PRO, t_up, T0 + MONTH, 4950, proration=True),
                    ],
                    t_up,
                    174,
                ),
                t_up,
            ),
            event("customer.subscription.updated", c.subscription(PRO, T0, T0 + MONTH), t_up),
        ],
        [  # renewal
            event(
                "invoice.paid",
                c.invoice(3, "subscription_cycle", [line(PRO, t_renew, t_renew + MONTH, 9900)], t_renew, 317),
                t_renew,
            ),
            event("customer.subscription.updated", c.subscription(PRO, t_renew, t_renew + MONTH), t_renew),
        ],
        [  # the next renewal's payment fails
            event(
                "invoice.payment_failed",
                c.invoice(4, "subscription_cycle", [line(PRO, t_fail, t_fail + MONTH, 9900)], t_fail, 317),
                t_fail,
            ),
            event("customer.subscription.updated", c.subscription(PRO, t_fail, t_fail + MONTH, status="past_due"), t_fail + 1),
        ],
        [  # ... and is paid two days later
            event(
                "invoice.paid", c.invoice(4, "subscription_cycle", [line(PRO, t_fail, t_fail + MONTH, 9900)], t_paid, 317), t_paid
            ),
            event("customer.subscription.updated", c.subscription(PRO, t_fail, t_fail + MONTH), t_paid),
        ],
        [  # cancelled; a stale snapshot from before arrives late
            event(
                "customer.subscription.deleted",
                {**c.subscription(PRO, t_fail, t_fail + MONTH, status="canceled"), "ended_at": t_cancel},
                t_cancel,
            ),
            event("customer.subscription.updated", c.subscription(PRO, t_fail, t_fail + MONTH), t_paid + 1),
        ],
    ]


async def test_customer_history_step_by_step(deliver, make_customer, subscriber, ledger, pool, smtp, openai_client):
    customer = await make_customer("free")
    c = subscriber(customer)
    steps = history(c)
    t_renew, t_fail, t_cancel = T0 + MONTH, T0 + 2 * MONTH, T0 + 2 * MONTH + 10 * DAY

    await shuffled_twice(deliver, *steps[0])
    s = await state(ledger, pool, customer.user_id)
    # the first paid invoice sets the balance to the allowance; it does not add to the free credits
    assert (s["tier"], s["db_tier"], s["balance"], s["cycle"], s["auto_renew"]) == (
        "starter",
        "starter",
        ALLOWANCE["starter"],
        (T0, T0 + MONTH),
        False,
    )
    user = await pool.fetchrow("SELECT stripe_customer_id, stripe_subscription_id FROM users WHERE id = $1", customer.user_id)
    assert tuple(user) == (c.customer, c.sub)

    await openai_client(customer.api_key).chat.completions.create(model="gpt-4o-mini", messages=[], max_tokens=5)  # uses 345 µ$

    await shuffled_twice(deliver, *steps[1])
    s = await state(ledger, pool, customer.user_id)
    # the allowances' difference for 15 of 30 days, added; the cycle is unchanged
    assert (s["tier"], s["db_tier"], s["balance"], s["cycle"]) == (
        "professional",
        "professional",
        ALLOWANCE["starter"] - 345 + PRORATED_UPGRADE,
        (T0, T0 + MONTH),
    )

    await shuffled_twice(deliver, *steps[2])
    s = await state(ledger, pool, customer.user_id)
    assert (s["tier"], s["balance"], s["cycle"]) == ("professional", ALLOWANCE["professional"], (t_renew, t_renew + MONTH))
    renewed = await account(ledger, customer.user_id)
    assert (renewed.tokens, renewed.requests, renewed.cost) == (0, 0, 0)

    await shuffled_twice(deliver, *steps[3])
    s = await state(ledger, pool, customer.user_id)
    assert (s["status"], s["db_status"], s["balance"], s["tier"]) == (
        "past_due",
        "past_due",
        ALLOWANCE["professional"],
        "professional",
    )
    for _ in range(50):
        if smtp[0].messages:
            break
        await asyncio.sleep(0.05)
    recipients, raw = smtp[0].messages[0]
    mail = email.message_from_string(raw, policy=email.policy.default)
    assert mail["Subject"] == "Payment failed: your professional plan"
    assert f"https://invoice.stripe.test/{c.inv(4)}" in mail.get_content()
    assert recipients == [(await pool.fetchval("SELECT email FROM users WHERE id = $1", customer.user_id))]

    await shuffled_twice(deliver, *steps[4])
    s = await state(ledger, pool, customer.user_id)
    assert (s["status"], s["db_status"], s["balance"], s["cycle"]) == (
        "active",
        "active",
        ALLOWANCE["professional"],
        (t_fail, t_fail + MONTH),
    )

    await deliver(*steps[5])  # deletion first, then the stale snapshot: must stay cancelled
    s = await state(ledger, pool, customer.user_id)
    assert (s["tier"], s["db_tier"], s["balance"], s["cycle"], s["auto_renew"]) == (
        "free",
        "free",
        ALLOWANCE["free"],
        (t_cancel, t_cancel + MONTH),
        True,
    )
    assert await pool.fetchval("SELECT subscription_status FROM users WHERE id = $1", customer.user_id) == "canceled"

    revenue = await pool.fetch(
        "SELECT id, amount_paid, stripe_fee, tier FROM invoices WHERE user_id = $1 ORDER BY id", customer.user_id
    )
    assert [tuple(r) for r in revenue] == [
        (c.inv(1), 1900, 85, "starter"),
        (c.inv(2), 4000, 174, "professional"),
        (c.inv(3), 9900, 317, "professional"),
        (c.inv(4), 9900, 317, "professional"),
    ]
    changes = await pool.fetch(
        "SELECT kind, from_tier, to_tier FROM tier_changes WHERE user_id = $1 ORDER BY id", customer.user_id
    )
    assert [tuple(c) for c in changes] == [
        ("signup", None, "free"),
        ("upgrade", "free", "starter"),
        ("upgrade", "starter", "professional"),
        ("cancel", "professional", "free"),
    ]


async def test_whole_history_shuffled_ends_in_the_same_state(deliver, make_customer, subscriber, ledger, pool):
    customer = await make_customer("free")
    await shuffled_twice(deliver, *[e for step in history(subscriber(customer)) for e in step])
    t_cancel = T0 + 2 * MONTH + 10 * DAY
    s = await state(ledger, pool, customer.user_id)
    assert (s["tier"], s["db_tier"], s["balance"], s["cycle"], s["status"]) == (
        "free",
        "free",
        ALLOWANCE["free"],
        (t_cancel, t_cancel + MONTH),
        "active",
    )
    assert await pool.fetchval("SELECT count(*) FROM invoices WHERE user_id = $1", customer.user_id) == 4


async def test_an_upgrade_paid_before_its_first_invoice_arrives_waits_for_it(deliver, make_customer, subscriber, ledger, pool):
    customer = await make_customer("free")
    c = subscriber(customer)
    subscribe, upgrade = history(c)[:2]
    assert await deliver(upgrade[0]) == [500]  # refused: Stripe will redeliver it
    await deliver(*subscribe)
    assert await deliver(upgrade[0]) == [200]
    s = await state(ledger, pool, customer.user_id)
    # the starter allowance, then the allowances' difference for 15 of 30 days added on top
    assert (s["tier"], s["db_tier"], s["balance"], s["cycle"]) == (
        "professional",
        "professional",
        ALLOWANCE["starter"] + PRORATED_UPGRADE,
        (T0, T0 + MONTH),
    )


async def test_a_late_deletion_of_an_older_subscription_leaves_the_current_one(deliver, make_customer, subscriber, ledger, pool):
    customer = await make_customer("free")
    c = subscriber(customer)
    await deliver(*history(c)[0])
    old = {**c.subscription(STARTER, T0 - MONTH, T0, status="canceled"), "id": f"sub_old_{customer.user_id}", "ended_at": T0}
    assert await deliver(
        event("customer.subscription.updated", {**old, "status": "past_due"}, T0 + DAY),
        event("customer.subscription.deleted", old, T0 + DAY),
    ) == [200, 200]
    s = await state(ledger, pool, customer.user_id)
    assert (s["tier"], s["db_tier"], s["balance"], s["status"], s["db_status"]) == (
        "starter",
        "starter",
        ALLOWANCE["starter"],
        "active",
        "active",
    )
    user = await pool.fetchrow("SELECT stripe_subscription_id, ended_subscriptions FROM users WHERE id = $1", customer.user_id)
    assert (user["stripe_subscription_id"], user["ended_subscriptions"]) == (c.sub, [old["id"]])


async def test_bad_and_stale_signatures_are_refused_and_change_nothing(deliver, make_customer, subscriber, pool, ledger):
    customer = await make_customer("free")
    evt = subscriber(customer).subscribe()[1]
    assert await deliver(evt, secret="whsec_wrong") == [400]
    assert await deliver(evt, timestamp=int(time.time()) - 3600) == [400]  # outside Stripe's 5-minute tolerance
    assert await pool.fetchval("SELECT count(*) FROM stripe_events WHERE id = $1", evt["id"]) == 0
    assert (await account(ledger, customer.user_id)).tier == "free"
    assert await deliver(evt) == [200]
    assert (await account(ledger, customer.user_id)).tier == "starter"


async def test_refunds_and_disputes_adjust_the_revenue_record(deliver, make_customer, subscriber, pool):
    c = subscriber(await make_customer("free"))
    await deliver(*c.subscribe())
    intent = f"pi_{c.inv(1)}"  # the fake's payment intent for the invoice
    await deliver(
        event("charge.refunded", {"id": "ch_1", "object": "charge", "payment_intent": intent, "amount_refunded": 500}, T0 + 60)
    )
    await deliver(
        event(
            "charge.dispute.created",
            {"id": "dp_1", "object": "dispute", "payment_intent": intent, "amount": 1400, "status": "needs_response"},
            T0 + 90,
        )
    )
    row = await pool.fetchrow("SELECT amount_paid, stripe_fee, refunded, disputed FROM invoices WHERE id = $1", c.inv(1))
    assert tuple(row) == (1900, 85, 500, 1400)
    await deliver(
        event(
            "charge.dispute.closed",
            {"id": "dp_1", "object": "dispute", "payment_intent": intent, "amount": 1400, "status": "won"},
            T0 + 900,
        )
    )
    assert await pool.fetchval("SELECT disputed FROM invoices WHERE id = $1", c.inv(1)) == 0
    for status, disputed in (("warning_needs_response", 0), ("under_review", 1400), ("lost", 1400), ("prevented", 0)):
        # an inquiry withdraws nothing; an open or lost dispute keeps the money
        dispute = {"id": "dp_2", "object": "dispute", "payment_intent": intent, "amount": 1400, "status": status}
        await deliver(event("charge.dispute.created", dispute, T0 + 1000))
        assert await pool.fetchval("SELECT disputed FROM invoices WHERE id = $1", c.inv(1)) == disputed, status


async def test_past_due_beyond_the_grace_period_is_limited_to_free(
    deliver, make_customer, subscriber, pool, ledger, listener, proxy_url
):
    customer = await make_customer("free")
    c = subscriber(customer)
    await deliver(*c.subscribe())
    failed_at = T0 + MONTH
    renewal = [line(STARTER, failed_at, failed_at + MONTH, 1900)]
    await deliver(event("invoice.payment_failed", c.invoice(2, "subscription_cycle", renewal, failed_at), failed_at))
    effects = listener.app[EFFECTS]
    within_grace = datetime.fromtimestamp(failed_at, tz=UTC) + timedelta(days=6)
    assert await effects.lapse_past_due(within_grace) == 0
    assert (await account(ledger, customer.user_id)).tier == "starter"
    assert await effects.lapse_past_due(within_grace + timedelta(days=2)) == 1
    s = await state(ledger, pool, customer.user_id)
    assert (s["tier"], s["balance"], s["status"]) == ("free", ALLOWANCE["free"], "past_due")
    # lapsed to free, from which any paid tier would count as an upgrade: no plan change until the invoice is paid
    auth = {"Authorization": f"Bearer {customer.api_key}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{proxy_url}/api/credits/upgrade", json={"tier": "starter"}, headers=auth) as resp,
    ):
        assert resp.status == 409 and (await resp.json())["error"]["code"] == "past_due"
    # paying the invoice later restores the paid tier for its period
    await deliver(event("invoice.paid", c.invoice(2, "subscription_cycle", renewal, failed_at + 9 * DAY), failed_at + 9 * DAY))
    s = await state(ledger, pool, customer.user_id)
    assert (s["tier"], s["balance"], s["status"], s["cycle"]) == (
        "starter",
        ALLOWANCE["starter"],
        "active",
        (failed_at, failed_at + MONTH),
    )


async def test_checkout_portal_upgrade_and_downgrade_call_stripe_right(
    proxy_url,
    make_customer,
    subscriber,
    fake_stripe,
    stripe_state,
    deliver,
):
    customer = await make_customer("free")
    c = subscriber(customer)
    auth = {"Authorization": f"Bearer {customer.api_key}"}
    calls = fake_stripe.app[CALLS]
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{proxy_url}/api/billing/checkout", json={"tier": "starter"}, headers=auth) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["url"].startswith("https://checkout.stripe.test/")
        form = calls[-1].form
        checkout = (form["mode"], form["client_reference_id"], form["line_items[0][price]"])
        assert checkout == ("subscription", customer.user_id, STARTER)
        assert form["subscription_data[metadata][user_id]"] == customer.user_id and calls[-1].idempotency_key

        async with http.post(f"{proxy_url}/api/credits/upgrade", json={"tier": "professional"}, headers=auth) as resp:
            assert resp.status == 409 and (await resp.json())["error"]["code"] == "no_subscription"

        await deliver(*c.subscribe())
        made = len(calls)
        async with http.post(f"{proxy_url}/api/billing/checkout", json={"tier": "professional"}, headers=auth) as resp:
            assert resp.status == 409 and (await resp.json())["error"]["code"] == "already_subscribed"
        assert len(calls) == made  # a second subscription is not even asked of Stripe
        # Stripe does not know the subscription (yet): a clear 4xx, not a crash
        async with http.post(f"{proxy_url}/api/credits/upgrade", json={"tier": "professional"}, headers=auth) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == {"code": "stripe_error", "message": "No such subscription"}
        stripe_state.subscriptions[c.sub] = c.subscription(STARTER, T0, T0 + MONTH)
        stripe_state.preview_amount = 4000

        async with http.post(f"{proxy_url}/api/billing/portal", headers=auth) as resp:
            assert (await resp.json())["url"] == "https://billing.stripe.test/session/1"
        assert calls[-1].form["customer"] == c.customer

        async with http.post(f"{proxy_url}/api/credits/upgrade", json={"tier": "professional"}, headers=auth) as resp:
            body = await resp.json()
        assert (body["change"], body["amount_charged"], body["currency"]) == ("upgrade", 4000, "usd")
        preview, update = calls[-2], calls[-1]
        assert preview.path == "/v1/invoices/create_preview"
        assert preview.form["subscription_details[items][0][price]"] == PRO
        assert update.path == f"/v1/subscriptions/{c.sub}"
        assert (update.form["proration_behavior"], update.form["payment_behavior"]) == ("always_invoice", "pending_if_incomplete")
        assert update.form["items[0][id]"] == "si_1" and update.form["items[0][price]"] == PRO
        # the amount shown is prorated at the instant the update prorates at, and is never a
        # replayed answer (only the stripe package's own random key: an old preview's
        # amount would be shown for a key derived from the user and tier)
        assert update.form["proration_date"] == preview.form["subscription_details[proration_date]"]
        assert abs(int(update.form["proration_date"]) - time.time()) <= 61
        assert update.idempotency_key and c.user_id not in (preview.idempotency_key or "")

        async with http.post(f"{proxy_url}/api/credits/upgrade", json={"tier": "gold"}, headers=auth) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == "unknown_tier"

    # a downgrade is scheduled for the period's end and changes nothing now
    await deliver(
        event(
            "invoice.paid",
            c.invoice(
                2,
                "subscription_update",
                [
                    line(STARTER, T0 + DAY, T0 + MONTH, -1800, proration=True),
                    line(PRO, T0 + DAY, T0 + MONTH, 9500, proration=True),
                ],
                T0 + DAY,
            ),
            T0 + DAY,
        )
    )
    stripe_state.subscriptions[c.sub] = c.subscription(PRO, T0, T0 + MONTH)
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{proxy_url}/api/credits/upgrade", json={"tier": "starter"}, headers=auth) as resp,
    ):
        assert (await resp.json())["change"] == "downgrade"
    created, updated = calls[-2], calls[-1]
    assert created.path == "/v1/subscription_schedules" and created.form["from_subscription"] == c.sub
    assert updated.form["phases[1][items][0][price]"] == STARTER and updated.form["end_behavior"] == "release"
    assert updated.form["phases[0][end_date]"] == str(T0 + MONTH)
