"""Who the client is behind reverse proxies (``TRUSTED_PROXIES``)."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from proxy.forwarded import client_address, parse_networks
from proxy.settings import Settings

PROXIES = parse_networks("10.0.0.0/8, ::1, 192.168.1.7")


def _address(peer: str, *forwarded: str) -> str:
    headers = CIMultiDict(("X-Forwarded-For", value) for value in forwarded)
    request = make_mocked_request("GET", "/", headers=headers, transport=_Transport(peer))
    return client_address(request, PROXIES)


class _Transport:
    def __init__(self, peer: str):
        self.peer = peer

    def get_extra_info(self, name: str, default: object = None) -> object:
        return (self.peer, 4321) if name == "peername" else default

    def is_closing(self) -> bool:
        return False


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("203.0.113.1", ("198.51.100.2",), "203.0.113.1"),  # an untrusted peer's header is ignored
        ("10.1.2.3", ("198.51.100.2",), "198.51.100.2"),
        ("10.1.2.3", ("6.6.6.6, 198.51.100.2, 10.9.9.9",), "198.51.100.2"),  # the client wrote 6.6.6.6
        ("10.1.2.3", ("6.6.6.6", "198.51.100.2, 192.168.1.7"), "198.51.100.2"),  # headers repeated
        ("::1", ("2001:db8::5",), "2001:db8::5"),
        ("10.1.2.3", (), "10.1.2.3"),  # no header: the proxy itself
        ("10.1.2.3", ("10.0.0.9, 10.0.0.8",), "10.1.2.3"),  # only trusted hops
        ("10.1.2.3", ("not-an-address",), "10.1.2.3"),  # garbage is never a client address
        ("10.1.2.3", ("198.51.100.2, ",), "198.51.100.2"),
    ],
)
def test_the_client_is_the_rightmost_untrusted_forwarded_address(peer, forwarded, client):
    assert _address(peer, *forwarded) == client


def test_no_trusted_proxies_means_the_socket_peer():
    request = make_mocked_request("GET", "/", headers={"X-Forwarded-For": "1.2.3.4"}, transport=_Transport("10.1.2.3"))
    assert client_address(request, ()) == "10.1.2.3"


def test_trusted_proxies_setting():
    assert Settings.from_env({}).trusted_proxies == ()
    assert [str(n) for n in Settings.from_env({"TRUSTED_PROXIES": "10.0.0.0/8, 2001:db8::/32"}).trusted_proxies] == [
        "10.0.0.0/8",
        "2001:db8::/32",
    ]
    with pytest.raises(SystemExit, match="TRUSTED_PROXIES: 'nope' is not an IP address"):
        Settings.from_env({"TRUSTED_PROXIES": "10.0.0.0/8,nope"})
