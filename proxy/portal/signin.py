"""Signing in by e-mail link: ask for a link, open it, confirm, get a session.

Asking for a link answers the same page whether or not the address has an account (the
first sign-in creates it), and the mail is sent in the background, so neither the answer
nor its timing says whether an address is known. Only a plain address (a dot-atom local
part, a host name) is accepted, so no spelling of one mailbox ("name <addr>", lists,
trailing dots) counts as another address. Opening a link shows a button that signs in with
a POST (mail scanners that fetch links do not use them up), naming the account it signs in
to and, in a browser signed in to another, that it will switch accounts.
"""

from __future__ import annotations

import re

from aiohttp import web

from ..accounts import ConflictError
from ..http_json import accounts
from ..mail import Mailer
from ..state import CONFIG, SETTINGS
from ..tasks import Background
from .guard import (
    clear_session_cookie,
    client_address,
    form_page,
    set_session_cookie,
    signed_in,
    store,
)
from .pages import render
from .store import LINK_LIFETIME

MAILER = web.AppKey("portal_mailer", Mailer)
SENDING = web.AppKey("portal_sending", Background)
_ATOM = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_EMAIL = re.compile(rf"(?=[^@]{{1,64}}@){_ATOM}(?:\.{_ATOM})*@(?:{_LABEL}\.)+[a-z](?:[a-z0-9-]{{0,61}}[a-z0-9])?")
LINK_MINUTES = int(LINK_LIFETIME.total_seconds() // 60)
SENT = f"If that address can receive mail, a sign-in link is on its way. It works once, within {LINK_MINUTES} minutes."
TOO_MANY = "Too many sign-in links were asked for; wait a few minutes and try again."
INVALID = "Enter an e-mail address such as you@example.com."
BAD_LINK = "This sign-in link has expired or was used already. Ask for a new one below."
SWITCH = "This browser is signed in as {current}: signing in will switch it from {current} to {email}."


def normalise_email(raw: object) -> str | None:
    """An address as links are sent and counted: trimmed, lower case; None if it is not a
    plain address (``local@host.example``, nothing around it)."""
    email = str(raw or "").strip().lower()
    return email if len(email) <= 254 and _EMAIL.fullmatch(email) else None


def _link_mail(base_url: str, token: str) -> tuple[str, str]:
    return (
        "Your sign-in link",
        f"Sign in to your API account:\n\n{base_url}/portal/link?token={token}\n\n"
        f"The link works once, within {LINK_MINUTES} minutes. If you did not ask for it, ignore this message.\n",
    )


async def sign_in_form(request: web.Request) -> web.StreamResponse:
    """``GET /portal/sign-in``: the form asking for an address (a signed-in browser goes home)."""
    if signed_in(request):
        raise web.HTTPSeeOther("/portal/")
    return form_page(request, "sign-in.html", message="")


async def ask_for_link(request: web.Request) -> web.Response:
    """``POST /portal/sign-in`` (form ``email``): mail a sign-in link; the same answer for
    every address, 429 past the rate limits."""
    email = normalise_email((await request.post()).get("email"))
    if email is None:
        return form_page(request, "sign-in.html", 400, message=INVALID)
    token = await store(request).new_link(email, client_address(request))
    if token is None:
        return form_page(request, "sign-in.html", 429, message=TOO_MANY)
    subject, body = _link_mail(request.config_dict[SETTINGS].portal_base_url, token)
    request.config_dict[SENDING].spawn(request.config_dict[MAILER].send(email, subject, body))
    return form_page(request, "sign-in.html", message=SENT)


async def open_link(request: web.Request) -> web.Response:
    """``GET /portal/link?token=``: a button that signs in with the link's token, naming the
    address it signs in as and, when this browser is signed in to another account, that it
    will switch to this one (the link stays unused until the button is pressed)."""
    token = request.query.get("token", "")
    email = await store(request).link_email(token)
    if email is None:
        return form_page(request, "sign-in.html", 400, message=BAD_LINK)
    session = signed_in(request)
    current = await store(request).email_of(session.user_id) if session else None
    switch = SWITCH.format(current=current, email=email) if current and current.lower() != email else ""
    return form_page(request, "link.html", token=token, email=email, switch=switch)


async def use_link(request: web.Request) -> web.Response:
    """``POST /portal/link`` (form ``token``): sign in, creating the account on the first
    sign-in (its first key is shown on the page this once), else on to the portal."""
    email = await store(request).use_link(str((await request.post()).get("token", "")))
    if email is None:
        return form_page(request, "sign-in.html", 400, message=BAD_LINK)
    service = accounts(request)
    user_id, key = await service.user_for_email(email), None
    if user_id is None:
        try:
            user_id, key = await service.create_user(email, request.config_dict[CONFIG].current.tiers.default_tier, "portal")
        except ConflictError:  # another link for this address was used at the same moment
            user_id = await service.user_for_email(email)
            assert user_id is not None
    if key is None:
        response = web.Response(status=303, headers={"Location": "/portal/"})
    else:
        base_url = request.config_dict[SETTINGS].portal_base_url
        response = render("welcome.html", api_key=key.api_key, email=email, base_url=base_url)
    session = await store(request).open_session(user_id, request.headers.get("User-Agent", ""), client_address(request))
    set_session_cookie(response, request, session)
    return response


async def sign_out(request: web.Request) -> web.StreamResponse:
    """``POST /portal/sign-out``: end this browser's session."""
    session = signed_in(request)
    if session is not None:
        await store(request).revoke(session.user_id, session.id)
    response = web.HTTPSeeOther("/portal/sign-in")
    clear_session_cookie(response)
    raise response
