"""The kernel's WireGuard configuration interface (generic netlink family ``wireguard``), codec and client.

For nodes whose kernel has the WireGuard module: the same requests wireguard-go's UAPI takes
(:mod:`flanneld.dataplane.wireguard.uapi`), as ``WG_CMD_SET_DEVICE`` / ``WG_CMD_GET_DEVICE`` messages
(``include/uapi/linux/wireguard.h``). Messages are laid out attribute for attribute as
pyroute2's ``WireGuard`` encodes them (unit tests compare the bytes), but one ``set`` carries
many peers, as the kernel allows, where pyroute2 sends one request per peer; large changes are
split over several requests (none replaces the peer table).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence

from flanneld.dataplane import nlcodec as nl
from flanneld.dataplane.netlink import BulkSocket, KernelError
from flanneld.dataplane.wireguard.uapi import DeviceState, PeerChange, PeerState
from flanneld.model.wgkeys import ZERO, Key
from flanneld.plan.state import sorted_cidrs

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 1, 2
GENLHDR = struct.Struct("=BBH")  # cmd, version, reserved

WG_GENL_NAME = "wireguard"
WG_GENL_VERSION = 1
WG_CMD_GET_DEVICE, WG_CMD_SET_DEVICE = 0, 1
(WGDEVICE_A_IFINDEX, WGDEVICE_A_IFNAME, WGDEVICE_A_PRIVATE_KEY, WGDEVICE_A_PUBLIC_KEY, WGDEVICE_A_FLAGS,
 WGDEVICE_A_LISTEN_PORT, WGDEVICE_A_FWMARK, WGDEVICE_A_PEERS) = range(1, 9)
(WGPEER_A_PUBLIC_KEY, WGPEER_A_PRESHARED_KEY, WGPEER_A_FLAGS, WGPEER_A_ENDPOINT,
 WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, WGPEER_A_LAST_HANDSHAKE_TIME, WGPEER_A_RX_BYTES, WGPEER_A_TX_BYTES,
 WGPEER_A_ALLOWEDIPS, WGPEER_A_PROTOCOL_VERSION) = range(1, 11)
WGALLOWEDIP_A_FAMILY, WGALLOWEDIP_A_IPADDR, WGALLOWEDIP_A_CIDR_MASK = 1, 2, 3
WGPEER_F_REMOVE_ME, WGPEER_F_REPLACE_ALLOWEDIPS = 0x1, 0x2
NESTED = nl.NLA_F_NESTED
PEERS_PER_MESSAGE = 200  # ~30 KiB: well inside one netlink message


def _nla(kind: int, payload: bytes) -> bytes:
    return nl._nla(kind, payload)


def _genl(family_id: int, flags: int, seq: int, cmd: int, version: int, attrs: bytes) -> bytes:
    body = GENLHDR.pack(cmd, version, 0) + attrs
    return nl.HDR.pack(nl.HDR.size + len(body), family_id, flags, seq, 0) + body


def get_family(seq: int, name: str = WG_GENL_NAME) -> bytes:
    return _genl(GENL_ID_CTRL, nl.NLM_F_REQUEST | nl.NLM_F_ACK, seq, CTRL_CMD_GETFAMILY, 1,
                 _nla(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"))


def parse_family_id(payload: memoryview) -> int:
    found = nl.attrs(payload, GENLHDR.size)
    if CTRL_ATTR_FAMILY_ID not in found:
        raise ValueError("the generic netlink controller answered without a family id")
    return int(struct.unpack("=H", found[CTRL_ATTR_FAMILY_ID][:2])[0])


def _endpoint(text: str) -> bytes:
    host, _, port = text.rpartition(":")
    address = ipaddress.ip_address(host.strip("[]"))
    if address.version == 4:
        return struct.pack("=H", socket.AF_INET) + struct.pack(">H", int(port)) + address.packed + bytes(8)
    return struct.pack("=H", socket.AF_INET6) + struct.pack(">HI", int(port), 0) + address.packed + bytes(4)


def _allowed_ip(index: int, cidr: str) -> bytes:
    net = ipaddress.ip_network(cidr)
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return _nla((index + 1) | NESTED, _nla(WGALLOWEDIP_A_FAMILY, struct.pack("=H", family))
                + _nla(WGALLOWEDIP_A_IPADDR, net.network_address.packed)
                + _nla(WGALLOWEDIP_A_CIDR_MASK, bytes([net.prefixlen])))


def _peer(index: int, change: PeerChange) -> bytes:
    """One peer, attributes in pyroute2's order: key, endpoint, PSK, keepalive, flags, allowed IPs."""
    body = _nla(WGPEER_A_PUBLIC_KEY, Key.from_base64(change.public_key).raw)
    if change.remove:
        return _nla((index + 1) | NESTED, body + _nla(WGPEER_A_FLAGS, struct.pack("=I", WGPEER_F_REMOVE_ME)))
    if change.endpoint:
        body += _nla(WGPEER_A_ENDPOINT, _endpoint(change.endpoint))
    body += _nla(WGPEER_A_PRESHARED_KEY, (change.psk or ZERO).raw)  # zero clears a PSK
    body += _nla(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, struct.pack("=H", change.keepalive))
    body += _nla(WGPEER_A_FLAGS, struct.pack("=I", WGPEER_F_REPLACE_ALLOWEDIPS))
    body += _nla(WGPEER_A_ALLOWEDIPS | NESTED, b"".join(_allowed_ip(i, c) for i, c in enumerate(change.allowed_ips)))
    return _nla((index + 1) | NESTED, body)


