"""A local stand-in for the Stripe API endpoints costproxy calls, and event builders.

The fake records every call (method, path, form fields, idempotency key) in
``app[CALLS]``; ``app[STATE]`` holds the subscriptions, preview amounts and fees it
serves. Event builders produce objects in the current API shape (billing period on
subscription items and invoice lines, the subscription of an invoice under
``parent.subscription_details``, prices under ``pricing.price_details``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
import stripe
from aiohttp import web

CALLS = web.AppKey("calls", list)
STATE = web.AppKey("state", dict)
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
    return _json({"id": sid, "object": "checkout.session", "url": f"https://checkout.stripe.test/{sid}",
                  "mode": form.get("mode"), "client_reference_id": form.get("client_reference_id")})


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
    return _json({"id": "sub_sched_1", "object": "subscription_schedule",
                  "phases": [{"start_date": item["current_period_start"], "end_date": item["current_period_end"]}]})


async def invoice_payments(request: web.Request) -> web.Response:
    form = await _form(request)
    invoice_id = form["invoice"]
    fee = request.app[STATE].fees.get(invoice_id, 0)
    payment = {
        "id": f"inpay_{invoice_id}", "object": "invoice_payment", "invoice": invoice_id, "status": "paid",
        "payment": {"type": "payment_intent", "payment_intent": {
            "id": f"pi_{invoice_id}", "object": "payment_intent",
            "latest_charge": {"id": f"ch_{invoice_id}", "object": "charge",
                              "balance_transaction": {"id": f"txn_{invoice_id}", "object": "balance_transaction", "fee": fee}},
        }},
    }
    return _json({"object": "list", "data": [payment], "has_more": False, "url": "/v1/invoice_payments"})


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
    return app


# events -------------------------------------------------------------------------------------
def event(kind: str, obj: dict[str, Any], created: int) -> dict[str, Any]:
    return {"id": f"evt_{uuid.uuid4().hex[:12]}", "object": "event", "api_version": API_VERSION, "created": created,
            "livemode": False, "pending_webhooks": 1, "type": kind, "data": {"object": obj},
            "request": {"id": None, "idempotency_key": None}}


def line(price: str, start: int, end: int, amount: int, proration: bool = False, sub_item: str = "si_1") -> dict[str, Any]:
    return {"id": f"il_{uuid.uuid4().hex[:10]}", "object": "line_item", "amount": amount, "currency": "usd",
            "period": {"start": start, "end": end},
            "pricing": {"type": "price_details", "price_details": {"price": price, "product": f"prod_{price}"}, "unit_amount_decimal": str(amount)},
            "parent": {"type": "subscription_item_details", "invoice_item_details": None,
                       "subscription_item_details": {"subscription": "sub_1", "subscription_item": sub_item, "proration": proration,
                                                     "proration_details": {"credited_items": None}}}}


def invoice(inv_id: str, reason: str, lines: list[dict[str, Any]], created: int, *, user_id: str,
            sub: str = "sub_1", customer: str = "cus_1") -> dict[str, Any]:
    paid = max(0, sum(ln["amount"] for ln in lines))
    return {"id": inv_id, "object": "invoice", "customer": customer, "billing_reason": reason, "currency": "usd",
            "amount_due": paid, "amount_paid": paid, "created": created, "status": "paid",
            "status_transitions": {"paid_at": created},
            "hosted_invoice_url": f"https://invoice.stripe.test/{inv_id}",
            "parent": {"type": "subscription_details", "quote_details": None,
                       "subscription_details": {"subscription": sub, "metadata": {"user_id": user_id}}},
            "lines": {"object": "list", "data": lines, "has_more": False, "url": f"/v1/invoices/{inv_id}/lines"}}


def subscription_obj(price: str, start: int, end: int, *, user_id: str, status: str = "active",
                     cancel_at_period_end: bool = False, sub: str = "sub_1", customer: str = "cus_1") -> dict[str, Any]:
    return {"id": sub, "object": "subscription", "customer": customer, "status": status,
            "cancel_at_period_end": cancel_at_period_end, "metadata": {"user_id": user_id}, "ended_at": None,
            "items": {"object": "list", "data": [{"id": "si_1", "object": "subscription_item", "price": {"id": price},
                                                 "current_period_start": start, "current_period_end": end, "quantity": 1}]}}


def checkout_completed(user_id: str, created: int, sub: str = "sub_1", customer: str = "cus_1") -> dict[str, Any]:
    return event("checkout.session.completed", {"id": "cs_test_1", "object": "checkout.session", "mode": "subscription",
                                                "client_reference_id": user_id, "customer": customer, "subscription": sub,
                                                "status": "complete", "payment_status": "paid"}, created)


def signed(evt: dict[str, Any], secret: str, timestamp: int | None = None) -> tuple[bytes, dict[str, str]]:
    """The body and headers Stripe would send for an event."""
    body = orjson.dumps(evt).decode()
    return body.encode(), {"Stripe-Signature": stripe.WebhookSignature.generate_signature_header(body, secret, timestamp),
                           "Content-Type": "application/json"}
