"""Customers and their accounts as the tests see them: a user with a key, the typed account
the ledger holds for them, and waiting for it to settle."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp

from proxy.accounts import Accounts
from proxy.ledger import Account, EntryKind, Ledger


@dataclass(frozen=True)
class Customer:
    """A user created for one test, with the proxy key issued to them."""

    user_id: str
    api_key: str
    key_id: str


async def create_customer(
    accounts: Accounts, ledger: Ledger, tier: str = "starter", balance_micro: int | None = None
) -> Customer:
    """A new user on ``tier`` with a key; ``balance_micro`` replaces the allowance when given."""
    user_id, key = await accounts.create_user(f"{uuid.uuid4().hex[:10]}@example.com", tier)
    if balance_micro is not None:
        current = await account(ledger, user_id)
        await ledger.credit(user_id, amount=balance_micro - current.balance, kind=EntryKind.GRANT, reason="test balance")
    return Customer(user_id, key.api_key, key.key_id)


async def account(ledger: Ledger, user_id: str) -> Account:
    """The account as Redis holds it now (it must exist)."""
    found = await ledger.account(user_id)
    assert found is not None, f"no account {user_id} in the ledger"
    return found


async def settled(ledger: Ledger, user_id: str, within: float = 5.0) -> Account:
    """The account once it has no open hold left (or as it is after ``within`` seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        found = await account(ledger, user_id)
        if found.open_holds == 0 or loop.time() > deadline:
            return found
        await asyncio.sleep(0.05)


async def assert_untouched(ledger: Ledger, user_id: str, balance: int) -> None:
    """Nothing was charged, held or counted: the balance is still ``balance``."""
    found = await account(ledger, user_id)
    assert (found.balance, found.held, found.open_holds, found.requests) == (balance, 0, 0, 0)


async def held_during_stream(url: str, headers: dict[str, str], body: Any, ledger: Ledger, user_id: str) -> int:
    """The credit held for a streamed request while it is still running (use a ``slow`` mock)."""
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200
        await resp.content.readany()
        held = (await account(ledger, user_id)).held
        await resp.read()
    return held
