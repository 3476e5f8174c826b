"""How the ledger calls its Lua scripts: one ``.lua`` file per operation, beside a Python
module whose small builder function lists that script's KEYS and ARGV in the order its
header comment documents, and whose decoder reads its reply."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

_HERE = Path(__file__).parent

Arg = str | int | bytes


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """The KEYS and ARGV of one script call."""

    keys: list[str]
    args: list[Arg]


class Script(Protocol):
    """A loaded script, called by EVALSHA: redis-py's ``AsyncScript`` or
    :class:`proxy.ledger.pipeline.PipelinedScript`."""

    async def __call__(self, keys: list[Any], args: list[Any]) -> Any: ...


def source(name: str) -> str:
    """The text of the script ``name`` (a file of this package)."""
    return (_HERE / name).read_text()


def unlimited(limit: int | None) -> int:
    """A limit as the scripts take it: -1 for none."""
    return -1 if limit is None else limit


def text(value: bytes | str) -> str:
    """A Redis reply as text (the clients here do not decode replies themselves)."""
    return value.decode() if isinstance(value, bytes) else value


def word(reply: Any) -> str:
    """A script's status word (the first element of its reply), decoded."""
    return text(reply[0])
