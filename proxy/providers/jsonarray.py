"""Incremental splitting of a streamed JSON array of objects (``[{...},\\r\\n{...}]``).

Google's ``streamGenerateContent`` without ``alt=sse`` sends its chunks this way. Only
brace depth and string boundaries are tracked, which is all it takes to find where each
top-level object ends; the objects themselves are parsed by the caller.
"""

from __future__ import annotations

import re

_STRUCTURE = re.compile(rb'[{}"]')
_IN_STRING = re.compile(rb'["\\]')


class JSONArraySplitter:
    """Feed raw chunks; get back the top-level objects completed so far, as bytes."""

    __slots__ = ("_buf", "_depth", "_in_string", "_scan")

    def __init__(self) -> None:
        self._buf = bytearray()  # from the start of the object being read (or empty)
        self._scan = 0  # where scanning resumes in _buf; may point past its end after a backslash
        self._depth = 0
        self._in_string = False

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf
        buf += chunk
        objects: list[bytes] = []
        pos, start = self._scan, 0 if self._depth else -1
        while True:
            if self._in_string:
                match = _IN_STRING.search(buf, pos)
                if match is None:
                    pos = max(pos, len(buf))
                    break
                if match.group() == b"\\":
                    pos = match.end() + 1  # the escaped byte, even a quote, is content
                    continue
                self._in_string = False
                pos = match.end()
                continue
            match = _STRUCTURE.search(buf, pos)
            if match is None:
                pos = len(buf)
                break
            pos = match.end()
            token = match.group()
            if token == b'"':
                self._in_string = self._depth > 0
            elif token == b"{":
                if self._depth == 0:
                    start = match.start()
                self._depth += 1
            elif self._depth:
                self._depth -= 1
                if self._depth == 0:
                    objects.append(bytes(buf[start:pos]))
                    start = -1
        keep_from = start if start >= 0 else min(pos, len(buf))
        del buf[:keep_from]
        self._scan = pos - keep_from
        return objects

    def rest(self) -> bytes:
        """Bytes of an object the stream ended without closing."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._scan = self._depth = 0
        self._in_string = False
        return rest
