"""External interface choice: --iface, --iface-regex, --iface-can-reach, default route."""

import ipaddress

import pytest

from flanneld.dataplane import nlcodec as nl
from flanneld.dataplane.iface import Iface, IfaceError, IfaceOptions, choose, external, onlink_networks, touches_onlink
from flanneld.dataplane.netlink import AddrInfo

ETH0 = Iface("eth0", 2, 1500, True, (
    AddrInfo(2, "fe80::1", 64, 253, True), AddrInfo(2, "198.51.100.11", 24, 0, False),
    AddrInfo(2, "198.51.100.12", 24, 0, True), AddrInfo(2, "2001:db8:51::11", 64, 0, True)))
ETH1 = Iface("eth1", 3, 9000, True, (AddrInfo(3, "203.0.113.5", 24, 0, True),))
ALL = [ETH0, ETH1]


@pytest.mark.parametrize(("opts", "want"), [
    (IfaceOptions(ifaces=("eth1",)), "eth1"),
    (IfaceOptions(ifaces=("203.0.113.5",)), "eth1"),
    (IfaceOptions(ifaces=("nope", "eth1")), "eth1"),
    (IfaceOptions(regexes=(r"^203\.",)), "eth1"),
    (IfaceOptions(regexes=("th1$",)), "eth1"),
    (IfaceOptions(can_reach="203.0.113.99"), "eth1"),
    (IfaceOptions(), "eth0"),
])
def test_choose(opts, want):
    assert choose(ALL, opts, default_index=2, can_reach=(3, None))[0].name == want


def test_errors_name_what_was_tried():
    with pytest.raises(IfaceError, match="--iface nope, --iface-regex zz"):
        choose(ALL, IfaceOptions(ifaces=("nope",), regexes=("zz",)), 2)
    with pytest.raises(IfaceError, match="no default route"):
        choose(ALL, IfaceOptions(), None)
    with pytest.raises(IfaceError, match="not a valid regular expression"):
        choose(ALL, IfaceOptions(regexes=("(",)), 2)


def test_address_ranking_and_public_override():
    ext = external(ETH0, IfaceOptions(), need_v4=True, need_v6=True)
    assert str(ext.ip4) == "198.51.100.12"  # permanent before dynamic
    assert str(ext.ip6) == "2001:db8:51::11"  # global before link-local
    assert ext.mtu == 1500
    ext = external(ETH0, IfaceOptions(public_ip="198.51.100.200"), need_v4=True, need_v6=False)
    assert str(ext.public_ip) == "198.51.100.200" and str(ext.ip4) == "198.51.100.12" and ext.ip6 is None
    with pytest.raises(IfaceError, match="eth1 has no global IPv6 address"):
        external(ETH1, IfaceOptions(), need_v4=True, need_v6=True)


def test_what_an_interface_reaches_directly_is_its_prefixes_and_its_on_link_routes():
    on_a_32 = Iface("eth0", 2, 1500, True, (AddrInfo(2, "198.51.100.11", 32, 0, True),
                                            AddrInfo(2, "fe80::1", 64, 253, True)))
    routes = [(nl.AF_INET, bytes([198, 51, 100, 0]), 24), (nl.AF_INET, bytes([198, 51, 100, 0]), 24),
              (nl.AF_INET6, ipaddress.IPv6Address("2001:db8:51::").packed, 64)]
    assert [str(n) for n in external(on_a_32, IfaceOptions(), True, False, routes).onlink] == \
        ["198.51.100.0/24", "198.51.100.11/32", "2001:db8:51::/64"]  # link-local left out, each once
    assert [str(n) for n in onlink_networks(on_a_32.addrs, ())] == ["198.51.100.11/32"]


def notification(request: bytes) -> tuple[int, bytes]:
    kind, _flags, _seq, payload = next(nl.messages(request))
    return kind, bytes(payload)


@pytest.mark.parametrize(("message", "touches"), [
    (nl.address(1, False, 2, bytes([198, 51, 100, 99]), 24), True),  # renumbered
    (nl.address(1, True, 2, bytes([198, 51, 100, 11]), 24), True),
    (nl.address(1, False, 7, bytes([10, 0, 0, 1]), 24), False),  # another interface's
    (nl.route(1, False, bytes([198, 51, 100, 0]), 24, None, 2, False), True),  # an on-link route
    (nl.route(1, True, bytes([198, 51, 100, 0]), 24, None, 2, False), True),
    (nl.route(1, False, bytes([198, 18, 2, 0]), 24, bytes([198, 51, 100, 12]), 2, False), False),  # via a gateway
    (nl.route(1, False, bytes([0, 0, 0, 0]), 0, None, 2, False), False),  # a default route
    (nl.route(1, False, bytes([198, 18, 2, 0]), 24, None, 5, False), False),  # out of another interface
])
def test_notifications_that_may_change_what_the_interface_reaches(message, touches):
    assert touches_onlink(*notification(message), index=2) is touches
