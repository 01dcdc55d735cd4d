"""Hand-rolled rtnetlink encoding/decoding for the few message shapes flanneld needs, pure.

Thousands of peers mean tens of thousands of neighbour/FDB/route messages. pyroute2 spends
~0.13 ms encoding each one, so the per-peer tables use these fixed-layout ``struct`` codecs
(a few microseconds per message) and are sent many messages per ``send()``. The daemon's
handful of link and address messages use the same codec: importing pyroute2 costs 16-22 MB of
RSS, which alone would break the daemon's memory budget (see README, architecture). The tests
cross-check these encodings against pyroute2's.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from flanneld.plan.state import ObservedLink

# message types
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30

# flags
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
NLMSGERR_ATTR_MSG = 1

# neighbours
NDA_DST, NDA_LLADDR, NDA_IFINDEX = 1, 2, 8
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
# routes
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC, RTA_TABLE = 1, 4, 5, 6, 7, 15
RT_TABLE_MAIN = 254
RTPROT_KERNEL, RTPROT_BOOT = 2, 3
RTN_UNICAST, RTN_BLACKHOLE = 1, 6
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255  # in a delete: match a route of any scope (what ``ip route del`` sends)
RTNH_F_ONLINK = 4
# links / addresses
RTM_GETLINK, RTM_GETADDR = 18, 22
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO = 1, 3, 4, 18
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_VXLAN_ID, IFLA_VXLAN_LINK, IFLA_VXLAN_LOCAL, IFLA_VXLAN_LEARNING = 1, 3, 4, 7
IFLA_VXLAN_PORT, IFLA_VXLAN_LOCAL6, IFLA_VXLAN_GBP = 15, 17, 23
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_TEMPORARY, IFA_F_NODAD, IFA_F_DADFAILED, IFA_F_PERMANENT = 0x01, 0x02, 0x08, 0x80
IFA_F_DEPRECATED, IFA_F_TENTATIVE = 0x20, 0x40
IFF_UP = 0x1
NLA_F_NESTED = 0x8000

AF_INET, AF_INET6, AF_BRIDGE = socket.AF_INET, socket.AF_INET6, 7

HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
NDMSG = struct.Struct("=BxxxiHBB")  # family, pad, ifindex, state, flags, type
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
IFINFO = struct.Struct("=BxHiII")  # family, pad, type, index, flags, change
IFADDR = struct.Struct("=BBBBi")  # family, prefixlen, flags, scope, index
NLA = struct.Struct("=HH")
U32 = struct.Struct("=I")
ERR = struct.Struct("=i")

PUT_FLAGS = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE
DEL_FLAGS = NLM_F_REQUEST


def _nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return NLA.pack(length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def _msg(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return HDR.pack(16 + len(body), kind, flags, seq, 0) + body


def _af(packed_ip: bytes) -> int:
    """AF_INET or AF_INET6, by a packed address's length."""
    return AF_INET if len(packed_ip) == 4 else AF_INET6


# ---------------------------------------------------------------------------------------------
# encoders


def neigh(seq: int, delete: bool, ifindex: int, ip: bytes, mac: bytes) -> bytes:
    """A permanent neighbour entry (``ip neigh replace IP lladdr MAC dev X nud permanent``)."""
    body = NDMSG.pack(_af(ip), ifindex, NUD_PERMANENT, 0, RTN_UNICAST) + _nla(NDA_DST, ip)
    if not delete:
        body += _nla(NDA_LLADDR, mac)
    return _msg(RTM_DELNEIGH if delete else RTM_NEWNEIGH, DEL_FLAGS if delete else PUT_FLAGS, seq, body)


def fdb(seq: int, delete: bool, ifindex: int, mac: bytes, dst: bytes) -> bytes:
    """A VXLAN FDB entry (``bridge fdb replace MAC dev X dst IP self permanent``)."""
    body = NDMSG.pack(AF_BRIDGE, ifindex, NUD_PERMANENT, NTF_SELF, 0) + _nla(NDA_LLADDR, mac) + _nla(NDA_DST, dst)
    return _msg(RTM_DELNEIGH if delete else RTM_NEWNEIGH, DEL_FLAGS if delete else PUT_FLAGS, seq, body)


