"""Stripe reconciliation: Stripe's paid invoices, refunds, disputes and fees against the
revenue records (``invoices``) that the webhook listener writes and the figures read.

Every amount is an integer number of cents of the invoice's currency. The subject of a
difference is an invoice id (a payment intent that no invoice on either side names is
its own subject); its day is the UTC day the invoice was paid, which is the period whose
revenue figure it changes. Compared, over the range's UTC days:

* ``amount_paid_cents``: every invoice paid (``status_transitions.paid_at``) in the
  range, in Stripe or in our records. Stripe lists invoices by ``created``, so invoices
  created up to ``PAYMENT_LOOKBACK`` before the range are read to find those paid late.
* ``fee_cents``: Stripe's fee on a payment (balance transactions of type ``charge`` or
  ``payment`` created in the range) against the invoice's ``stripe_fee``, for those
  payments and for every invoice paid in the range.
* ``refunded_cents`` / ``disputed_cents``: for every payment with a refund (a dispute)
  created in the range, and every invoice paid in the range we record as refunded
  (disputed), the payment's total in Stripe (all its refunds or disputes, whenever made)
  against ``refunded`` (``disputed``). A dispute's money is gone while it is open
  (``needs_response``, ``under_review``) and once ``lost``; one ``won``, ``prevented``
  or an inquiry (``warning_*``) takes nothing. Failed and canceled refunds return nothing.
* ``other_fee_cents``: any other fee Stripe took on these payments, e.g. a dispute's fee
  on its ``adjustment`` balance transaction. The revenue records have no place for one,
  so ours is 0 and every such fee is a difference: net revenue is overstated by it.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any

import asyncpg
import stripe

from ..billing.disputes import withdrawn_cents
from ..billing.stripe_api import plain, stripe_client
from ..settings import Settings
from .pages import midnight
from .report import Difference, Reconciliation

#: how long before its payment an invoice may have been created (Stripe retries for weeks)
PAYMENT_LOOKBACK = timedelta(days=62)
_PAGE = 100  # the most objects Stripe serves per page
_PAYMENTS = frozenset({"charge", "payment"})  # balance transaction types of a payment
_NOT_REFUNDED = frozenset({"failed", "canceled"})  # refund statuses that return nothing

NOTES = (
    "amounts in cents of the invoice currency",
    f"invoices created up to {PAYMENT_LOOKBACK.days} days before the range and paid in it are included",
    "Stripe fees tied to no payment (billing fees, payouts) are not compared",
)


class StripeKind(StrEnum):
    """The figures compared with Stripe, each in cents."""

    AMOUNT_PAID = "amount_paid_cents"
    FEE = "fee_cents"
    REFUNDED = "refunded_cents"
    DISPUTED = "disputed_cents"
    OTHER_FEE = "other_fee_cents"


@dataclass(frozen=True)
class Recorded:
    """One row of our ``invoices`` table."""

    invoice: str
    payment_intent: str | None
    paid_at: datetime
    amount_paid: int
    fee: int
    refunded: int
    disputed: int


@dataclass(frozen=True)
class PaidInvoice:
    """An invoice Stripe says was paid within the range."""

    invoice: str
    paid_at: datetime
    amount_paid: int
    payment_intents: tuple[str, ...]


@dataclass(frozen=True)
class StripeActivity:
    """What Stripe lists for the range: paid invoices, refunds, disputes, balance transactions."""

    invoices: tuple[PaidInvoice, ...]
    refunds: tuple[dict[str, Any], ...]
    disputes: tuple[dict[str, Any], ...]
    transactions: tuple[dict[str, Any], ...]

    def payment_intents(self) -> set[str]:
        """Every payment intent these objects name."""
        named = {pi for inv in self.invoices for pi in inv.payment_intents}
        named |= {obj["payment_intent"] for obj in (*self.refunds, *self.disputes) if obj.get("payment_intent")}
        return named | {pi for pi in map(_transaction_intent, self.transactions) if pi}


def _id(value: Any) -> str | None:
    """An expandable field's id, expanded or not."""
    return value.get("id") if isinstance(value, dict) else value


def _transaction_intent(transaction: dict[str, Any]) -> str | None:
    """The payment intent of a balance transaction's (expanded) source: a charge, refund or dispute."""
    source = transaction.get("source")
    return _id(source.get("payment_intent")) if isinstance(source, dict) else None


