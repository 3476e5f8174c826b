"""The money vocabulary at the boundary between Python and the Lua scripts.

Modelled on TigerBeetle's two-phase transfers: admission places a :class:`Hold` (a pending
transfer), settlement posts or voids it exactly once. Every amount is an integer number of
micro-dollars (µ$); every time is milliseconds since the epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class LedgerReplyError(Exception):
    """A script answered something this code does not know: a bug or a version mismatch,
    never a refusal to show a caller."""


class NoAccountError(LookupError):
    """The account does not exist in Redis (never created, or lost with Redis's data)."""


#: every amount and count a script takes is an integer within ±2^50, so Lua's doubles keep it exact
MAX_AMOUNT = 2**50


class Policy(StrEnum):
    """How admission checks credits (``tiers.yaml``'s ``admission``)."""

    #: admit only if the request's worst case fits in balance minus holds
    STRICT = "strict"
    #: admit while balance minus holds is above zero
    LENIENT = "lenient"


class AccountStatus(StrEnum):
    """An account's standing; only ``suspended`` is refused at admission."""

    ACTIVE = "active"
    PAST_DUE = "past_due"
    SUSPENDED = "suspended"


class Refusal(StrEnum):
    """Why ``admit.lua`` placed no hold (the first element of its reply)."""

    NO_ACCOUNT = "no_account"
    #: the account's tier is not the one the request was priced for
    TIER_CHANGED = "tier"
    SUSPENDED = "suspended"
    TOKENS = "tokens"
    REQUESTS = "requests"
    RATE = "rpm"
    CREDITS = "credits"


@dataclass(frozen=True, slots=True)
class Hold:
    """A pending transfer: ``amount`` µ$ of ``account``'s credit reserved for one request
    until it is posted (charged its actual cost) or voided."""

    id: str
    account: str
    amount: int
    #: when admission placed it (ms; 0 where unknown, as for holds read back from the zset)
    placed_at: int = 0

    @property
    def member(self) -> str:
        """The hold's member of its shard's holds zset: it carries everything the expiry
        sweep needs, so a hold costs no key of its own."""
        return f"{self.id}|{self.account}|{self.amount}"

    @classmethod
    def from_member(cls, member: str) -> Hold:
        """The hold a zset member describes."""
        hold_id, account, amount = member.split("|")
        return cls(hold_id, account, int(amount))


@dataclass(frozen=True, slots=True)
class CycleLimits:
    """What a tier allows per cycle, as the scripts need it (built once per tier:
    :attr:`proxy.tiers.Tier.limits`). ``None`` means unlimited."""

    allowance: int
    monthly_tokens: int | None
    monthly_requests: int | None
    rpm: int | None
    policy: Policy
    #: share of a limit used, in per mille, at which usage is warned about once per cycle
    warning_permille: int


@dataclass(frozen=True, slots=True)
class Cycle:
    """A billing cycle's bounds; ``auto_renew`` cycles are renewed by the admission script
    (free and operator-created accounts), the others by paid invoices."""

    start_ms: int
    end_ms: int
    auto_renew: bool


@dataclass(frozen=True, slots=True)
class Renewal:
    """How the admission script renews a lapsed self-renewing cycle: by ``cycle_ms``, or
    (``cycle_ms`` 0) to the calendar month between the two bounds."""

    cycle_ms: int
    month_start_ms: int = 0
    month_end_ms: int = 0


#: the renewal that applies at a given time (:meth:`proxy.tiers.TiersFile.renewal`)
RenewalRule = Callable[[int], Renewal]


@dataclass(frozen=True, slots=True)
class Admission:
    """What ``admit.lua`` answered: a hold placed (``refusal`` is None) and the account's
    numbers then, or why not and what the refusal needs to say."""

    refusal: Refusal | None = None
    balance: int = 0
    held: int = 0
    tokens: int = 0
    requests: int = 0
    actual_tier: str | None = None
    retry_after_ms: int = 0
    #: with a credits, tokens or requests refusal: when the cycle renews
    cycle_end_ms: int = 0

    @property
    def admitted(self) -> bool:
        return self.refusal is None


@dataclass(frozen=True, slots=True)
class Resolution:
    """Outcome of posting or voiding a hold: the account after it, and ``duplicate`` if
    the hold had already been resolved (a retry whose first attempt went through)."""

    duplicate: bool
    balance: int = 0
    held: int = 0
    tokens: int = 0
    requests: int = 0
    #: the hold was posted (charged), not voided
    posted: bool = False


def _int(raw: Mapping[str, str], name: str) -> int:
    return int(raw.get(name) or 0)


@dataclass(frozen=True, slots=True)
class Account:
    """An account as Redis holds it: the live balance, open holds and this cycle's usage."""

    user_id: str
    tier: str
    status: AccountStatus
    balance: int
    held: int
    open_holds: int
    tokens: int
    requests: int
    #: upstream cost charged this cycle, µ$
    cost: int
    cycle_start: int
    cycle_end: int
    auto_renew: bool

    @property
    def available(self) -> int:
        """Balance minus open holds: what admission may still spend."""
        return self.balance - self.held

    @classmethod
    def from_hash(cls, user_id: str, fields: Mapping[str, str]) -> Account:
        """The account from its Redis hash (``HGETALL``, decoded)."""
        return cls(
            user_id=user_id,
            tier=fields.get("tier", ""),
            status=AccountStatus(fields.get("status") or AccountStatus.ACTIVE),
            balance=_int(fields, "balance"),
            held=_int(fields, "held"),
            open_holds=_int(fields, "open_holds"),
            tokens=_int(fields, "tokens"),
            requests=_int(fields, "requests"),
            cost=_int(fields, "cost"),
            cycle_start=_int(fields, "cycle_start"),
            cycle_end=_int(fields, "cycle_end"),
            auto_renew=fields.get("auto_renew") == "1",
        )

    def as_json(self) -> dict[str, Any]:
        """The account as the admin API shows it (µ$ and ms as integers)."""
        return {
            "tier": self.tier,
            "status": str(self.status),
            "balance": self.balance,
            "held": self.held,
            "open_holds": self.open_holds,
            "tokens": self.tokens,
            "requests": self.requests,
            "cost": self.cost,
            "cycle_start": self.cycle_start,
            "cycle_end": self.cycle_end,
            "auto_renew": self.auto_renew,
        }
