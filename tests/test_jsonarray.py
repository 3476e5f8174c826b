"""Splitting Google's streamed JSON array into its objects, however the bytes are cut."""

from __future__ import annotations

import orjson
import pytest

from proxy.providers.jsonarray import JSONArraySplitter

# Strings holding braces, quotes and backslashes (a trailing one too), and nested objects.
OBJECTS = [
    {"candidates": [{"content": {"parts": [{"text": 'a } { " [ ] ,'}]}}], "usageMetadata": {"promptTokenCount": 5}},
    {"text": "back\\slash\\", "nested": {"deeper": {"x": [1, {"y": 2}]}}},
    {"text": '\\"}'},
]
STREAM = b"[" + b",\r\n".join(orjson.dumps(o, option=orjson.OPT_INDENT_2) for o in OBJECTS) + b"]"


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(STREAM)])
def test_objects_come_out_whole_whatever_the_chunk_size(size):
    splitter = JSONArraySplitter()
    found = []
    for i in range(0, len(STREAM), size):
        found += splitter.feed(STREAM[i : i + size])
    assert [orjson.loads(o) for o in found] == OBJECTS
    assert splitter.rest() == b""


def test_an_unclosed_object_is_left_as_rest():
    splitter = JSONArraySplitter()
    assert splitter.feed(b'[{"a": 1},\r\n{"b": "x') == [b'{"a": 1}']
    assert splitter.rest() == b'{"b": "x'