async def _every(first: Awaitable[stripe.ListObject[Any]]) -> list[dict[str, Any]]:
    """Every object of a list, following ``has_more`` / ``starting_after`` page by page."""
    page = await first
    return [plain(obj) async for obj in page.auto_paging_iter()]


def _paid_invoice(invoice: dict[str, Any]) -> PaidInvoice | None:
    paid_at = (invoice.get("status_transitions") or {}).get("paid_at")
    if paid_at is None:
        return None
    payments = (invoice.get("payments") or {}).get("data") or []
    intents = (_id((p.get("payment") or {}).get("payment_intent")) for p in payments if p.get("status") == "paid")
    return PaidInvoice(
        invoice["id"],
        datetime.fromtimestamp(paid_at, tz=UTC),
        invoice.get("amount_paid") or 0,
        tuple(pi for pi in intents if pi),
    )


async def fetch_activity(client: stripe.StripeClient, since: datetime, until: datetime) -> StripeActivity:
    """Stripe's invoices paid in ``[since, until)`` and its refunds, disputes and balance
    transactions created then, every page of each list."""
    gte, lt = int(since.timestamp()), int(until.timestamp())
    invoices, refunds, disputes, transactions = await asyncio.gather(
        _every(
            client.v1.invoices.list_async(
                {
                    "status": "paid",
                    "created": {"gte": int((since - PAYMENT_LOOKBACK).timestamp()), "lt": lt},
                    "expand": ["data.payments"],
                    "limit": _PAGE,
                }
            )
        ),
        _every(client.v1.refunds.list_async({"created": {"gte": gte, "lt": lt}, "limit": _PAGE})),
        _every(client.v1.disputes.list_async({"created": {"gte": gte, "lt": lt}, "limit": _PAGE})),
        _every(
            client.v1.balance_transactions.list_async(
                {"created": {"gte": gte, "lt": lt}, "expand": ["data.source"], "limit": _PAGE}
            )
        ),
    )
    paid = (_paid_invoice(invoice) for invoice in invoices)
    return StripeActivity(
        tuple(inv for inv in paid if inv is not None and since <= inv.paid_at < until),
        tuple(refunds),
        tuple(disputes),
        tuple(transactions),
    )


async def _refunded(client: stripe.StripeClient, payment_intent: str) -> int:
    """Everything refunded on a payment, whenever."""
    refunds = await _every(client.v1.refunds.list_async({"payment_intent": payment_intent, "limit": _PAGE}))
    return sum(r["amount"] for r in refunds if r.get("status") not in _NOT_REFUNDED)


async def _disputed(client: stripe.StripeClient, payment_intent: str) -> int:
    """Everything disputes withdrew from a payment and kept, whenever opened."""
    disputes = await _every(client.v1.disputes.list_async({"payment_intent": payment_intent, "limit": _PAGE}))
    return sum(withdrawn_cents(d) for d in disputes)


RECORDED_SQL = """
SELECT id, payment_intent, paid_at, amount_paid, stripe_fee, refunded, disputed FROM invoices
WHERE (paid_at >= $1 AND paid_at < $2) OR payment_intent = ANY($3::text[]) OR id = ANY($4::text[])
"""


async def recorded_invoices(
    pool: asyncpg.Pool, since: datetime, until: datetime, payment_intents: Iterable[str], invoices: Iterable[str]
) -> list[Recorded]:
    """Our invoices paid in ``[since, until)``, and those of the given payments or ids."""
    rows = await pool.fetch(RECORDED_SQL, since, until, list(payment_intents), list(invoices))
    return [
        Recorded(r["id"], r["payment_intent"], r["paid_at"], r["amount_paid"], r["stripe_fee"], r["refunded"], r["disputed"])
        for r in rows
    ]


