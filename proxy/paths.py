"""Known endpoints, and the one place a provider route's path is read.

Every provider declares the endpoints it forwards as an :class:`EndpointTable`: method,
a template over path *segments* (``v1/models/{model}``), free or metered, and a name.
Nothing else reaches an upstream with the operator's key.

:func:`parse_tail` reads the path after ``/<provider>/`` exactly as the client sent it
(still percent-encoded) and refuses, before any matching:

- an empty segment (``//``, a leading or trailing ``/``, an empty tail);
- a ``.`` or ``..`` segment, however it is encoded (``%2e``, ``%2E%2E``, ``.%2e``, ...);
- a backslash, literal or encoded (``\\``, ``%5C``);
- a malformed escape (``%``, ``%4``, ``%zz``) or bytes that are not UTF-8 once decoded;
- double encoding: a segment that still holds a ``%`` once decoded (``%252F``);
- a character that is not printable once decoded (control characters, NUL, format
  characters, line separators);
- an encoded slash (``%2F``), except in a parameter its endpoint declares may hold one
  (Bedrock's ARN model ids), where every ``/``-separated part obeys the rules above too.

Each segment is decoded exactly once and matched whole (``re.fullmatch``) against the
table. The tail forwarded upstream is rebuilt from the decoded segments by
:func:`canonical_tail` alone, and :func:`upstream_url` joins it to the base URL as an
already-encoded yarl URL, so neither yarl nor aiohttp normalises it again: what was
matched is what is sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, unquote_to_bytes

from yarl import URL

from .errors import ProxyError

#: characters RFC 3986 allows unencoded in a path segment besides the unreserved ones
#: (``pchar``); everything else, ``/`` and ``%`` included, is percent-encoded
SEGMENT_SAFE = "!$&'()*+,;=:@"
#: characters left as they are in a forwarded query string (``%`` only as a valid escape)
_QUERY_SAFE = "!$&'()*+,;=:@/?%"
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
#: longest path echoed back in an error message
_SHOWN = 200


class PathError(ValueError):
    """A path that is refused before any endpoint is matched; the message says why."""


def _check_part(part: str) -> None:
    if not part:
        raise PathError("it has an empty path segment")
    if part in (".", ".."):
        raise PathError("it has a '.' or '..' path segment")


def _decode(raw: str) -> str:
    """One raw segment decoded once, or :class:`PathError`."""
    _check_part(raw)
    if "\\" in raw:
        raise PathError("it has a backslash")
    if _BAD_ESCAPE.search(raw):
        raise PathError("it has a malformed percent-escape")
    try:
        text = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise PathError("a path segment is not UTF-8 once decoded") from None
    if "%" in text:
        raise PathError("it is percent-encoded twice")
    if "\\" in text:
        raise PathError("it has an encoded backslash")
    if not text.isprintable():
        raise PathError("it has a control character")
    for part in text.split("/"):
        _check_part(part)
    return text


def parse_tail(raw_tail: str) -> tuple[str, ...]:
    """The decoded segments of a raw (percent-encoded) tail, or :class:`PathError`.

    A segment may hold ``/`` only where it was sent encoded as ``%2F``; matching accepts
    such a segment only in a parameter declared to take one."""
    return tuple(_decode(raw) for raw in raw_tail.split("/"))


def canonical_tail(segments: Iterable[str]) -> str:
    """The one encoding of decoded segments: what is forwarded and inspected."""
    return "/".join(quote(segment, safe=SEGMENT_SAFE) for segment in segments)


def upstream_url(base_url: str, tail: str, query_string: str = "") -> URL:
    """``base_url`` + ``/`` + a canonical tail + the query, as a URL nothing re-normalises.

    The query string is passed on as given, with characters that may not appear in a
    query percent-encoded (and a ``%`` that starts no valid escape written ``%25``)."""
    url = str(URL(base_url)).rstrip("/") + "/" + tail
    if query_string:
        url += "?" + quote(_BAD_ESCAPE.sub("%25", query_string), safe=_QUERY_SAFE)
    return URL(url, encoded=True)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One known endpoint: ``method`` on the path ``template``.

    ``template`` is ``/``-separated segments; ``{name}`` stands for a parameter, which
    matches ``patterns[name]`` (a regular expression over the decoded text, default: any
    text of the segment) and may hold an (encoded) ``/`` only if ``name`` is in
    ``slashes``. ``name`` says which endpoint matched (``chat``, ``converse``, ...);
    ``listed`` ones are named in the 404 that lists the endpoints (aliases are not).
    """

    method: str
    template: str
    name: str
    free: bool = False
    patterns: Mapping[str, str] = field(default_factory=dict)
    slashes: frozenset[str] = frozenset()
    listed: bool = True
    _compiled: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = tuple(re.compile(self._segment_regex(segment)) for segment in self.template.split("/"))
        object.__setattr__(self, "_compiled", compiled)

    def _segment_regex(self, segment: str) -> str:
        out, at = [], 0
        for found in _PLACEHOLDER.finditer(segment):
            name = found[1]
            default = r".+" if name in self.slashes else r"[^/]+"
            out += [re.escape(segment[at : found.start()]), f"(?P<{name}>{self.patterns.get(name, default)})"]
            at = found.end()
        out.append(re.escape(segment[at:]))
        return "".join(out)

    def match(self, segments: tuple[str, ...]) -> dict[str, str] | None:
        """The parameters, if the decoded ``segments`` are this endpoint's path."""
        if len(segments) != len(self._compiled):
            return None
        params: dict[str, str] = {}
        for regex, segment in zip(self._compiled, segments, strict=True):
            found = regex.fullmatch(segment)
            if found is None:
                return None
            params.update(found.groupdict())
        # template text holds no "/": a decoded "/" sits in a parameter, which must allow it
        if any("/" in value for name, value in params.items() if name not in self.slashes):
            return None
        return params