def set_device(seq: int, family_id: int, ifname: str, private_key: Key | None = None,
               listen_port: int | None = None, changes: Sequence[PeerChange] = ()) -> bytes:
    attrs = _nla(WGDEVICE_A_IFNAME, ifname.encode() + b"\0")
    if private_key is not None:
        attrs += _nla(WGDEVICE_A_PRIVATE_KEY, private_key.raw)
    if listen_port is not None:
        attrs += _nla(WGDEVICE_A_LISTEN_PORT, struct.pack("=H", listen_port))
    if changes:
        attrs += _nla(WGDEVICE_A_PEERS | NESTED, b"".join(_peer(i, c) for i, c in enumerate(changes)))
    return _genl(family_id, nl.NLM_F_REQUEST | nl.NLM_F_ACK, seq, WG_CMD_SET_DEVICE, WG_GENL_VERSION, attrs)


def get_device(seq: int, family_id: int, ifname: str) -> bytes:
    return _genl(family_id, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, seq, WG_CMD_GET_DEVICE, WG_GENL_VERSION,
                 _nla(WGDEVICE_A_IFNAME, ifname.encode() + b"\0"))


def _nested(payload: memoryview) -> Iterator[memoryview]:
    """The elements of a nested array attribute, in order."""
    offset = 0
    while offset + 4 <= len(payload):
        length, _kind = nl.NLA.unpack_from(payload, offset)
        if length < 4:
            break
        yield payload[offset + 4:offset + length]
        offset += (length + 3) & ~3


def _parse_endpoint(raw: memoryview) -> str:
    family = struct.unpack_from("=H", raw)[0]
    port = struct.unpack_from(">H", raw, 2)[0]
    if family == socket.AF_INET:
        return f"{ipaddress.IPv4Address(bytes(raw[4:8]))}:{port}"
    if family == socket.AF_INET6:
        return f"[{ipaddress.IPv6Address(bytes(raw[8:24]))}]:{port}"
    return ""


