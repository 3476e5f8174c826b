"""Incremental splitting of a Server-Sent Events byte stream into whole events."""

from __future__ import annotations

import re
from typing import Protocol

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class EventSplitter(Protocol):
    """Cuts a byte stream into whole events (SSE events, or a JSON array's objects)."""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events completed by ``chunk``."""
        ...

    def rest(self) -> bytes:
        """What is left of an event the stream ended without finishing."""
        ...


class SSESplitter:
    """Feed raw chunks; get back the events completed so far (each with its terminator)."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._pending + chunk if self._pending else chunk
        events = []
        start = 0
        for match in _EVENT_END.finditer(data):
            events.append(data[start : match.end()])
            start = match.end()
        self._pending = data[start:]
        return events

    def rest(self) -> bytes:
        """Bytes of an event the stream ended without terminating."""
        rest, self._pending = self._pending, b""
        return rest


def event_data(event: bytes) -> bytes:
    """The joined ``data:`` payload of one event (empty if it has none)."""
    lines = [line[5:].lstrip(b" ") if line.startswith(b"data:") else None for line in event.splitlines()]
    return b"\n".join(line for line in lines if line is not None)