def route(seq: int, delete: bool, dst: bytes, dst_len: int, gateway: bytes | None, oif: int | None,
          onlink: bool, blackhole: bool = False, metric: int = 0) -> bytes:
    """A main-table route, proto boot (what ``ip route`` and upstream Flannel create); a device
    route without a gateway has scope link, as ``ip route add NET dev X`` gives it."""
    rtype = RTN_BLACKHOLE if blackhole else RTN_UNICAST
    if delete:
        scope = RT_SCOPE_NOWHERE
    else:
        scope = RT_SCOPE_LINK if gateway is None and oif is not None and not blackhole else RT_SCOPE_UNIVERSE
    body = RTMSG.pack(_af(dst), dst_len, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, rtype,
                      RTNH_F_ONLINK if onlink else 0) + _nla(RTA_DST, dst)
    if gateway is not None:
        body += _nla(RTA_GATEWAY, gateway)
    if oif is not None:
        body += _nla(RTA_OIF, U32.pack(oif))
    if metric:
        body += _nla(RTA_PRIORITY, U32.pack(metric))
    return _msg(RTM_DELROUTE if delete else RTM_NEWROUTE, DEL_FLAGS if delete else PUT_FLAGS, seq, body)


def vxlan_link(seq: int, name: str, mtu: int, mac: bytes | None, vni: int, underlay: int, local: bytes,
               port: int, learning: bool, gbp: bool) -> bytes:
    """Create a VXLAN device (``ip link add NAME type vxlan id VNI local IP dev X dstport P nolearning``)."""
    data = (_nla(IFLA_VXLAN_ID, U32.pack(vni)) + _nla(IFLA_VXLAN_LINK, U32.pack(underlay))
            + _nla(IFLA_VXLAN_LOCAL6 if len(local) == 16 else IFLA_VXLAN_LOCAL, local)
            + _nla(IFLA_VXLAN_PORT, struct.pack(">H", port)) + _nla(IFLA_VXLAN_LEARNING, bytes([int(learning)])))
    if gbp:
        data += _nla(IFLA_VXLAN_GBP, b"")
    info = _nla(IFLA_INFO_KIND, b"vxlan") + _nla(IFLA_INFO_DATA | NLA_F_NESTED, data)
    body = IFINFO.pack(0, 0, 0, 0, 0) + _nla(IFLA_IFNAME, name.encode() + b"\0") + _nla(IFLA_MTU, U32.pack(mtu))
    if mac is not None:
        body += _nla(IFLA_ADDRESS, mac)
    body += _nla(IFLA_LINKINFO | NLA_F_NESTED, info)
    return _msg(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq, body)


def plain_link(seq: int, name: str, mtu: int, kind: str) -> bytes:
    """Create a device of a kind without parameters (``ip link add NAME mtu M type wireguard``)."""
    body = (IFINFO.pack(0, 0, 0, 0, 0) + _nla(IFLA_IFNAME, name.encode() + b"\0") + _nla(IFLA_MTU, U32.pack(mtu))
            + _nla(IFLA_LINKINFO | NLA_F_NESTED, _nla(IFLA_INFO_KIND, kind.encode())))
    return _msg(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq, body)


def set_link(seq: int, index: int, mtu: int | None = None, up: bool | None = None) -> bytes:
    flags = IFF_UP if up else 0
    change = IFF_UP if up is not None else 0
    body = IFINFO.pack(0, 0, index, flags, change)
    if mtu is not None:
        body += _nla(IFLA_MTU, U32.pack(mtu))
    return _msg(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq, body)


def del_link(seq: int, index: int) -> bytes:
    return _msg(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, seq, IFINFO.pack(0, 0, index, 0, 0))


def get_links(seq: int, name: str | None = None) -> bytes:
    """Dump all links, or get one by name."""
    if name is None:
        return _msg(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq, IFINFO.pack(0, 0, 0, 0, 0))
    body = IFINFO.pack(0, 0, 0, 0, 0) + _nla(IFLA_IFNAME, name.encode() + b"\0")
    return _msg(RTM_GETLINK, NLM_F_REQUEST, seq, body)


def address(seq: int, delete: bool, index: int, ip: bytes, prefixlen: int) -> bytes:
    family = _af(ip)
    body = IFADDR.pack(family, prefixlen, 0, 0, index) + _nla(IFA_LOCAL, ip) + _nla(IFA_ADDRESS, ip)
    if family == AF_INET6 and not delete:
        body += _nla(IFA_FLAGS, U32.pack(IFA_F_NODAD))
    flags = NLM_F_REQUEST | NLM_F_ACK | (0 if delete else NLM_F_CREATE | NLM_F_REPLACE)
    return _msg(RTM_DELADDR if delete else RTM_NEWADDR, flags, seq, body)


