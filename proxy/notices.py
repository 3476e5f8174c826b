"""Usage warnings by email: the ledger script emits one ``warning`` event per metric per
cycle when usage crosses the tier's threshold; the worker mails it to the user."""

from __future__ import annotations

from .db import Connection
from .ledger import UsageWarning
from .mail import Mailer
from .money import credits


def _amount(metric: str, value: int) -> str:
    return f"{credits(value)} credits" if metric == "credits" else f"{value:,} {metric}"


class UsageWarnings:
    """Sends the warning emails of a batch of ledger-stream events."""

    def __init__(self, mailer: Mailer):
        self.mailer = mailer

    async def send(self, conn: Connection, warnings: list[UsageWarning]) -> int:
        """Mail each warning to its user; returns how many were delivered."""
        rows = await conn.fetch("SELECT id, email FROM users WHERE id = ANY($1::text[])", list({w.user_id for w in warnings}))
        emails: dict[str, str] = {row["id"]: row["email"] for row in rows}
        sent = 0
        for w in warnings:
            if w.user_id not in emails:
                continue
            metric, used, limit = w.metric, w.used, w.limit
            share = used * 100 // limit
            sent += await self.mailer.send(
                emails[w.user_id],
                f"You have used {share}% of this cycle's {metric}",
                f"Your account has used {_amount(metric, used)} of the {_amount(metric, limit)} in this billing cycle "
                f"({share}%).\n\nWhen they run out, requests are refused until the cycle renews. Upgrade your plan "
                "(POST /api/credits/upgrade) to raise the limit.\n",
            )
        return sent
