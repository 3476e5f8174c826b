"""Migrations are forward-only and additive (README, Upgrades): a release's migration runs
while the previous release still serves, so it may add tables, columns and indexes, never
take away or retype what the previous release reads and writes."""

from __future__ import annotations

import re

import pytest

from proxy.db import MIGRATIONS as MIGRATIONS_DIR

# What would break the release still serving: removing or renaming something it uses,
# changing a column's type, or a new NOT NULL column it does not know to fill.
_BREAKING = [
    (re.compile(r"\bDROP\s+(TABLE|COLUMN|INDEX|CONSTRAINT|VIEW)\b", re.I), "drops"),
    (re.compile(r"\bRENAME\b", re.I), "renames"),
    (re.compile(r"\bALTER\s+COLUMN\s+\w+\s+(SET\s+DATA\s+)?TYPE\b", re.I), "retypes a column"),
    (re.compile(r"\bALTER\s+COLUMN\s+\w+\s+SET\s+NOT\s+NULL\b", re.I), "makes a column NOT NULL"),
    (re.compile(r"\bADD\s+COLUMN\s+[^,;]*\bNOT\s+NULL\b(?![^,;]*\bDEFAULT\b)", re.I), "adds a NOT NULL column without a default"),
]


def _statements(sql: str) -> str:
    return re.sub(r"--[^\n]*", "", sql)  # comments may say anything


MIGRATIONS = sorted(MIGRATIONS_DIR.glob("*.sql"))


def test_migrations_are_numbered_without_gaps():
    numbers = [int(path.name.split("_", 1)[0]) for path in MIGRATIONS]
    assert numbers == list(range(1, len(numbers) + 1))


@pytest.mark.parametrize("path", MIGRATIONS[1:], ids=lambda p: p.name)
def test_a_migration_after_the_first_only_adds(path):
    sql = _statements(path.read_text())
    found = [what for pattern, what in _BREAKING if pattern.search(sql)]
    assert not found, f"{path.name} {', '.join(found)}: the previous release, still serving, would break"


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER TABLE ledger DROP COLUMN note;",
        "ALTER TABLE users RENAME COLUMN tier TO plan;",
        "ALTER TABLE ledger ALTER COLUMN amount_micro TYPE numeric;",
        "ALTER TABLE users ALTER COLUMN email SET NOT NULL;",
        "ALTER TABLE users ADD COLUMN plan text NOT NULL;",
    ],
)
def test_the_guard_catches_each_breaking_change(sql):
    assert any(pattern.search(_statements(sql)) for pattern, _ in _BREAKING)


def test_the_guard_lets_additive_changes_through():
    sql = "ALTER TABLE users ADD COLUMN plan text NOT NULL DEFAULT 'free', ADD COLUMN note text; -- DROP nothing"
    assert not any(pattern.search(_statements(sql)) for pattern, _ in _BREAKING)
