"""Our rtnetlink encodings match pyroute2's byte for byte; decoding reads them back."""

import ipaddress
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from flanneld.dataplane import nlcodec as nl


def pyroute2_bytes(msg_class, msg_type, flags, seq, fields, nla):
    msg = msg_class()
    for key, value in fields.items():
        msg[key] = value
    msg["attrs"] = nla
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def test_neigh_matches_pyroute2():
    ours = nl.neigh(7, False, 3, nl.ip_bytes("198.18.2.0"), nl.mac_bytes("0e:00:00:00:00:01"))
    theirs = pyroute2_bytes(ndmsg, nl.RTM_NEWNEIGH, nl.PUT_FLAGS, 7,
                            {"family": 2, "ifindex": 3, "state": 0x80, "flags": 0, "ndm_type": 1},
                            [("NDA_DST", "198.18.2.0"), ("NDA_LLADDR", "0e:00:00:00:00:01")])
    assert ours == theirs


def test_fdb_matches_pyroute2():
    ours = nl.fdb(9, False, 4, nl.mac_bytes("0e:00:00:00:00:01"), nl.ip_bytes("198.51.100.12"))
    theirs = pyroute2_bytes(ndmsg, nl.RTM_NEWNEIGH, nl.PUT_FLAGS, 9,
                            {"family": 7, "ifindex": 4, "state": 0x80, "flags": 2, "ndm_type": 0},
                            [("NDA_LLADDR", "0e:00:00:00:00:01"), ("NDA_DST", "198.51.100.12")])
    assert ours == theirs


def test_route_matches_pyroute2():
    ours = nl.route(11, False, nl.ip_bytes("198.18.2.0"), 24, nl.ip_bytes("198.18.2.0"), 5, True)
    theirs = pyroute2_bytes(rtmsg, nl.RTM_NEWROUTE, nl.PUT_FLAGS, 11,
                            {"family": 2, "dst_len": 24, "table": 254, "proto": 3, "scope": 0, "type": 1,
                             "flags": 4},
                            [("RTA_DST", "198.18.2.0"), ("RTA_GATEWAY", "198.18.2.0"), ("RTA_OIF", 5)])
    assert ours == theirs


def test_address_matches_pyroute2():
    ours = nl.address(3, False, 6, nl.ip_bytes("198.18.3.0"), 32)
    theirs = pyroute2_bytes(ifaddrmsg, nl.RTM_NEWADDR,
                            nl.NLM_F_REQUEST | nl.NLM_F_ACK | nl.NLM_F_CREATE | nl.NLM_F_REPLACE, 3,
                            {"family": 2, "prefixlen": 32, "index": 6},
                            [("IFA_LOCAL", "198.18.3.0"), ("IFA_ADDRESS", "198.18.3.0")])
    assert ours == theirs


def test_decode_round_trip():
    msg = nl.route(1, False, nl.ip_bytes("2001:db8:1800:2::"), 64, nl.ip_bytes("2001:db8:1800:2::"), 9, True,
                   metric=1024)
    [(kind, _flags, seq, payload)] = list(nl.messages(msg))
    rec = nl.parse_route(payload)
    assert (kind, seq, rec.dst_len, rec.oif, rec.metric, rec.flags) == (nl.RTM_NEWROUTE, 1, 64, 9, 1024, 4)
    assert nl.ip_text(rec.gateway) == "2001:db8:1800:2::"
    n = nl.parse_neigh(next(nl.messages(nl.fdb(2, True, 4, b"\x0e" * 6, nl.ip_bytes("198.51.100.12"))))[3])
    assert (n.family, n.ifindex, nl.ip_text(n.dst), nl.mac_text(n.lladdr)) == (7, 4, "198.51.100.12",
                                                                               "0e:0e:0e:0e:0e:0e")
    link = nl.parse_link(next(nl.messages(nl.vxlan_link(3, "flannel.1", 1450, b"\x0e" * 6, 1, 2,
                                                        nl.ip_bytes("198.51.100.11"), 8472, False, True)))[3])
    assert (link.name, link.mtu, link.kind, link.data["IFLA_VXLAN_ID"], link.data["IFLA_VXLAN_PORT"],
            "IFLA_VXLAN_GBP" in link.data) == ("flannel.1", 1450, "vxlan", 1, 8472, True)


def test_error_messages_carry_the_kernel_reason():
    original = nl.HDR.pack(16, nl.RTM_NEWROUTE, 0, 42, 0)
    text = b"Nexthop has invalid gateway\0"
    payload = struct.pack("=i", -22) + original + nl._nla(nl.NLMSGERR_ATTR_MSG, text)
    assert nl.parse_error(memoryview(payload)) == (-22, 42, "Nexthop has invalid gateway")


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2**24 - 1), st.integers(1, 2**31), st.booleans(), st.integers(0, 2**32 - 1),
       st.integers(1, 65535), st.booleans(), st.booleans(), st.integers(68, 9000), st.binary(min_size=6, max_size=6))
def test_a_link_reads_the_same_through_our_codec_and_pyroute2(vni, underlay, v6, address, port, learning, gbp, mtu,
                                                              mac):
    """One type for a device, whoever reads it: the daemon's codec and flannelctl doctor (pyroute2)
    see the same ObservedLink, kind attributes included, so a backend's checks hold for both."""
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    from flanneld.ctl.doctor import observed_link

    local = str(ipaddress.IPv6Address(address << 96) if v6 else ipaddress.IPv4Address(address))
    raw = nl.vxlan_link(3, "flannel.1", mtu, mac, vni, underlay, nl.ip_bytes(local), port, learning, gbp)
    msg = ifinfmsg(raw)
    msg.decode()
    assert nl.parse_link(next(nl.messages(raw))[3]) == observed_link(msg)
