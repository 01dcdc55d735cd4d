"""External interface choice: --iface, --iface-regex, --iface-can-reach, default route."""

import ipaddress
import re

import pytest

from flanneld.dataplane import nlcodec as nl
from flanneld.dataplane.iface import (
    Iface,
    IfaceError,
    IfaceOptions,
    check_one_interface,
    choose,
    external,
    onlink_networks,
    touches_onlink,
)
from flanneld.dataplane.netlink import AddrInfo

ETH0 = Iface("eth0", 2, 1500, True, (
    AddrInfo(2, "fe80::1", 64, 253, 0x80), AddrInfo(2, "198.51.100.11", 24, 0, 0),
    AddrInfo(2, "198.51.100.12", 24, 0, 0x80), AddrInfo(2, "2001:db8:51::11", 64, 0, 0x80)))
ETH1 = Iface("eth1", 3, 9000, True, (AddrInfo(3, "203.0.113.5", 24, 0, 0x80),))
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
    assert choose(ALL, opts, default_index=2, can_reach=(3, None, None))[0].name == want


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
    on_a_32 = Iface("eth0", 2, 1500, True, (AddrInfo(2, "198.51.100.11", 32, 0, 0x80),
                                            AddrInfo(2, "fe80::1", 64, 253, 0x80)))
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


TWO = Iface("eth0", 2, 1500, True, (AddrInfo(2, "198.51.100.1", 24, 0, 0x80),
                                    AddrInfo(2, "198.51.100.101", 24, 0, 0x80)))


@pytest.mark.parametrize(("opts", "reach", "local"), [
    (IfaceOptions(ifaces=("198.51.100.101",)), None, "198.51.100.101"),  # upstream: the matched address
    (IfaceOptions(regexes=(r"\.101$",)), None, "198.51.100.101"),
    (IfaceOptions(can_reach="203.0.113.9"), (2, None, "198.51.100.101"), "198.51.100.101"),  # the route's source
    (IfaceOptions(ifaces=("nope0",), can_reach="203.0.113.9"), (2, None, "198.51.100.101"), "198.51.100.101"),
    (IfaceOptions(public_ip="198.51.100.101"), None, "198.51.100.101"),  # the interface holding it, that address
    (IfaceOptions(public_ip="203.0.113.77"), None, "198.51.100.1"),  # behind NAT: default route, first address
    (IfaceOptions(ifaces=("eth0",)), None, "198.51.100.1"),
])
def test_the_address_that_chose_the_interface_is_the_one_used(opts, reach, local):
    choice = choose([TWO, ETH1], opts, default_index=2, can_reach=reach)
    ext = external(choice.iface, opts, need_v4=True, need_v6=False, chosen=choice.address)
    assert (choice.iface.name, str(ext.ip4)) == ("eth0", local)
    assert str(ext.public_ip) == (opts.public_ip or local)


def test_iface_can_reach_is_the_fallback_after_iface_and_regex_and_errors_name_all_tried():
    with pytest.raises(IfaceError, match="--iface nope0, --iface-regex zz"):
        choose([TWO], IfaceOptions(ifaces=("nope0",), regexes=("zz",)), 2)
    assert choose([TWO, ETH1], IfaceOptions(ifaces=("eth1",), can_reach="x"), 2, (2, None, None)).iface.name == "eth1"


def test_unusable_addresses_are_never_chosen_and_temporary_ones_come_last():
    deprecated, tentative, dadfailed, temporary = 0x20, 0x40, 0x08, 0x01
    v6 = Iface("eth0", 2, 1500, True, (
        AddrInfo(2, "2001:db8:51::a", 64, 0, deprecated), AddrInfo(2, "2001:db8:51::b", 64, 0, tentative),
        AddrInfo(2, "2001:db8:51::c", 64, 0, dadfailed | 0x80), AddrInfo(2, "2001:db8:51::e", 64, 0, temporary),
        AddrInfo(2, "2001:db8:51::5", 64, 0, 0)))
    assert [a.ip for a in v6.ranked(6)] == ["2001:db8:51::5", "2001:db8:51::e"]
    assert str(v6.first_global(6)) == "2001:db8:51::5"


DUAL = Iface("eth0", 2, 1500, True, (AddrInfo(2, "198.51.100.1", 24, 0, 0x80),
                                     AddrInfo(2, "2001:db8:51::1", 64, 0, 0x80),
                                     AddrInfo(2, "2001:db8:51::101", 64, 0, 0x80)))
V6 = Iface("eth1", 3, 1500, True, (AddrInfo(3, "2001:db8:51::77", 64, 0, 0x80),))


def test_a_public_address_the_interface_holds_is_the_one_it_sends_from():
    """Upstream #2072: with --public-ipv6 naming an address of the interface, the IPv6 side runs
    over that address, not the first one (an IPv6-only node used to publish one and send from another)."""
    opts = IfaceOptions(ifaces=("eth0",), public_ipv6="2001:db8:51::101")
    for need_v4 in (True, False):
        ext = external(DUAL, opts, need_v4=need_v4, need_v6=True)
        assert (str(ext.ip6), str(ext.public_ipv6)) == ("2001:db8:51::101", "2001:db8:51::101")
    nat = external(DUAL, IfaceOptions(public_ipv6="2001:db8:51::999"), need_v4=False, need_v6=True)
    assert (str(nat.ip6), str(nat.public_ipv6)) == ("2001:db8:51::1", "2001:db8:51::999")  # NAT: published only
    held4 = external(TWO, IfaceOptions(ifaces=("eth0",), public_ip="198.51.100.101"), need_v4=True, need_v6=False)
    assert str(held4.ip4) == "198.51.100.101"


def test_dual_stack_over_an_ipv4_address_refuses_a_public_ipv6_of_another_interface():
    opts = IfaceOptions(ifaces=("198.51.100.1",), public_ipv6="2001:db8:51::77")
    choice = choose([DUAL, V6], opts, default_index=2)
    said = ("--public-ipv6 2001:db8:51::77 is an address of eth1 but --iface 198.51.100.1 chose eth0: both families "
            "must run over one interface")
    with pytest.raises(IfaceError, match=re.escape(said)):
        check_one_interface([DUAL, V6], choice, opts, need_v6=True)
    check_one_interface([DUAL, V6], choice, opts, need_v6=False)  # IPv4 only: nothing to check
    named = choose([DUAL, V6], IfaceOptions(ifaces=("eth0",), public_ipv6="2001:db8:51::77"), 2)
    check_one_interface([DUAL, V6], named, IfaceOptions(ifaces=("eth0",), public_ipv6="2001:db8:51::77"), True)