@dataclass(frozen=True, slots=True)
class Found:
    """A request path matched to a known endpoint."""

    endpoint: Endpoint
    #: the path in canonical form (:func:`canonical_tail`)
    tail: str
    params: dict[str, str]

    @property
    def free(self) -> bool:
        return self.endpoint.free


class EndpointTable:
    """A provider's known endpoints, in order of precedence."""

    def __init__(self, endpoints: Iterable[Endpoint], note: str = ""):
        self.endpoints = tuple(endpoints)
        #: appended to the list of endpoints in a 404 (e.g. aliases not listed)
        self.note = note

    def find(self, method: str, raw_tail: str, prefix: str) -> Found:
        """The endpoint ``method`` on ``raw_tail`` (the path after ``/<prefix>/``, encoded
        as sent) names, else a 404 ``unsupported_endpoint`` :class:`ProxyError`."""
        try:
            segments = parse_tail(raw_tail)
        except PathError as refused:
            raise self.not_found(method, raw_tail, prefix, str(refused)) from None
        for endpoint in self.endpoints:
            if endpoint.method == method:
                params = endpoint.match(segments)
                if params is not None:
                    return Found(endpoint, canonical_tail(segments), params)
        slashed = any("/" in segment for segment in segments)
        raise self.not_found(method, raw_tail, prefix, "it has an encoded '/' where none is allowed" if slashed else "")

    def not_found(self, method: str, tail: str, prefix: str, why: str = "") -> ProxyError:
        """The 404 for a path that is not one of these endpoints, listing them."""
        shown = tail if len(tail) <= _SHOWN else tail[:_SHOWN] + "..."
        listed = [e for e in self.endpoints if e.listed]
        metered = ", ".join(f"{e.method} /{prefix}/{e.template}" for e in listed if not e.free)
        free = ", ".join(f"{e.method} /{prefix}/{e.template}" for e in listed if e.free)
        message = (
            f"{method} /{prefix}/{shown} is not available through this gateway"
            + (f" ({why})" if why else "")
            + f"; metered endpoints are {metered}"
            + (f"; free endpoints are {free}" if free else "")
            + "."
            + (f" {self.note}" if self.note else "")
        )
        return ProxyError(404, "unsupported_endpoint", message)
