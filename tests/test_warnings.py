"""Usage warnings: a response header while over the threshold, one email per crossing per cycle."""

from __future__ import annotations

import email
import email.policy

from proxy.mail import Mailer
from proxy.notices import UsageWarnings
from proxy.usage import UsageLog


async def test_crossing_the_threshold_warns_in_headers_and_mails_once(make_customer, openai_client, ledger, redis, pool, smtp):
    # starter: 3,800,000 µ$ allowance, warning at 80% used, i.e. at a balance of 760,000 µ$ or less
    customer = await make_customer("starter", balance_micro=760_100)
    client = openai_client(customer.api_key)
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=[], max_tokens=5)
    assert raw.headers["x-credits-remaining"] == "75.9755"
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
    assert "used 304.0245 credits of the 380.0000 credits" in message.get_content()  # 3,800,000 − 759,755 µ$
    # no warning rows in the ledger: it holds money movements only
    kinds = await pool.fetch("SELECT DISTINCT kind FROM ledger WHERE user_id = $1", customer.user_id)
    assert {r["kind"] for r in kinds} == {"grant", "charge"}


async def test_under_the_threshold_no_warning(make_customer, openai_client):
    customer = await make_customer("starter")
    raw = await openai_client(customer.api_key).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=[], max_tokens=5)
    assert "x-credits-warning" not in raw.headers


async def test_smtp_credentials_in_the_url_are_percent_decoded():
    """Most SMTP logins are email addresses, written ``user%40example.com`` in SMTP_URL."""
    from aiosmtpd.smtp import AuthResult

    from .conftest import smtp_server

    logins = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append((auth_data.login.decode(), auth_data.password.decode()))
        return AuthResult(success=True)

    with smtp_server(authenticator=authenticator, auth_require_tls=False) as (inbox, port):
        mailer = Mailer(f"smtp://billing%40example.com:p%40ss%3Aword@127.0.0.1:{port}", "billing@example.com")
        assert await mailer.send("ada@example.com", "hello", "body")
    assert logins == [("billing@example.com", "p@ss:word")]
    assert len(inbox.messages) == 1
