"""What a reconciliation found: typed differences between our records and a source's.

Every source (a provider's usage and cost reports, Stripe) is compared the same way: for a
day and a subject (a model, an invoice, ...) one integer figure of one kind, ours against
theirs, in the unit the kind names (``output_tokens``, ``cost_micro``, ``fee_cents``).
A difference's share is ``(ours − theirs) ÷ theirs``, exact; a figure the source does not
have at all (theirs is zero) has no share and always exceeds the tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction
from typing import Any

from ..money import round_half_up


class UsageKind(StrEnum):
    """The figures compared with a provider's usage and cost reports."""

    REQUESTS = "requests"
    INPUT_TOKENS = "input_tokens"  # uncached prompt tokens
    CACHED_INPUT_TOKENS = "cached_input_tokens"  # prompt tokens read from the cache
    CACHE_WRITE_TOKENS = "cache_write_tokens"  # prompt tokens written to the cache
    OUTPUT_TOKENS = "output_tokens"
    COST_MICRO = "cost_micro"


@dataclass(frozen=True)
class Difference:
    """One figure on which we and the source disagree.

    ``day`` is None for a figure that belongs to no day (e.g. a whole invoice);
    ``kind`` is any StrEnum whose value names the figure and its unit.
    """

    day: date | None
    subject: str
    kind: StrEnum
    ours: int
    theirs: int

    @property
    def delta(self) -> int:
        """Ours minus theirs."""
        return self.ours - self.theirs

    @property
    def share(self) -> Fraction | None:
        """``delta ÷ theirs`` exactly; None when the source's figure is zero."""
        return None if self.theirs == 0 else Fraction(self.delta, self.theirs)

    def exceeds(self, tolerance: Fraction | Decimal) -> bool:
        """True when the share's magnitude is above ``tolerance`` (always, without a share)."""
        share = self.share
        return share is None or abs(share) > Fraction(tolerance)

    def line(self) -> str:
        """One human-readable line."""
        day = self.day.isoformat() if self.day else "-"
        return (
            f"{day}  {self.subject}  {self.kind}: ours {self.ours}, theirs {self.theirs}, "
            f"difference {self.delta:+d} ({_percent(self.share)})"
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: the share as a decimal string with six places, or null."""
        share = self.share
        return {
            "day": self.day.isoformat() if self.day else None,
            "subject": self.subject,
            "kind": str(self.kind),
            "ours": self.ours,
            "theirs": self.theirs,
            "difference": self.delta,
            "share": None if share is None else str(round_half_up(share, 6)),
        }


def _percent(share: Fraction | None) -> str:
    return "not in their report" if share is None else f"{round_half_up(share * 100, 2):+}%"


@dataclass(frozen=True)
class Reconciliation:
    """The outcome of comparing one source with our records over ``start``..``end`` (inclusive).

    ``rows`` counts the (day, subject) pairs compared, ``kinds`` the figures compared in
    each, ``notes`` says what could not be compared as finely as the rest (e.g. costs only
    per day).
    """

    source: str
    start: date
    end: date
    rows: int
    kinds: tuple[StrEnum, ...]
    differences: tuple[Difference, ...]
    notes: tuple[str, ...] = field(default=())

    def exceeds(self, tolerance: Fraction | Decimal) -> bool:
        """True when any difference's share is beyond ``tolerance``."""
        return any(difference.exceeds(tolerance) for difference in self.differences)

    def largest_shares(self) -> dict[str, Fraction | None]:
        """Per kind compared, the largest share magnitude (0 when none differ; None: unbounded)."""
        largest: dict[str, Fraction | None] = {str(kind): Fraction(0) for kind in self.kinds}
        for difference in self.differences:
            kind, share = str(difference.kind), difference.share
            current = largest.get(kind, Fraction(0))
            if share is None or current is None:
                largest[kind] = None
            else:
                largest[kind] = max(current, abs(share))
        return largest

    def render(self) -> str:
        """The report as text: a summary line, the notes, then one line per difference."""
        kinds = ", ".join(str(kind) for kind in self.kinds)
        count = len(self.differences)
        lines = [
            f"{self.source} {self.start.isoformat()}..{self.end.isoformat()}: {self.rows} rows compared "
            f"({kinds}); {count} difference{'' if count == 1 else 's'}",
            *(f"note: {note}" for note in self.notes),
            *(difference.line() for difference in self.differences),
        ]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict of the whole report."""
        return {
            "source": self.source,
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "rows": self.rows,
            "kinds": [str(kind) for kind in self.kinds],
            "notes": list(self.notes),
            "differences": [difference.to_json() for difference in self.differences],
        }