def dump_addresses(seq: int) -> bytes:
    return _msg(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, IFADDR.pack(0, 0, 0, 0, 0))


def get_route(seq: int, dst: bytes) -> bytes:
    """``ip route get DST``."""
    body = RTMSG.pack(_af(dst), len(dst) * 8, 0, 0, 0, 0, 0, 0, 0) + _nla(RTA_DST, dst)
    return _msg(RTM_GETROUTE, NLM_F_REQUEST, seq, body)


def dump_neighs(seq: int, family: int, ifindex: int) -> bytes:
    """Dump request for one device's neighbours (family AF_INET/AF_INET6) or FDB (AF_BRIDGE)."""
    if family == AF_BRIDGE:  # strict FDB dumps filter on ndm_ifindex
        return _msg(RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, seq, NDMSG.pack(AF_BRIDGE, ifindex, 0, 0, 0))
    body = NDMSG.pack(family, 0, 0, 0, 0) + _nla(NDA_IFINDEX, U32.pack(ifindex))
    return _msg(RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, seq, body)


def dump_routes(seq: int, family: int) -> bytes:
    """Dump request for the main table of one family (kernel-side filtered, strict checking)."""
    body = RTMSG.pack(family, 0, 0, 0, RT_TABLE_MAIN, 0, 0, 0, 0)
    return _msg(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, seq, body)


# ---------------------------------------------------------------------------------------------
# decoders


def messages(buf: bytes | memoryview) -> Iterator[tuple[int, int, int, memoryview]]:
    """Split a receive buffer into (type, flags, seq, payload) messages."""
    view = memoryview(buf)
    offset, end = 0, len(view)
    while offset + 16 <= end:
        length, kind, flags, seq, _pid = HDR.unpack_from(view, offset)
        if length < 16 or offset + length > end:
            break
        yield kind, flags, seq, view[offset + 16 : offset + length]
        offset += (length + 3) & ~3


