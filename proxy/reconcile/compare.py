"""Per day and model figures, ours and a provider's, and the comparison that finds where they differ."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from datetime import date

from .report import Difference, Reconciliation, UsageKind

#: the subject of a cost compared for a whole day, when the provider's cost lines do not name models
ALL_MODELS = "(all models)"
#: (UTC day, model)
DayModel = tuple[date, str]
_SNAPSHOT_DATE = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")


def model_family(model: str) -> str:
    """``model`` without a snapshot date: the reports name the snapshot that served a request
    (gpt-4o-mini-2024-07-18, claude-haiku-4-5-20251001) where the usage log has the id the
    client sent (gpt-4o-mini), so both are compared under the undated id."""
    return _SNAPSHOT_DATE.sub("", model)


@dataclass(frozen=True)
class Figures:
    """Token counts and requests of one day and model; the fields are named as :class:`UsageKind`."""

    requests: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Figures) -> Figures:
        return Figures(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def of(self, kind: UsageKind) -> int:
        """The figure of ``kind`` (a token kind or requests)."""
        value: int = getattr(self, kind.value)
        return value


@dataclass
class Books:
    """One side's figures over a period: usage per day and model, cost per day and model in µ$.

    Models are kept as their :func:`model_family`. A cost under the model ``None`` could not
    be attributed to a model (a provider's cost line that names none); a day with such a
    cost is compared as a whole.
    """

    usage: dict[DayModel, Figures] = field(default_factory=dict)
    cost: dict[date, dict[str | None, int]] = field(default_factory=dict)

    def add_usage(self, day: date, model: str, figures: Figures) -> None:
        key = (day, model_family(model))
        self.usage[key] = self.usage.get(key, Figures()) + figures

    def add_cost(self, day: date, model: str | None, micro: int) -> None:
        family = None if model is None else model_family(model)
        costs = self.cost.setdefault(day, {})
        costs[family] = costs.get(family, 0) + micro

    def models_on(self, day: date) -> set[str]:
        """The models this side has usage or cost of on ``day``."""
        return {model for d, model in self.usage if d == day} | {m for m in self.cost.get(day, {}) if m is not None}


@dataclass(frozen=True)
class Comparison:
    """What to compare: the source's name, the period (inclusive) and the token kinds its report carries."""

    source: str
    start: date
    end: date
    usage_kinds: tuple[UsageKind, ...]
    notes: tuple[str, ...] = ()


def compare(what: Comparison, ours: Books, theirs: Books) -> Reconciliation:
    """Every figure of ``what.usage_kinds`` and the cost, per day and model, ours against theirs."""
    differences: list[Difference] = []
    keys = sorted(k for k in set(ours.usage) | set(theirs.usage) if what.start <= k[0] <= what.end)
    for day, model in keys:
        mine, their = ours.usage.get((day, model), Figures()), theirs.usage.get((day, model), Figures())
        differences += [
            Difference(day, model, kind, mine.of(kind), their.of(kind))
            for kind in what.usage_kinds
            if mine.of(kind) != their.of(kind)
        ]
    days = sorted(d for d in set(ours.cost) | set(theirs.cost) if what.start <= d <= what.end)
    for day in days:
        mine_cost, their_cost = _costs_of(ours, theirs, day)
        differences += [
            Difference(day, model, UsageKind.COST_MICRO, mine_cost.get(model, 0), their_cost.get(model, 0))
            for model in sorted(set(mine_cost) | set(their_cost))
            if mine_cost.get(model, 0) != their_cost.get(model, 0)
        ]
    rows = len(set(keys) | {(day, ALL_MODELS) for day in days if None in theirs.cost.get(day, {})})
    return Reconciliation(
        source=what.source,
        start=what.start,
        end=what.end,
        rows=rows,
        kinds=(*what.usage_kinds, UsageKind.COST_MICRO),
        # stable: within a day and subject the kinds stay in the order compared
        differences=tuple(sorted(differences, key=lambda d: (d.day or date.min, d.subject))),
        notes=what.notes,
    )


def _costs_of(ours: Books, theirs: Books, day: date) -> tuple[dict[str, int], dict[str, int]]:
    """Both sides' costs of ``day`` by model, or as one day total when theirs names no model for some."""
    mine, their = ours.cost.get(day, {}), theirs.cost.get(day, {})
    if None in their:
        return {ALL_MODELS: sum(mine.values())}, {ALL_MODELS: sum(their.values())}
    return {m: v for m, v in mine.items() if m is not None}, {m: v for m, v in their.items() if m is not None}
