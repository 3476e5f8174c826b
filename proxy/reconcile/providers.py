"""``costproxy reconcile openai|anthropic``: a provider's own reports against the usage log."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import date

import aiohttp
import asyncpg

from .access import ReportAccess, ReportProvider
from .anthropic_reports import KINDS as ANTHROPIC_KINDS
from .anthropic_reports import NOTES as ANTHROPIC_NOTES
from .anthropic_reports import anthropic_books
from .compare import Books, Comparison, compare
from .openai_reports import KINDS as OPENAI_KINDS
from .openai_reports import openai_books
from .ours import our_books
from .pages import ReportError
from .report import Reconciliation, UsageKind

ReadBooks = Callable[[aiohttp.ClientSession, ReportAccess, date, date, Books], Awaitable[Books]]
_READERS: dict[ReportProvider, tuple[ReadBooks, tuple[UsageKind, ...], tuple[str, ...]]] = {
    ReportProvider.OPENAI: (openai_books, OPENAI_KINDS, ()),
    ReportProvider.ANTHROPIC: (anthropic_books, ANTHROPIC_KINDS, ANTHROPIC_NOTES),
}
_TIMEOUT = aiohttp.ClientTimeout(total=300, sock_connect=10)


def _scope_notes(access: ReportAccess) -> tuple[str, ...]:
    scope = "project" if access.provider is ReportProvider.OPENAI else "workspace"
    if not access.scope_id and not access.api_key_id:
        return ("the reports cover the whole organization: use by any other key shows as a difference",)
    if access.api_key_id:
        where = f"the {scope}'s" if access.scope_id else "the organization's"
        return (f"tokens are the key {access.api_key_id}'s, costs {where} (the cost report has no key filter)",)
    return ()


async def reconcile_provider(access: ReportAccess, pool: asyncpg.Pool, start: date, end: date) -> Reconciliation:
    """Compare ``access.provider``'s usage and cost reports of days ``start``..``end`` (UTC,
    inclusive) with the usage log, per day and model.

    Raises :class:`~proxy.reconcile.pages.ReportError` when a report cannot be read.
    """
    read, kinds, notes = _READERS[access.provider]
    ours = await our_books(pool, access.provider.value, start, end)
    async with aiohttp.ClientSession(timeout=_TIMEOUT) as session:
        try:
            theirs = await read(session, access, start, end, ours)
        except (KeyError, TypeError, AttributeError, ValueError, ArithmeticError) as exc:
            raise ReportError(f"{access.provider}: a report is not in the documented shape ({exc!r})") from None
    return compare(Comparison(access.provider.value, start, end, kinds, notes + _scope_notes(access)), ours, theirs)
