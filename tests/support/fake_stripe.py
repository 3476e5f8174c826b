"""A local stand-in for the Stripe API endpoints costproxy calls, and event builders.

The fake records every call (method, path, form fields, idempotency key) in
``app[CALLS]``; ``app[STATE]`` holds the subscriptions, preview amounts and fees it
serves, and the invoices, refunds, disputes and balance transactions its list endpoints
page through (newest first, ``page_size`` at a time, filtered by ``created[gt|gte|lt|lte]``,
``status`` and ``payment_intent``, continued by ``starting_after``, in Stripe's list shape).
Event builders produce objects in the current API shape (billing period on
subscription items and invoice lines, the subscription of an invoice under
``parent.subscription_details``, prices under ``pricing.price_details``).

One payment per invoice, named after it: invoice ``in_x`` is paid by payment intent
``pi_in_x`` through charge ``ch_in_x``, whose balance transaction is ``txn_in_x``.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
import stripe
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.settings import Settings

CALLS = web.AppKey("calls", list)
STATE = web.AppKey("state", dict)
#: the webhook signing secret of the tests' listener (``deliver`` signs with it)
WEBHOOK_SECRET = "whsec_test_secret"
API_VERSION = "2026-10-28.endive"
DAY = 86_400


@dataclass
class Call:
    method: str
    path: str
    form: dict[str, str]
    idempotency_key: str | None


@dataclass
class FakeState:
    subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    preview_amount: int = 0
    fees: dict[str, int] = field(default_factory=dict)  # invoice id -> Stripe fee in cents
    invoices: list[dict[str, Any]] = field(default_factory=list)  # GET /v1/invoices
    refunds: list[dict[str, Any]] = field(default_factory=list)  # GET /v1/refunds
    disputes: list[dict[str, Any]] = field(default_factory=list)  # GET /v1/disputes
    #: GET /v1/balance_transactions; each ``source`` is held expanded and served as its id
    #: unless the request expands ``data.source``
    balance_transactions: list[dict[str, Any]] = field(default_factory=list)
    page_size: int = 2
    #: list path -> ids of every object served from it
    served: dict[str, set[str]] = field(default_factory=dict)


def payment_intent_id(invoice_id: str) -> str:
    return f"pi_{invoice_id}"


def charge_id(invoice_id: str) -> str:
    return f"ch_{invoice_id}"


def _record(request: web.Request, form: dict[str, str]) -> None:
    request.app[CALLS].append(Call(request.method, request.path, form, request.headers.get("Idempotency-Key")))


async def _form(request: web.Request) -> dict[str, str]:
    form = dict((await request.post()).items()) if request.method == "POST" else dict(request.query.items())
    _record(request, {k: str(v) for k, v in form.items()})
    return form


def _json(data: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


async def checkout_session(request: web.Request) -> web.Response:
    form = await _form(request)
    sid = f"cs_test_{uuid.uuid4().hex[:8]}"
    return _json(
        {
            "id": sid,
            "object": "checkout.session",
            "url": f"https://checkout.stripe.test/{sid}",
            "mode": form.get("mode"),
            "client_reference_id": form.get("client_reference_id"),
        }
    )


async def portal_session(request: web.Request) -> web.Response:
    await _form(request)
    return _json({"id": "bps_test_1", "object": "billing_portal.session", "url": "https://billing.stripe.test/session/1"})


async def subscription(request: web.Request) -> web.Response:
    await _form(request)
    sub = request.app[STATE].subscriptions.get(request.match_info["id"])
    if sub is None:
        return web.json_response({"error": {"type": "invalid_request_error", "message": "No such subscription"}}, status=404)
    return _json(sub)


async def invoice_preview(request: web.Request) -> web.Response:
    await _form(request)
    return _json({"id": None, "object": "invoice", "amount_due": request.app[STATE].preview_amount, "currency": "usd"})


async def schedule(request: web.Request) -> web.Response:
    form = await _form(request)
    sub = request.app[STATE].subscriptions.get(form.get("from_subscription", ""))
    item = next(iter(request.app[STATE].subscriptions.values()))["items"]["data"][0] if sub is None else sub["items"]["data"][0]
    return _json(
        {
            "id": "sub_sched_1",
            "object": "subscription_schedule",
            "phases": [{"start_date": item["current_period_start"], "end_date": item["current_period_end"]}],
        }
    )


async def invoice_payments(request: web.Request) -> web.Response:
    form = await _form(request)
    invoice_id = form["invoice"]
    fee = request.app[STATE].fees.get(invoice_id, 0)
    payment = {
        "id": f"inpay_{invoice_id}",
        "object": "invoice_payment",
        "invoice": invoice_id,
        "status": "paid",
        "payment": {
            "type": "payment_intent",
            "payment_intent": {
                "id": payment_intent_id(invoice_id),
                "object": "payment_intent",
                "latest_charge": {
                    "id": charge_id(invoice_id),
                    "object": "charge",
                    "balance_transaction": {"id": f"txn_{invoice_id}", "object": "balance_transaction", "fee": fee},
                },
            },
        },
    }
    return _json({"object": "list", "data": [payment], "has_more": False, "url": "/v1/invoice_payments"})


# list endpoints -----------------------------------------------------------------------------
_RANGE = {"gt": int.__gt__, "gte": int.__ge__, "lt": int.__lt__, "lte": int.__le__}


def _selected(obj: dict[str, Any], query: dict[str, str]) -> bool:
    for op, compare in _RANGE.items():
        bound = query.get(f"created[{op}]")
        if bound is not None and not compare(obj["created"], int(bound)):
            return False
    return all(obj.get(name) == query[name] for name in ("status", "payment_intent") if name in query)


def _served_form(obj: dict[str, Any], expand: set[str]) -> dict[str, Any]:
    """The object as the list serves it: expandable fields as ids unless expanded."""
    if obj["object"] == "balance_transaction" and "data.source" not in expand:
        return {**obj, "source": obj["source"]["id"]}
    if obj["object"] == "invoice" and "data.payments" in expand:
        intent = payment_intent_id(obj["id"])
        payment = {
            "id": f"inpay_{obj['id']}",
            "object": "invoice_payment",
            "invoice": obj["id"],
            "amount_paid": obj["amount_paid"],
            "status": "paid",
            "payment": {"type": "payment_intent", "payment_intent": intent},
        }
        return {**obj, "payments": {"object": "list", "data": [payment], "has_more": False, "url": "/v1/invoice_payments"}}
    return obj


def _list(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A list endpoint over ``FakeState.<name>``, newest first, ``page_size`` per page."""

    async def handler(request: web.Request) -> web.Response:
        query = await _form(request)
        state = request.app[STATE]
        expand = {value for key, value in query.items() if key.startswith("expand[")}
        selected = sorted((o for o in getattr(state, name) if _selected(o, query)), key=lambda o: -o["created"])
        after = query.get("starting_after")
        if after is not None:
            selected = selected[[o["id"] for o in selected].index(after) + 1 :]
        size = min(state.page_size, int(query.get("limit", "10")))
        page = selected[:size]
        state.served.setdefault(request.path, set()).update(o["id"] for o in page)
        return _json(
            {
                "object": "list",
                "data": [_served_form(o, expand) for o in page],
                "has_more": len(selected) > size,
                "url": request.path,
            }
        )

    return handler


