"""What each Stripe event does to accounts, credits and revenue records.

Stripe delivers events at least once, in any order, retried for days. So:

* each event id is recorded in ``stripe_events`` in the same Postgres transaction as its
  Postgres effects; a replay finds it there and does nothing;
* every credit movement is keyed on its invoice id (or subscription id) in the Redis
  ledger script, so two events about one payment, or a retry after a failed commit,
  never grant twice;
* subscription snapshots older than the last one applied are ignored;
* an invoice for a cycle older than the one running changes no credits;
* an upgrade invoice that arrives before the invoice starting its cycle is refused, so
  Stripe redelivers it after that one (which would otherwise reset it);
* the user row is locked (``FOR UPDATE``) while an event is applied, so concurrent
  events about one user apply one after the other.

Money rules: ``invoice.paid`` is what grants credits. A first invoice *sets* the balance
to the tier's allowance; a renewal resets it (plus unused credits if the tier rolls
over); an upgrade adds the allowance difference prorated by the period on the invoice's
proration line, never by the clock, so a replay days later gives the same credits.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import stripe

from ..accounts import record_tier_change
from ..config import ConfigStore
from ..db import Connection
from ..ledger import AccountStatus, Cycle, EntryKind, Ledger
from ..tiers import TierChange
from .disputes import withdrawn_cents
from .stripe_api import plain

log = logging.getLogger("costproxy.billing")

Handler = Callable[["Effects", Connection, dict[str, Any], dict[str, Any]], Awaitable[None]]


#: billing reasons of the invoices that start a cycle (others only count as revenue)
_CYCLE_REASONS = frozenset({"subscription_create", "subscription_cycle"})
_OUTCOME: ContextVar[Outcome] = ContextVar("billing_outcome")


def _at(seconds: int | float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def _subscription_details(invoice: dict[str, Any]) -> dict[str, Any]:
    return ((invoice.get("parent") or {}).get("subscription_details")) or {}


def _line_price(line: dict[str, Any]) -> str | None:
    return ((line.get("pricing") or {}).get("price_details") or {}).get("price")


def _is_proration(line: dict[str, Any]) -> bool:
    parent = line.get("parent") or {}
    details = parent.get("subscription_item_details") or parent.get("invoice_item_details") or {}
    return bool(details.get("proration"))


@dataclass
class Outcome:
    """What applying one event did; ``mail`` is sent after the transaction commits."""

    status: str  # applied | duplicate
    mail: list[tuple[str, str, str]] = field(default_factory=list)


class Effects:
    """Applies verified Stripe events to Postgres and the Redis ledger."""

    def __init__(self, pool: asyncpg.Pool, ledger: Ledger, config: ConfigStore, client: stripe.StripeClient, grace_days: float):
        self.pool = pool
        self.ledger = ledger
        self.config = config
        self.client = client
        self.grace = timedelta(days=grace_days)

    async def apply(self, event: dict[str, Any]) -> Outcome:
        """Apply one event exactly once; raises (so Stripe retries) if anything fails."""
        outcome = Outcome("applied")
        _OUTCOME.set(outcome)  # events are applied concurrently: each call has its own
        async with self.pool.acquire() as conn, conn.transaction():
            fresh = await conn.fetchval(
                "INSERT INTO stripe_events (id, type, created_at) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING RETURNING true",
                event["id"],
                event["type"],
                _at(event["created"]),
            )
            if not fresh:
                return Outcome("duplicate")
            handler = HANDLERS.get(event["type"])
            if handler is not None:
                await handler(self, conn, event["data"]["object"], event)
        return outcome

    # lookups ------------------------------------------------------------------------------
    async def _user(
        self, conn: Connection, *, user_id: str | None = None, subscription: str | None = None, customer: str | None = None
    ) -> asyncpg.Record | None:
        user = await conn.fetchrow(
            "SELECT * FROM users WHERE id = $1 OR stripe_subscription_id = $2 OR stripe_customer_id = $3"
            " ORDER BY (id = $1) DESC LIMIT 1 FOR UPDATE",
            user_id,
            subscription,
            customer,
        )
        if user is None:
            log.warning("no user for Stripe object (user %s, subscription %s, customer %s)", user_id, subscription, customer)
        return user

    async def _invoice_user(self, conn: Connection, invoice: dict[str, Any]) -> asyncpg.Record | None:
        details = _subscription_details(invoice)
        return await self._user(
            conn,
            user_id=(details.get("metadata") or {}).get("user_id"),
            subscription=details.get("subscription"),
            customer=invoice.get("customer"),
        )

    @staticmethod
    def _ended(user: asyncpg.Record, invoice: dict[str, Any]) -> bool:
        """Whether the invoice belongs to a subscription already deleted (a late delivery)."""
        return _subscription_details(invoice).get("subscription") in user["ended_subscriptions"]

    def _tier_of(self, line: dict[str, Any]) -> str | None:
        return self.config.current.tiers.tier_for_price(_line_price(line))

    # invoices -----------------------------------------------------------------------------
    async def invoice_paid(self, conn: Connection, invoice: dict[str, Any], event: dict[str, Any]) -> None:
        user = await self._invoice_user(conn, invoice)
        if user is None:
            return
        lines = invoice["lines"]["data"]
        reason = invoice.get("billing_reason")
        if reason == "subscription_update" and not self._ended(user, invoice):
            tier = await self._upgrade(conn, user, invoice, lines, event)
        elif reason in _CYCLE_REASONS and not self._ended(user, invoice):
            tier = await self._new_cycle(conn, user, invoice, lines, event)
        else:  # a late invoice of an ended subscription, or one that starts no cycle: revenue only
            tier = next((t for t in map(self._tier_of, lines) if t), user["tier"])
        if tier is not None:
            await self._record_invoice(conn, user["id"], invoice, tier)

    async def _new_cycle(
        self, conn: Connection, user: asyncpg.Record, invoice: dict[str, Any], lines: list[dict[str, Any]], event: dict[str, Any]
    ) -> str | None:
        line = next((ln for ln in lines if not _is_proration(ln) and self._tier_of(ln)), None)
        if line is None:
            log.warning("invoice %s sells no tier's price; ignored", invoice["id"])
            return None
        tier_name = self._tier_of(line)
        assert tier_name is not None
        tiers = self.config.current.tiers
        tier = tiers.tiers[tier_name]
        start_ms, end_ms = line["period"]["start"] * 1000, line["period"]["end"] * 1000
        account = await self.ledger.account(user["id"])
        if account is not None and end_ms <= account.cycle_start:
            log.info("invoice %s is for a cycle older than the running one; no credits", invoice["id"])
            return tier_name
        await self.ledger.start_cycle(
            user["id"],
            tier=tier_name,
            allowance=tier.allowance_micro,
            cycle=Cycle(start_ms, end_ms, auto_renew=False),
            event_id=f"inv_{invoice['id']}",
            reason=f"invoice {invoice['id']} ({invoice.get('billing_reason')})",
            rollover=tier.rollover and invoice.get("billing_reason") == "subscription_cycle",
        )
        await self.ledger.set_status(user["id"], AccountStatus.ACTIVE)
        await conn.execute(
            "UPDATE users SET tier = $2, status = 'active', stripe_subscription_id = coalesce($3, stripe_subscription_id),"
            " stripe_customer_id = coalesce(stripe_customer_id, $4), past_due_since = NULL WHERE id = $1",
            user["id"],
            tier_name,
            _subscription_details(invoice).get("subscription"),
            invoice.get("customer"),
        )
        if tier_name != user["tier"]:
            await record_tier_change(
                conn, user["id"], user["tier"], tier_name, tiers.change(user["tier"], tier_name), event["id"]
            )
        return tier_name

    async def _upgrade(
        self, conn: Connection, user: asyncpg.Record, invoice: dict[str, Any], lines: list[dict[str, Any]], event: dict[str, Any]
    ) -> str | None:
        gained = next((ln for ln in lines if _is_proration(ln) and ln["amount"] > 0 and self._tier_of(ln)), None)
        if gained is None:
            log.warning("upgrade invoice %s has no proration line for a tier; ignored", invoice["id"])
            return None
        lost = next((ln for ln in lines if _is_proration(ln) and ln["amount"] < 0 and self._tier_of(ln)), None)
        tiers = self.config.current.tiers.tiers
        new_name = self._tier_of(gained)
        old_name = (self._tier_of(lost) if lost else None) or user["tier"]
        assert new_name is not None
        start, end = gained["period"]["start"], gained["period"]["end"]
        account = await self.ledger.account(user["id"])
        cycle_start, cycle_end = (account.cycle_start // 1000, account.cycle_end // 1000) if account else (0, 0)
        if end <= cycle_start:
            log.info("upgrade invoice %s is for a cycle already over; no credits", invoice["id"])
            return new_name
        if end != cycle_end:
            # The invoice that starts the prorated cycle has not arrived yet; applying the
            # upgrade first would have that invoice reset it. Stripe redelivers this later.
            raise LookupError(f"upgrade invoice {invoice['id']}: its cycle (ending {end}) has not started here yet")
        period = cycle_end - cycle_start
        difference = tiers[new_name].allowance_micro - (tiers[old_name].allowance_micro if old_name in tiers else 0)
        grant = max(0, difference * (end - start) // period)
        await self.ledger.credit(
            user["id"],
            amount=grant,
            kind=EntryKind.GRANT,
            event_id=f"inv_{invoice['id']}",
            tier=new_name,
            reason=f"upgrade {old_name} -> {new_name}, {end - start} of {period} s left (invoice {invoice['id']})",
        )
        if user["tier"] != new_name:  # also on a retry whose first attempt moved only Redis
            await conn.execute("UPDATE users SET tier = $2 WHERE id = $1", user["id"], new_name)
            await record_tier_change(conn, user["id"], old_name, new_name, TierChange.UPGRADE, event["id"])
        return new_name

    async def _record_invoice(self, conn: Connection, user_id: str, invoice: dict[str, Any], tier: str) -> None:
        fee, payment_intent = await self._fee(invoice["id"])
        period = (
            next((ln["period"] for ln in invoice["lines"]["data"] if not _is_proration(ln)), None)
            or invoice["lines"]["data"][0]["period"]
        )
        paid_at = (invoice.get("status_transitions") or {}).get("paid_at") or invoice["created"]
        await conn.execute(
            "INSERT INTO invoices (id, user_id, subscription_id, billing_reason, payment_intent, tier, currency,"
            " amount_paid, stripe_fee, period_start, period_end, paid_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (id) DO NOTHING",
            invoice["id"],
            user_id,
            _subscription_details(invoice).get("subscription"),
            invoice.get("billing_reason") or "",
            payment_intent,
            tier,
            invoice.get("currency") or "usd",
            invoice.get("amount_paid") or 0,
            fee,
            _at(period["start"]),
            _at(period["end"]),
            _at(paid_at),
        )

    async def _fee(self, invoice_id: str) -> tuple[int, str | None]:
        """Stripe's fee on an invoice's payments, from their balance transactions."""
        payments = await self.client.v1.invoice_payments.list_async(
            {"invoice": invoice_id, "expand": ["data.payment.payment_intent.latest_charge.balance_transaction"]}
        )
        fee, intent_id = 0, None
        for payment in plain(payments)["data"]:
            intent = (payment.get("payment") or {}).get("payment_intent")
            if isinstance(intent, dict):
                intent_id = intent["id"]
                charge = intent.get("latest_charge")
                if isinstance(charge, dict) and isinstance(charge.get("balance_transaction"), dict):
                    fee += charge["balance_transaction"]["fee"]
            elif isinstance(intent, str):
                intent_id = intent
        return fee, intent_id

    async def payment_failed(self, conn: Connection, invoice: dict[str, Any], event: dict[str, Any]) -> None:
        user = await self._invoice_user(conn, invoice)
        if user is None or self._ended(user, invoice):
            return
        link = invoice.get("hosted_invoice_url") or ""
        await conn.execute(
            "UPDATE users SET status = 'past_due', past_due_since = coalesce(past_due_since, $2),"
            " failed_invoice_url = $3 WHERE id = $1",
            user["id"],
            _at(event["created"]),
            link or None,
        )
        await self.ledger.set_status(user["id"], AccountStatus.PAST_DUE)
        action = "needs your confirmation" if event["type"] == "invoice.payment_action_required" else "failed"
        _OUTCOME.get().mail.append(
            (
                user["email"],
                f"Payment {action}: your {user['tier']} plan",
                f"The payment for your {user['tier']} plan {action}.\n\nPay or confirm it here: {link}\n\n"
                f"Your remaining credits stay usable for {self.grace.days} days; after that the account "
                "is limited to the free tier until the invoice is paid.\n",
            )
        )

    # subscriptions and checkout -----------------------------------------------------------
    async def checkout_completed(self, conn: Connection, session: dict[str, Any], event: dict[str, Any]) -> None:
        user = await self._user(conn, user_id=session.get("client_reference_id"))
        if user is not None and session.get("subscription") not in user["ended_subscriptions"]:
            await conn.execute(
                "UPDATE users SET stripe_customer_id = coalesce($2, stripe_customer_id),"
                " stripe_subscription_id = coalesce($3, stripe_subscription_id) WHERE id = $1",
                user["id"],
                session.get("customer"),
                session.get("subscription"),
            )

    async def subscription_updated(self, conn: Connection, sub: dict[str, Any], event: dict[str, Any]) -> None:
        user = await self._user(
            conn, user_id=(sub.get("metadata") or {}).get("user_id"), subscription=sub["id"], customer=sub.get("customer")
        )
        if user is None or self._other_subscription(user, sub):
            return
        created = _at(event["created"])
        if user["subscription_synced_at"] is not None and created < user["subscription_synced_at"]:
            log.info("ignoring %s: older than the subscription state already applied", event["id"])
            return
        status = sub["status"]
        past_due = status in ("past_due", "unpaid")
        await conn.execute(
            "UPDATE users SET subscription_status = $2, cancel_at_period_end = $3, subscription_synced_at = $4,"
            " past_due_since = CASE WHEN $5 THEN coalesce(past_due_since, $4) END,"
            " status = CASE WHEN status = 'suspended' THEN status WHEN $5 THEN 'past_due' ELSE 'active' END"
            " WHERE id = $1",
            user["id"],
            status,
            bool(sub.get("cancel_at_period_end")),
            created,
            past_due,
        )
        if user["status"] != "suspended":
            await self.ledger.set_status(user["id"], AccountStatus.PAST_DUE if past_due else AccountStatus.ACTIVE)

    async def subscription_deleted(self, conn: Connection, sub: dict[str, Any], event: dict[str, Any]) -> None:
        user = await self._user(
            conn, user_id=(sub.get("metadata") or {}).get("user_id"), subscription=sub["id"], customer=sub.get("customer")
        )
        if user is None:
            return
        if not self._other_subscription(user, sub):  # a late deletion of an older one changes no plan
            ended = (sub.get("ended_at") or event["created"]) * 1000
            await self._to_free_tier(conn, user, ended, f"end_{sub['id']}", TierChange.CANCEL, event["id"])
            await conn.execute(
                "UPDATE users SET stripe_subscription_id = NULL, subscription_status = 'canceled', cancel_at_period_end = false,"
                " subscription_synced_at = greatest(subscription_synced_at, $2) WHERE id = $1",
                user["id"],
                _at(event["created"]),
            )
        await conn.execute(
            "UPDATE users SET ended_subscriptions = array_append(ended_subscriptions, $2) WHERE id = $1", user["id"], sub["id"]
        )

    @staticmethod
    def _other_subscription(user: asyncpg.Record, sub: dict[str, Any]) -> bool:
        """Whether ``sub`` is not the user's current subscription (one that ended before it)."""
        return user["stripe_subscription_id"] not in (None, sub["id"])

    async def _to_free_tier(
        self, conn: Connection, user: asyncpg.Record, start_ms: int, ledger_id: str, kind: TierChange, source: str
    ) -> None:
        tiers = self.config.current.tiers
        free = tiers.default_tier
        await self.ledger.start_cycle(
            user["id"],
            tier=free,
            allowance=tiers.tiers[free].allowance_micro,
            cycle=Cycle(start_ms, tiers.cycle_end(start_ms), auto_renew=True),
            event_id=ledger_id,
            reason=f"{kind}: back to {free}",
        )
        await self.ledger.set_status(user["id"], AccountStatus.ACTIVE)
        await conn.execute("UPDATE users SET tier = $2, status = 'active', past_due_since = NULL WHERE id = $1", user["id"], free)
        if user["tier"] != free:
            await record_tier_change(conn, user["id"], user["tier"], free, kind, source)

    async def lapse_past_due(self, now: datetime) -> int:
        """Limit accounts past due for longer than the grace period to the free tier."""
        lapsed = 0
        async with self.pool.acquire() as conn:
            due = await conn.fetch(
                "SELECT id FROM users WHERE past_due_since < $1 AND tier <> $2",
                now - self.grace,
                self.config.current.tiers.default_tier,
            )
            for row in due:
                async with conn.transaction():
                    user = await self._user(conn, user_id=row["id"])
                    if user is None or user["past_due_since"] is None:
                        continue
                    stamp = int(user["past_due_since"].timestamp())
                    await self._to_free_tier(
                        conn, user, int(now.timestamp() * 1000), f"lapse_{user['id']}_{stamp}", TierChange.LAPSE, "grace period"
                    )
                    await conn.execute(
                        "UPDATE users SET status = 'past_due', past_due_since = $2 WHERE id = $1",
                        user["id"],
                        user["past_due_since"],
                    )
                    await self.ledger.set_status(user["id"], AccountStatus.PAST_DUE)
                    lapsed += 1
        return lapsed

    # refunds and disputes -----------------------------------------------------------------
    async def charge_refunded(self, conn: Connection, charge: dict[str, Any], event: dict[str, Any]) -> None:
        await conn.execute(
            "UPDATE invoices SET refunded = $2 WHERE payment_intent = $1",
            charge.get("payment_intent"),
            charge.get("amount_refunded") or 0,
        )

    async def dispute_changed(self, conn: Connection, dispute: dict[str, Any], event: dict[str, Any]) -> None:
        await conn.execute(
            "UPDATE invoices SET disputed = $2 WHERE payment_intent = $1", dispute.get("payment_intent"), withdrawn_cents(dispute)
        )


HANDLERS: dict[str, Handler] = {
    "invoice.paid": Effects.invoice_paid,
    "invoice.payment_failed": Effects.payment_failed,
    "invoice.payment_action_required": Effects.payment_failed,
    "checkout.session.completed": Effects.checkout_completed,
    "customer.subscription.updated": Effects.subscription_updated,
    "customer.subscription.deleted": Effects.subscription_deleted,
    "charge.refunded": Effects.charge_refunded,
    "charge.dispute.created": Effects.dispute_changed,
    "charge.dispute.closed": Effects.dispute_changed,
}
