"""Outgoing email over SMTP (``SMTP_URL``, ``MAIL_FROM``), sent with aiosmtplib."""

from __future__ import annotations

import logging
from email.message import EmailMessage
from urllib.parse import unquote, urlsplit

import aiosmtplib

log = logging.getLogger("costproxy.mail")


class Mailer:
    """Sends plain-text mail; with no ``SMTP_URL`` it only logs what it would send."""

    def __init__(self, smtp_url: str, sender: str):
        self.url = urlsplit(smtp_url) if smtp_url else None
        self.sender = sender

    async def send(self, to: str, subject: str, body: str) -> bool:
        """Send one message; False (and a log line) if it could not be delivered."""
        if self.url is None:
            log.info("SMTP_URL unset; not sending %r to %s", subject, to)
            return False
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = self.sender, to, subject
        message.set_content(body)
        try:
            await aiosmtplib.send(
                message,
                sender=self.sender,
                recipients=[to],  # never the addresses a parser might find in the To header
                hostname=self.url.hostname,
                port=self.url.port or (465 if self.url.scheme == "smtps" else 25),
                username=unquote(self.url.username) if self.url.username else None,  # user%40example.com
                password=unquote(self.url.password) if self.url.password else None,
                use_tls=self.url.scheme == "smtps",  # plain smtp:// upgrades with STARTTLS when offered
                timeout=10,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            log.warning("could not send %r to %s: %s", subject, to, exc)
            return False
        return True