def attrs(payload: memoryview, offset: int) -> dict[int, memoryview]:
    found: dict[int, memoryview] = {}
    end = len(payload)
    while offset + 4 <= end:
        length, kind = NLA.unpack_from(payload, offset)
        if length < 4:
            break
        found[kind & 0x3FFF] = payload[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return found


class NeighRecord(NamedTuple):
    """A neighbour/FDB message's fields (a named tuple: a dump makes thousands, a dataclass costs
    five times as much to build)."""

    family: int
    ifindex: int
    state: int
    flags: int
    dst: bytes | None
    lladdr: bytes | None


def parse_neigh(payload: memoryview) -> NeighRecord:
    family, ifindex, state, flags, _type = NDMSG.unpack_from(payload, 0)
    a = attrs(payload, NDMSG.size)
    dst, lladdr = a.get(NDA_DST), a.get(NDA_LLADDR)
    return NeighRecord(family, ifindex, state, flags, bytes(dst) if dst is not None else None,
                       bytes(lladdr) if lladdr is not None else None)


class RouteRecord(NamedTuple):
    """A route message's fields (a named tuple, as NeighRecord)."""

    family: int
    dst: bytes
    dst_len: int
    table: int
    protocol: int
    rtype: int
    flags: int
    gateway: bytes | None
    oif: int | None
    metric: int


def parse_route(payload: memoryview) -> RouteRecord:
    family, dst_len, _src_len, _tos, table, protocol, _scope, rtype, flags = RTMSG.unpack_from(payload, 0)
    a = attrs(payload, RTMSG.size)
    if RTA_TABLE in a:
        table = U32.unpack_from(a[RTA_TABLE])[0]
    dst = bytes(a[RTA_DST]) if RTA_DST in a else b"\0" * (4 if family == AF_INET else 16)
    gw = a.get(RTA_GATEWAY)
    oif = U32.unpack_from(a[RTA_OIF])[0] if RTA_OIF in a else None
    metric = U32.unpack_from(a[RTA_PRIORITY])[0] if RTA_PRIORITY in a else 0
    return RouteRecord(family, dst, dst_len, table, protocol, rtype, flags, bytes(gw) if gw is not None else None,
                       oif, metric)


def is_onlink_route(rec: RouteRecord, index: int) -> bool:
    """A main-table unicast route out of interface `index` with no gateway (not a default route):
    the interface's link reaches that network without a router."""
    return rec.oif == index and rec.gateway is None and rec.dst_len > 0 and rec.table == RT_TABLE_MAIN \
        and rec.rtype == RTN_UNICAST


def parse_link(payload: memoryview) -> ObservedLink:
    """A link message as the device it describes; a VXLAN device's parameters in ``data`` under
    the names pyroute2 gives them, so flannelctl doctor's reading and ours are one type."""
    _family, _type, index, flags, _change = IFINFO.unpack_from(payload, 0)
    a = attrs(payload, IFINFO.size)
    name = bytes(a[IFLA_IFNAME]).rstrip(b"\0").decode() if IFLA_IFNAME in a else f"if{index}"
    mtu = U32.unpack_from(a[IFLA_MTU])[0] if IFLA_MTU in a else 0
    mac = mac_text(a[IFLA_ADDRESS]) if IFLA_ADDRESS in a and len(a[IFLA_ADDRESS]) == 6 else None
    kind = None
    data: dict[str, object] = {}
    if IFLA_LINKINFO in a:
        info = attrs(a[IFLA_LINKINFO], 0)
        if IFLA_INFO_KIND in info:
            kind = bytes(info[IFLA_INFO_KIND]).rstrip(b"\0").decode()
        if kind == "vxlan" and IFLA_INFO_DATA in info:
            d = attrs(info[IFLA_INFO_DATA], 0)
            if IFLA_VXLAN_ID in d:
                data["IFLA_VXLAN_ID"] = U32.unpack_from(d[IFLA_VXLAN_ID])[0]
            if IFLA_VXLAN_LINK in d:
                data["IFLA_VXLAN_LINK"] = U32.unpack_from(d[IFLA_VXLAN_LINK])[0]
            if IFLA_VXLAN_LOCAL in d:
                data["IFLA_VXLAN_LOCAL"] = ip_text(bytes(d[IFLA_VXLAN_LOCAL]))
            if IFLA_VXLAN_LOCAL6 in d:
                data["IFLA_VXLAN_LOCAL6"] = ip_text(bytes(d[IFLA_VXLAN_LOCAL6]))
            if IFLA_VXLAN_PORT in d:
                data["IFLA_VXLAN_PORT"] = struct.unpack_from(">H", d[IFLA_VXLAN_PORT])[0]
            data["IFLA_VXLAN_LEARNING"] = d[IFLA_VXLAN_LEARNING][0] if IFLA_VXLAN_LEARNING in d else 0
            if IFLA_VXLAN_GBP in d:
                data["IFLA_VXLAN_GBP"] = True
    return ObservedLink(name, index, kind, mtu, mac, bool(flags & IFF_UP), data)


@dataclass(frozen=True, slots=True)
class AddrRecord:
    family: int
    prefixlen: int
    ifindex: int
    address: bytes | None
    scope: int = 0
    flags: int = 0


def parse_addr(payload: memoryview) -> AddrRecord:
    family, prefixlen, flags, scope, index = IFADDR.unpack_from(payload, 0)
    a = attrs(payload, IFADDR.size)
    addr = a.get(IFA_LOCAL, a.get(IFA_ADDRESS))
    if IFA_FLAGS in a:
        flags = U32.unpack_from(a[IFA_FLAGS])[0]
    return AddrRecord(family, prefixlen, index, bytes(addr) if addr is not None else None, scope, flags)


def parse_error(payload: memoryview) -> tuple[int, int, str]:
    """(negative errno or 0, seq of the failed request, extended-ack message)."""
    (error,) = ERR.unpack_from(payload, 0)
    _len, _kind, _flags, seq, _pid = HDR.unpack_from(payload, 4)
    text = ""
    # with NETLINK_CAP_ACK the original request is not echoed, so TLVs follow the header copy
    a = attrs(payload, 4 + 16)
    if NLMSGERR_ATTR_MSG in a:
        text = bytes(a[NLMSGERR_ATTR_MSG]).rstrip(b"\0").decode(errors="replace")
    return error, seq, text


# ---------------------------------------------------------------------------------------------
# text <-> bytes


def ip_bytes(text: str) -> bytes:
    return socket.inet_pton(AF_INET6 if ":" in text else AF_INET, text)


def ip_text(raw: bytes) -> str:
    return socket.inet_ntop(AF_INET if len(raw) == 4 else AF_INET6, raw)


def mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def mac_text(raw: bytes) -> str:
    return raw.hex(":")