def fake_stripe_app(state: FakeState) -> web.Application:
    """The fake API server."""
    app = web.Application()
    app[CALLS] = []
    app[STATE] = state
    app.router.add_post("/v1/checkout/sessions", checkout_session)
    app.router.add_post("/v1/billing_portal/sessions", portal_session)
    app.router.add_get("/v1/subscriptions/{id}", subscription)
    app.router.add_post("/v1/subscriptions/{id}", subscription)
    app.router.add_post("/v1/invoices/create_preview", invoice_preview)
    app.router.add_post("/v1/subscription_schedules", schedule)
    app.router.add_post("/v1/subscription_schedules/{id}", schedule)
    app.router.add_get("/v1/invoice_payments", invoice_payments)
    app.router.add_get("/v1/invoices", _list("invoices"))
    app.router.add_get("/v1/refunds", _list("refunds"))
    app.router.add_get("/v1/disputes", _list("disputes"))
    app.router.add_get("/v1/balance_transactions", _list("balance_transactions"))
    return app


# events -------------------------------------------------------------------------------------
def event(kind: str, obj: dict[str, Any], created: int) -> dict[str, Any]:
    return {
        "id": f"evt_{uuid.uuid4().hex[:12]}",
        "object": "event",
        "api_version": API_VERSION,
        "created": created,
        "livemode": False,
        "pending_webhooks": 1,
        "type": kind,
        "data": {"object": obj},
        "request": {"id": None, "idempotency_key": None},
    }


def line(price: str, start: int, end: int, amount: int, proration: bool = False, sub_item: str = "si_1") -> dict[str, Any]:
    return {
        "id": f"il_{uuid.uuid4().hex[:10]}",
        "object": "line_item",
        "amount": amount,
        "currency": "usd",
        "period": {"start": start, "end": end},
        "pricing": {
            "type": "price_details",
            "price_details": {"price": price, "product": f"prod_{price}"},
            "unit_amount_decimal": str(amount),
        },
        "parent": {
            "type": "subscription_item_details",
            "invoice_item_details": None,
            "subscription_item_details": {
                "subscription": "sub_1",
                "subscription_item": sub_item,
                "proration": proration,
                "proration_details": {"credited_items": None},
            },
        },
    }


