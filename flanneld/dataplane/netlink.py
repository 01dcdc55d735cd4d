"""The one owner of netlink in the daemon: devices, addresses, lookups and the bulk tables.

Nothing else in flanneld talks to the kernel's networking state. Everything goes through one
raw rtnetlink socket with messages from :mod:`flanneld.dataplane.nlcodec`. Per-peer tables (neighbours,
FDB, routes) are sent ~64 KiB per ``send()``, the last message of each batch asking for an ACK:
the kernel processes a send synchronously, so once that ACK arrives every error of the batch is
queued before it, and successful messages cost no reply at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from flanneld.dataplane import nlcodec as nl
from flanneld.model.family import Family
from flanneld.plan.state import ObservedLink, VxlanLink

log = logging.getLogger(__name__)

SOL_NETLINK = 270
NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK = 10, 11, 12
SO_RCVBUFFORCE, SO_SNDBUFFORCE = 33, 32
BATCH_BYTES = 64 * 1024
RECV_BYTES = 64 * 1024  # the kernel never builds netlink messages over 32 KiB for us
NLM_F_DUMP_INTR = 0x10
SIOCETHTOOL, ETHTOOL_GTXCSUM, ETHTOOL_STXCSUM = 0x8946, 0x16, 0x17


class KernelError(Exception):
    """A netlink request failed; the message names the object and the kernel's reason."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


def _describe(err: int, text: str) -> str:
    reason = os.strerror(-err) if err < 0 else "unknown error"
    return f"{reason}: {text}" if text else reason


@dataclass(frozen=True, slots=True)
class WriteFailure:
    item: object
    errno: int  # positive
    message: str


class BulkSocket:
    """A raw netlink socket (NETLINK_ROUTE unless told) for batched writes and dumps (not thread-safe: one owner)."""

    def __init__(self, protocol: int = socket.NETLINK_ROUTE) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK):
            self.sock.setsockopt(SOL_NETLINK, opt, 1)
        for opt, size in ((SO_RCVBUFFORCE, 8 << 20), (SO_SNDBUFFORCE, 1 << 20)):
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, opt, size)
        self.sock.bind((0, 0))
        self._seq = 1
        self._buf = bytearray(RECV_BYTES)

    def close(self) -> None:
        self.sock.close()

    def next_seq(self) -> int:
        self._seq = (self._seq % 0x7FFFFFFF) + 1
        return self._seq

    def _recv(self) -> memoryview:
        n = self.sock.recv_into(self._buf)
        return memoryview(self._buf)[:n]

    def write(self, items: Sequence[tuple[bytes, object]], ignore_on_delete: bool = True) -> list[WriteFailure]:
        """Send (message, item) pairs in order; return the failures (deletes of absent entries are fine).

        Messages must carry sequence numbers from next_seq().
        """
        failures: list[WriteFailure] = []
        start = 0
        while start < len(items):
            size, end = 0, start
            while end < len(items) and (end == start or size + len(items[end][0]) <= BATCH_BYTES):
                size += len(items[end][0])
                end += 1
            chunk = items[start:end]
            by_seq = {nl.HDR.unpack_from(msg)[3]: (msg, item) for msg, item in chunk}
            last = bytearray(chunk[-1][0])
            flags = nl.HDR.unpack_from(last)[2] | nl.NLM_F_ACK
            struct.pack_into("=H", last, 6, flags)
            fence = nl.HDR.unpack_from(last)[3]
            self.sock.send(b"".join(m for m, _ in chunk[:-1]) + bytes(last))
            done = False
            while not done:
                for kind, _flags, _seq, payload in nl.messages(self._recv()):
                    if kind != nl.NLMSG_ERROR:
                        continue
                    err, seq, text = nl.parse_error(payload)
                    if err and seq in by_seq:
                        msg, item = by_seq[seq]
                        is_delete = nl.HDR.unpack_from(msg)[1] in (nl.RTM_DELNEIGH, nl.RTM_DELROUTE)
                        if not (is_delete and ignore_on_delete and -err in (errno.ENOENT, errno.ESRCH)):
                            failures.append(WriteFailure(item, -err, _describe(err, text)))
                    if seq == fence:
                        done = True
            start = end
        return failures

    def request(self, message: bytes) -> list[tuple[int, memoryview]]:
        """One request; its reply messages (none for a plain ACK). Raises KernelError with errno."""
        _len, _kind, flags, seq, _pid = nl.HDR.unpack_from(message)
        self.sock.send(message)
        replies: list[tuple[int, memoryview]] = []
        while True:
            for kind, _f, rseq, payload in nl.messages(self._recv()):
                if rseq != seq:
                    continue
                if kind == nl.NLMSG_ERROR:
                    err, _, text = nl.parse_error(payload)
                    if err:
                        raise KernelError(_describe(err, text), -err)
                    return replies
                replies.append((kind, memoryview(bytes(payload))))
                if not flags & nl.NLM_F_ACK:
                    return replies

    def dump(self, request: bytes) -> Iterator[tuple[int, memoryview]]:
        """Run a dump request; yields (type, payload). Restarts when the kernel reports interference."""
        for _attempt in range(5):
            self.sock.send(request)
            results: list[tuple[int, bytes]] = []
            interrupted = False
            while True:
                chunk = self._recv()
                finished = False
                for kind, flags, _seq, payload in nl.messages(chunk):
                    if flags & NLM_F_DUMP_INTR:
                        interrupted = True
                    if kind == nl.NLMSG_DONE:
                        finished = True
                        break
                    if kind == nl.NLMSG_ERROR:
                        err, _, text = nl.parse_error(payload)
                        if err:
                            raise KernelError(f"netlink dump failed: {_describe(err, text)}")
                        continue
                    results.append((kind, bytes(payload)))
                if finished:
                    break
            if not interrupted:
                for kind, payload in results:
                    yield kind, memoryview(payload)
                return
        raise KernelError("netlink dump kept being interrupted by concurrent changes")