class _Comparison:
    """Theirs and ours by (subject, kind), and the day each subject's revenue is booked on."""

    def __init__(self, activity: StripeActivity, recorded: list[Recorded], since: datetime, until: datetime):
        self.since, self.until = since, until
        self.ours = {row.invoice: row for row in recorded}
        self.stripe = {inv.invoice: inv for inv in activity.invoices}
        self.invoice_of = {row.payment_intent: row.invoice for row in recorded if row.payment_intent}
        self.invoice_of.update({pi: inv.invoice for inv in activity.invoices for pi in inv.payment_intents})
        self.theirs: dict[tuple[str, StripeKind], int] = defaultdict(int)

    def subject(self, payment_intent: str) -> str:
        """The invoice a payment paid, by Stripe's account or ours; else the payment itself."""
        return self.invoice_of.get(payment_intent, payment_intent)

    def paid_here(self) -> set[str]:
        """Invoices paid in the range, by either side's account."""
        ours = {row.invoice for row in self.ours.values() if self.since <= row.paid_at < self.until}
        return ours | set(self.stripe)

    def ours_of(self, subject: str, kind: StripeKind) -> int:
        """Our figure: the invoice's amount only if we record it paid in the range."""
        row = self.ours.get(subject)
        if row is None:
            return 0
        match kind:
            case StripeKind.AMOUNT_PAID:
                return row.amount_paid if self.since <= row.paid_at < self.until else 0
            case StripeKind.FEE:
                return row.fee
            case StripeKind.REFUNDED:
                return row.refunded
            case StripeKind.DISPUTED:
                return row.disputed
            case StripeKind.OTHER_FEE:
                return 0

    def day(self, subject: str) -> date | None:
        """The UTC day the subject was paid, by Stripe's account first."""
        if subject in self.stripe:
            return self.stripe[subject].paid_at.date()
        row = self.ours.get(subject)
        return row.paid_at.astimezone(UTC).date() if row else None

    def compare(self, subject: str, kind: StripeKind, theirs: int) -> None:
        """Count ``theirs`` towards the subject's figure and mark the figure compared."""
        self.theirs[subject, kind] += theirs

    def differences(self) -> list[Difference]:
        """Every compared figure on which ours and theirs differ, by day, subject and kind."""
        found = []
        for (subject, kind), theirs in self.theirs.items():
            ours = self.ours_of(subject, kind)
            if ours != theirs:
                found.append(Difference(self.day(subject), subject, kind, ours, theirs))
        order = list(StripeKind)
        return sorted(found, key=lambda d: (d.day or date.min, d.subject, order.index(StripeKind(d.kind))))

    def subjects(self) -> int:
        """How many subjects were compared."""
        return len({subject for subject, _ in self.theirs})


async def _compare(client: stripe.StripeClient, cmp: _Comparison, activity: StripeActivity) -> None:
    """Every figure of the module docstring, theirs counted into ``cmp``."""
    paid = cmp.paid_here()
    for subject in paid:
        cmp.compare(subject, StripeKind.AMOUNT_PAID, 0)
        cmp.compare(subject, StripeKind.FEE, 0)
    for inv in activity.invoices:
        cmp.compare(inv.invoice, StripeKind.AMOUNT_PAID, inv.amount_paid)
    for txn in activity.transactions:
        intent, fee = _transaction_intent(txn), txn.get("fee") or 0
        if intent is not None and txn.get("type") in _PAYMENTS:
            cmp.compare(cmp.subject(intent), StripeKind.FEE, fee)
        elif intent is not None and fee:
            cmp.compare(cmp.subject(intent), StripeKind.OTHER_FEE, fee)
    recorded_here = [cmp.ours[invoice] for invoice in paid if invoice in cmp.ours]
    for kind, objects, total in (
        (StripeKind.REFUNDED, activity.refunds, _refunded),
        (StripeKind.DISPUTED, activity.disputes, _disputed),
    ):
        intents = {obj["payment_intent"] for obj in objects if obj.get("payment_intent")}
        intents |= {row.payment_intent for row in recorded_here if row.payment_intent and cmp.ours_of(row.invoice, kind)}
        for intent in sorted(intents):
            cmp.compare(cmp.subject(intent), kind, await total(client, intent))


async def reconcile_stripe(settings: Settings, pool: asyncpg.Pool, start: date, end: date) -> Reconciliation:
    """Compare Stripe with our revenue records for the UTC days ``start``..``end`` (inclusive).

    Reads Stripe at ``STRIPE_API_BASE`` with ``STRIPE_API_KEY``; every difference is listed
    with ours and theirs in cents (kinds: :class:`StripeKind`); the module docstring says
    what is compared.
    """
    since, until = midnight(start), midnight(end + timedelta(days=1))
    async with stripe_client(settings) as client:
        activity = await fetch_activity(client, since, until)
        recorded = await recorded_invoices(
            pool, since, until, activity.payment_intents(), (inv.invoice for inv in activity.invoices)
        )
        cmp = _Comparison(activity, recorded, since, until)
        await _compare(client, cmp, activity)
    return Reconciliation(
        source="stripe",
        start=start,
        end=end,
        rows=cmp.subjects(),
        kinds=tuple(StripeKind),
        differences=tuple(cmp.differences()),
        notes=NOTES,
    )
