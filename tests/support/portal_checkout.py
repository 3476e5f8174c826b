"""Stripe's hosted Checkout page, as the browser test needs it.

The fake Stripe API hands out ``https://checkout.stripe.test/<session>`` URLs. The browser
test routes that host to :meth:`FakeCheckout.handle` (Playwright's ``page.route``): a page
with a Pay button; paying does what Stripe would, delivering the signed
``checkout.session.completed``, ``invoice.paid`` and ``customer.subscription.updated``
events to the webhook listener, then sends the browser back to the session's success URL
(on the proxy under test, whose address the operator's base URL stands for).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from .fake_stripe import Call, FakeState, checkout_completed, event, invoice, line, subscription_obj

CHECKOUT_HOST = "https://checkout.stripe.test/"
Deliver = Callable[..., Awaitable[list[int]]]

_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Checkout (fake Stripe)</title></head>
<body><main><h1>Subscribe to {tier}</h1><form method="post" action="{url}/pay">
<button type="submit">Pay $19.00</button></form></main></body></html>"""


class FakeCheckout:
    """Checkout sessions of the fake Stripe API (its recorded ``calls``), paid for real:
    the subscription starts at ``start`` and renews at ``end``."""

    def __init__(self, calls: list[Call], state: FakeState, deliver: Deliver, proxy_url: str, start: int, end: int):
        self.calls, self.state, self.deliver = calls, state, deliver
        self.proxy_url = proxy_url
        self.start, self.end = start, end

    def _session(self) -> dict[str, str]:
        return next(c.form for c in reversed(self.calls) if c.path == "/v1/checkout/sessions")

    async def handle(self, route: Any) -> None:
        """Playwright route handler for ``https://checkout.stripe.test/**``."""
        request = route.request
        session = self._session()
        if request.method == "GET":
            await route.fulfill(
                status=200, content_type="text/html", body=_PAGE.format(tier=session["metadata[tier]"], url=request.url)
            )
            return
        await self.pay(session)
        back = urlsplit(session["success_url"])
        await route.fulfill(status=303, headers={"Location": f"{self.proxy_url}{back.path}#{back.fragment}"})

    async def pay(self, session: dict[str, str]) -> None:
        """What Stripe does when the customer pays: the subscription exists, its events arrive."""
        user_id, price = session["client_reference_id"], session["line_items[0][price]"]
        sub, customer = f"sub_{user_id}", f"cus_{user_id}"
        subscription = subscription_obj(price, self.start, self.end, user_id=user_id, sub=sub, customer=customer)
        self.state.subscriptions[sub] = subscription
        first = invoice(
            f"in_1_{user_id}",
            "subscription_create",
            [line(price, self.start, self.end, 1900)],
            self.start,
            user_id=user_id,
            sub=sub,
            customer=customer,
        )
        paid = (
            checkout_completed(user_id, self.start, sub, customer),
            event("invoice.paid", first, self.start),
            event("customer.subscription.updated", subscription, self.start),
        )
        assert await self.deliver(*paid) == [200] * len(paid), "the listener refused an event"
