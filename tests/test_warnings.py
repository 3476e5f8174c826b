"""Usage warnings: a response header while over the threshold, one email per crossing per cycle."""

from __future__ import annotations

import email
import email.policy
from decimal import Decimal

from proxy.mail import Mailer
from proxy.notices import UsageWarnings
from proxy.usage import UsageLog

from .support.mail import smtp_server
from .support.money import ALLOWANCE, TIERS, credits_text

STARTER = TIERS.tiers["starter"]
#: the starter balance at which 80% of the allowance is used
AT_THRESHOLD = int(ALLOWANCE["starter"] * (1 - STARTER.warning_threshold))


async def test_crossing_the_threshold_warns_in_headers_and_mails_once(make_customer, openai_client, ledger, redis, pool, smtp):
    # starter: a warning at 80% of the allowance used, i.e. at a balance of AT_THRESHOLD or less
    assert STARTER.warning_threshold == Decimal("0.8")
    customer = await make_customer("starter", balance_micro=AT_THRESHOLD + 100)
    client = openai_client(customer.api_key)
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=[], max_tokens=5)
    assert raw.headers["x-credits-remaining"] == credits_text(AT_THRESHOLD + 100 - 345)
    assert raw.headers["x-credits-warning"] == "credits=80%"
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=[], max_tokens=5)
    assert raw.headers["x-credits-warning"] == "credits=80%"

    inbox, port = smtp
    log = UsageLog(redis, ledger, pool, warnings=UsageWarnings(Mailer(f"smtp://127.0.0.1:{port}", "costproxy@test")))
    while await log.drain_once():
        pass
    assert len(inbox.messages) == 1  # two requests over the threshold, one crossing, one email
    message = email.message_from_string(inbox.messages[0][1], policy=email.policy.default)
    assert message["Subject"] == "You have used 80% of this cycle's credits"
    used, allowance = credits_text(ALLOWANCE["starter"] - (AT_THRESHOLD + 100 - 345)), credits_text(ALLOWANCE["starter"])
    assert f"used {used} credits of the {allowance} credits" in message.get_content()
    # no warning rows in the ledger: it holds money movements only
    kinds = await pool.fetch("SELECT DISTINCT kind FROM ledger WHERE user_id = $1", customer.user_id)
    assert {r["kind"] for r in kinds} == {"grant", "charge"}


async def test_under_the_threshold_no_warning(make_customer, openai_client):
    customer = await make_customer("starter")
    client = openai_client(customer.api_key)
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=[], max_tokens=5)
    assert "x-credits-warning" not in raw.headers


async def test_smtp_credentials_in_the_url_are_percent_decoded():
    """Most SMTP logins are email addresses, written ``user%40example.com`` in SMTP_URL."""
    from aiosmtpd.smtp import AuthResult

    logins = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append((auth_data.login.decode(), auth_data.password.decode()))
        return AuthResult(success=True)

    with smtp_server(authenticator=authenticator, auth_require_tls=False) as (inbox, port):
        mailer = Mailer(f"smtp://billing%40example.com:p%40ss%3Aword@127.0.0.1:{port}", "billing@example.com")
        assert await mailer.send("ada@example.com", "hello", "body")
    assert logins == [("billing@example.com", "p@ss:word")]
    assert len(inbox.messages) == 1