def _parse_peer(raw: memoryview) -> PeerState:
    a = nl.attrs(raw, 0)
    ips = []
    for item in _nested(a.get(WGPEER_A_ALLOWEDIPS, memoryview(b""))):
        ip_attrs = nl.attrs(item, 0)
        address = ipaddress.ip_address(bytes(ip_attrs[WGALLOWEDIP_A_IPADDR]))
        ips.append(str(ipaddress.ip_network((address, ip_attrs[WGALLOWEDIP_A_CIDR_MASK][0]), strict=False)))
    psk = Key(bytes(a[WGPEER_A_PRESHARED_KEY])) if WGPEER_A_PRESHARED_KEY in a else ZERO
    handshake = struct.unpack_from("=q", a[WGPEER_A_LAST_HANDSHAKE_TIME])[0] \
        if WGPEER_A_LAST_HANDSHAKE_TIME in a else 0

    def u64(kind: int) -> int:
        return struct.unpack_from("=Q", a[kind])[0] if kind in a else 0

    return PeerState(
        public_key=Key(bytes(a[WGPEER_A_PUBLIC_KEY])).base64,
        endpoint=_parse_endpoint(a[WGPEER_A_ENDPOINT]) if WGPEER_A_ENDPOINT in a else "",
        allowed_ips=sorted_cidrs(ips),
        keepalive=struct.unpack_from("=H", a[WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL])[0]
        if WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL in a else 0,
        psk=None if psk == ZERO else psk,
        last_handshake=handshake, rx_bytes=u64(WGPEER_A_RX_BYTES), tx_bytes=u64(WGPEER_A_TX_BYTES),
    )


def parse_device(payloads: Iterable[memoryview]) -> DeviceState:
    """The messages of one GET_DEVICE dump (a big peer table spans several) as one DeviceState.

    A peer split across messages repeats its public key; its allowed IPs are joined.
    """
    private: Key | None = None
    port = 0
    peers: dict[str, PeerState] = {}
    for payload in payloads:
        a = nl.attrs(payload, GENLHDR.size)
        if WGDEVICE_A_PRIVATE_KEY in a:
            private = Key(bytes(a[WGDEVICE_A_PRIVATE_KEY]))
        if WGDEVICE_A_LISTEN_PORT in a:
            port = struct.unpack_from("=H", a[WGDEVICE_A_LISTEN_PORT])[0]
        for raw in _nested(a.get(WGDEVICE_A_PEERS, memoryview(b""))):
            peer = _parse_peer(raw)
            if peer.public_key in peers:
                earlier = peers[peer.public_key]
                joined = sorted_cidrs({*earlier.allowed_ips, *peer.allowed_ips})
                peer = PeerState(earlier.public_key, earlier.endpoint, joined, earlier.keepalive, earlier.psk,
                                 earlier.last_handshake, earlier.rx_bytes, earlier.tx_bytes)
            peers[peer.public_key] = peer
    return DeviceState(None if private == ZERO else private, port, peers)



class GenlClient:
    """Configures kernel WireGuard devices over one generic netlink socket (family id resolved once).

    Raises KernelError (the controller answers ENOENT when the kernel has no WireGuard family).
    """

    def __init__(self) -> None:
        self.sock = BulkSocket(NETLINK_GENERIC)
        try:
            reply = self.sock.request(get_family(self.sock.next_seq()))
        except KernelError as exc:
            self.sock.close()
            raise KernelError(f"the kernel has no WireGuard netlink family ({exc})", exc.errno) from None
        self.family = parse_family_id(reply[0][1])

    def close(self) -> None:
        self.sock.close()

    def get(self, ifname: str) -> DeviceState:
        try:
            return parse_device(p for _kind, p in self.sock.dump(get_device(self.sock.next_seq(), self.family, ifname)))
        except KernelError as exc:
            raise KernelError(f"reading WireGuard device {ifname}: {exc}", exc.errno) from None

    def set(self, ifname: str, private_key: Key | None = None, listen_port: int | None = None,
            changes: Sequence[PeerChange] = ()) -> None:
        chunks = [changes[i:i + PEERS_PER_MESSAGE] for i in range(0, len(changes), PEERS_PER_MESSAGE)] or [()]
        for n, chunk in enumerate(chunks):
            first = n == 0
            message = set_device(self.sock.next_seq(), self.family, ifname, private_key if first else None,
                                 listen_port if first else None, chunk)
            try:
                self.sock.request(message)
            except KernelError as exc:
                raise KernelError(f"configuring WireGuard device {ifname}: {exc}", exc.errno) from None
