"""The client behind a request: the socket's peer, or — when that peer is a reverse proxy
the operator trusts (``TRUSTED_PROXIES``) — the address it reports in ``X-Forwarded-For``.

The header is read from the right: each trusted proxy appends the address it received
from, so the rightmost address that is not a trusted proxy is the first one no trusted
party vouches for; anything left of it a client may have written itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

Network = IPv4Network | IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """``"10.0.0.0/8, 192.168.1.7"`` as networks; a ValueError names a bad entry."""
    networks = []
    for entry in (part.strip() for part in text.split(",")):
        if entry:
            try:
                networks.append(ip_network(entry, strict=False))
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network") from None
    return tuple(networks)


def _ip(text: str) -> IPv4Address | IPv6Address | None:
    """``text`` as an IP address, or None if it is not one."""
    try:
        return ip_address(text)
    except ValueError:
        return None


def _trusted(address: str, proxies: Sequence[Network]) -> bool:
    ip = _ip(address)
    return ip is not None and any(ip in network for network in proxies)


def client_address(request: web.Request, proxies: Sequence[Network]) -> str:
    """The client's address: the socket peer unless it is one of ``proxies``, else the
    rightmost ``X-Forwarded-For`` address that is not (the peer's if none is)."""
    peer = request.remote or ""
    if not proxies or not _trusted(peer, proxies):
        return peer
    hops = [hop.strip() for value in request.headers.getall("X-Forwarded-For", ()) for hop in value.split(",")]
    for hop in reversed(hops):
        if hop and not _trusted(hop, proxies):
            return hop if _ip(hop) is not None else peer
    return peer