class Monitor:
    """Netlink change notifications: links, addresses, neighbours/FDB and routes, both families."""

    GROUPS = 0x1 | 0x4 | 0x10 | 0x40 | 0x100 | 0x400  # LINK NEIGH IPV4_IFADDR IPV4_ROUTE IPV6_IFADDR IPV6_ROUTE

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        self.sock.bind((0, self.GROUPS))
        self._buf = bytearray(RECV_BYTES)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[tuple[int, bytes]] | None:
        """Pending notifications, or None when some were lost (receive buffer overflow)."""
        try:
            n = self.sock.recv_into(self._buf, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return []
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                return None
            raise
        return [(kind, bytes(payload)) for kind, _f, _s, payload in nl.messages(memoryview(self._buf)[:n])]

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class AddrInfo:
    index: int
    ip: str
    prefixlen: int
    scope: int
    flags: int = nl.IFA_F_PERMANENT  # IFA_F_*: permanent, temporary (privacy), deprecated, tentative...

    @property
    def permanent(self) -> bool:
        return bool(self.flags & nl.IFA_F_PERMANENT)

    @property
    def usable(self) -> bool:
        """Not deprecated, not (yet) tentative, not failed DAD: an address to send from."""
        return not self.flags & (nl.IFA_F_DEPRECATED | nl.IFA_F_TENTATIVE | nl.IFA_F_DADFAILED)

    @property
    def version(self) -> int:
        return 6 if ":" in self.ip else 4


class Kernel:
    """Kernel networking state of the namespace we run in."""

    def __init__(self) -> None:
        self.bulk = BulkSocket()

    def close(self) -> None:
        self.bulk.close()

    def _request(self, build, what: str, absent_ok: tuple[int, ...] = ()) -> list[tuple[int, memoryview]]:  # type: ignore[no-untyped-def]
        try:
            return self.bulk.request(build(self.bulk.next_seq()))
        except KernelError as exc:
            if exc.errno in absent_ok:
                return []
            raise KernelError(f"{what}: {exc}", exc.errno) from None

    # -- links -------------------------------------------------------------------------------

    def links(self) -> list[ObservedLink]:
        return [nl.parse_link(p) for kind, p in self.bulk.dump(nl.get_links(self.bulk.next_seq()))
                if kind == nl.RTM_NEWLINK]

    def link(self, name: str) -> ObservedLink | None:
        found = self._request(lambda seq: nl.get_links(seq, name), f"reading link {name}",
                              absent_ok=(errno.ENODEV,))
        return nl.parse_link(found[0][1]) if found else None

    def create_vxlan(self, spec: VxlanLink, underlay_index: int, mac: str | None) -> ObservedLink:
        self._request(lambda seq: nl.vxlan_link(seq, spec.name, spec.mtu, nl.mac_bytes(mac) if mac else None,
                                                spec.vni, underlay_index, nl.ip_bytes(spec.local),
                                                spec.port or 8472, spec.learning, spec.gbp),
                      f"creating VXLAN device {spec.name}")
        info = self.link(spec.name)
        if info is None:
            raise KernelError(f"VXLAN device {spec.name} vanished right after creation")
        return info

    def create_plain_link(self, name: str, mtu: int, kind: str) -> ObservedLink:
        """A device of a parameterless kind (``wireguard``); KernelError with EOPNOTSUPP when the kernel lacks it."""
        self._request(lambda seq: nl.plain_link(seq, name, mtu, kind), f"creating {kind} device {name}")
        info = self.link(name)
        if info is None:
            raise KernelError(f"{kind} device {name} vanished right after creation")
        return info

    def delete_link(self, index: int) -> None:
        self._request(lambda seq: nl.del_link(seq, index), f"deleting link {index}", absent_ok=(errno.ENODEV,))

    def set_link(self, index: int, *, mtu: int | None = None, up: bool | None = None) -> None:
        self._request(lambda seq: nl.set_link(seq, index, mtu, up), f"configuring link {index}")

    # -- addresses and lookups ---------------------------------------------------------------

    def addresses(self, index: int | None = None) -> list[AddrInfo]:
        out = []
        for kind, payload in self.bulk.dump(nl.dump_addresses(self.bulk.next_seq())):
            rec = nl.parse_addr(payload)
            if kind != nl.RTM_NEWADDR or rec.address is None or (index is not None and rec.ifindex != index):
                continue
            out.append(AddrInfo(rec.ifindex, nl.ip_text(rec.address), rec.prefixlen, rec.scope, rec.flags))
        return out

    def add_address(self, index: int, ip: str, prefixlen: int) -> None:
        self._request(lambda seq: nl.address(seq, False, index, nl.ip_bytes(ip), prefixlen),
                      f"adding address {ip}/{prefixlen}")

    def del_address(self, index: int, ip: str, prefixlen: int) -> None:
        self._request(lambda seq: nl.address(seq, True, index, nl.ip_bytes(ip), prefixlen),
                      f"removing address {ip}/{prefixlen}", absent_ok=(errno.EADDRNOTAVAIL, errno.ENODEV))

    def default_route_oif(self, family: Family) -> int | None:
        """The interface of the main table's default route of this family (lowest metric)."""
        best: tuple[int, int] | None = None
        for _kind, payload in self.bulk.dump(nl.dump_routes(self.bulk.next_seq(), family.af)):
            if payload[1] != 0:  # rtm_dst_len: with thousands of peer routes, parse only defaults
                continue
            rec = nl.parse_route(payload)
            if rec.dst_len == 0 and rec.table == nl.RT_TABLE_MAIN and rec.oif is not None and \
                    (best is None or rec.metric < best[0]):
                best = (rec.metric, rec.oif)
        return best[1] if best else None

    def onlink_routes(self, index: int) -> list[tuple[int, bytes, int]]:
        """(family, destination, prefix length) of the main table's routes that leave by interface
        `index` with no gateway, other than default routes: networks it reaches directly."""
        out = []
        for af in (nl.AF_INET, nl.AF_INET6):
            for kind, payload in self.bulk.dump(nl.dump_routes(self.bulk.next_seq(), af)):
                if kind == nl.RTM_NEWROUTE and nl.is_onlink_route(rec := nl.parse_route(payload), index):
                    out.append((rec.family, rec.dst, rec.dst_len))
        return out

    def route_get(self, ip: str) -> tuple[int | None, str | None, str | None]:
        """(output interface, gateway, preferred source address) the kernel would use for `ip`."""
        found = self._request(lambda seq: nl.get_route(seq, nl.ip_bytes(ip)), f"no route to {ip}")
        if not found:
            return None, None, None
        payload = found[0][1]
        rec = nl.parse_route(payload)
        src = nl.attrs(payload, nl.RTMSG.size).get(nl.RTA_PREFSRC)
        return rec.oif, nl.ip_text(rec.gateway) if rec.gateway else None, nl.ip_text(bytes(src)) if src else None

    # -- knobs -------------------------------------------------------------------------------

    def tx_checksum(self, name: str) -> bool:
        return bool(_ethtool(name, ETHTOOL_GTXCSUM))

    def set_tx_checksum(self, name: str, enabled: bool) -> None:
        _ethtool(name, ETHTOOL_STXCSUM, int(enabled))

    @staticmethod
    def sysctl(path: str, value: str) -> None:
        with open(f"/proc/sys/{path}", "w") as fh:
            fh.write(value)


def _ethtool(name: str, cmd: int, data: int = 0) -> int:
    """SIOCETHTOOL with a struct ethtool_value (no ethtool binary needed)."""
    value = ctypes.create_string_buffer(struct.pack("=II", cmd, data), 8)
    ifreq = struct.pack("@16sP", name.encode()[:15], ctypes.addressof(value)).ljust(40, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
        except OSError as exc:
            raise KernelError(f"ethtool on {name}: {exc.strerror}") from None
    return struct.unpack("=II", value.raw)[1]