def invoice(
    inv_id: str,
    reason: str,
    lines: list[dict[str, Any]],
    created: int,
    *,
    user_id: str,
    sub: str = "sub_1",
    customer: str = "cus_1",
) -> dict[str, Any]:
    paid = max(0, sum(ln["amount"] for ln in lines))
    return {
        "id": inv_id,
        "object": "invoice",
        "customer": customer,
        "billing_reason": reason,
        "currency": "usd",
        "amount_due": paid,
        "amount_paid": paid,
        "created": created,
        "status": "paid",
        "status_transitions": {"paid_at": created},
        "hosted_invoice_url": f"https://invoice.stripe.test/{inv_id}",
        "parent": {
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {"subscription": sub, "metadata": {"user_id": user_id}},
        },
        "lines": {"object": "list", "data": lines, "has_more": False, "url": f"/v1/invoices/{inv_id}/lines"},
    }


def subscription_obj(
    price: str,
    start: int,
    end: int,
    *,
    user_id: str,
    status: str = "active",
    cancel_at_period_end: bool = False,
    sub: str = "sub_1",
    customer: str = "cus_1",
) -> dict[str, Any]:
    return {
        "id": sub,
        "object": "subscription",
        "customer": customer,
        "status": status,
        "cancel_at_period_end": cancel_at_period_end,
        "metadata": {"user_id": user_id},
        "ended_at": None,
        "items": {
            "object": "list",
            "data": [
                {
                    "id": "si_1",
                    "object": "subscription_item",
                    "price": {"id": price},
                    "current_period_start": start,
                    "current_period_end": end,
                    "quantity": 1,
                }
            ],
        },
    }


def checkout_completed(user_id: str, created: int, sub: str = "sub_1", customer: str = "cus_1") -> dict[str, Any]:
    return event(
        "checkout.session.completed",
        {
            "id": "cs_test_1",
            "object": "checkout.session",
            "mode": "subscription",
            "client_reference_id": user_id,
            "customer": customer,
            "subscription": sub,
            "status": "complete",
            "payment_status": "paid",
        },
        created,
    )


def signed(evt: dict[str, Any], secret: str, timestamp: int | None = None) -> tuple[bytes, dict[str, str]]:
    """The body and headers Stripe would send for an event."""
    body = orjson.dumps(evt).decode()
    return body.encode(), {
        "Stripe-Signature": stripe.WebhookSignature.generate_signature_header(body, secret, timestamp),
        "Content-Type": "application/json",
    }


# objects the list endpoints serve -------------------------------------------------------------
def _on_payment(kind: str, object_id: str, invoice_id: str, amount: int, status: str, created: int) -> dict[str, Any]:
    """A ``kind`` object (refund, dispute) on the invoice's payment."""
    return {
        "id": object_id,
        "object": kind,
        "amount": amount,
        "charge": charge_id(invoice_id),
        "payment_intent": payment_intent_id(invoice_id),
        "currency": "usd",
        "created": created,
        "status": status,
    }


def refund(refund_id: str, invoice_id: str, amount: int, created: int, status: str = "succeeded") -> dict[str, Any]:
    """A refund of the invoice's payment."""
    return _on_payment("refund", refund_id, invoice_id, amount, status, created)


def dispute(dispute_id: str, invoice_id: str, amount: int, status: str, created: int) -> dict[str, Any]:
    """A dispute of the invoice's payment."""
    return _on_payment("dispute", dispute_id, invoice_id, amount, status, created)


def charge_transaction(invoice_id: str, amount: int, fee: int, created: int) -> dict[str, Any]:
    """The balance transaction of the invoice's charge: ``amount`` in, ``fee`` to Stripe."""
    charge = {"id": charge_id(invoice_id), "object": "charge", "amount": amount, "payment_intent": payment_intent_id(invoice_id)}
    return _transaction(f"txn_{invoice_id}", "charge", "charge", amount, fee, created, charge)


def dispute_transaction(disputed: dict[str, Any], fee: int, created: int) -> dict[str, Any]:
    """The balance transaction withdrawing a dispute's amount and its dispute fee."""
    return _transaction(f"txn_{disputed['id']}", "adjustment", "dispute", -disputed["amount"], fee, created, disputed)


def payout_transaction(payout_id: str, amount: int, created: int) -> dict[str, Any]:
    """The balance transaction of a payout to the operator's bank: no payment's."""
    payout = {"id": payout_id, "object": "payout", "amount": amount}
    return _transaction(f"txn_{payout_id}", "payout", "payout", -amount, 0, created, payout)


def _transaction(
    txn_id: str, kind: str, category: str, amount: int, fee: int, created: int, source: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": txn_id,
        "object": "balance_transaction",
        "amount": amount,
        "fee": fee,
        "net": amount - fee,
        "currency": "usd",
        "created": created,
        "type": kind,
        "reporting_category": category,
        "status": "available",
        "source": source,
    }


def with_fake_stripe(settings: Settings, fake: TestServer) -> Settings:
    """``settings`` pointed at the running fake Stripe ``fake``, signing with :data:`WEBHOOK_SECRET`."""
    return replace(
        settings,
        stripe_api_key="sk_test_fake",
        stripe_webhook_secret=WEBHOOK_SECRET,
        stripe_api_base=str(fake.make_url("")).rstrip("/"),
    )
