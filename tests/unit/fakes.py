"""In-memory stand-ins for the kernel tables and the etcd client, for unit tests without root.

The fake kernel speaks the daemon's own netlink bytes: writes are parsed with the codec and kept
as table entries keyed the way the kernel keys them, dumps answer with the same payloads, and
every write is also queued as a notification (what the netlink monitor would see). The fake
etcd_client keeps revisions like etcd: every put/delete bumps the revision, a listing reports it.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from flanneld.dataplane import nlcodec as nl
from flanneld.dataplane.netlink import KernelError, WriteFailure
from flanneld.etcd.client import KeyValue
from flanneld.plan.state import ObservedLink, VxlanLink, WgPeer


class FakeBulk:
    def __init__(self) -> None:
        self.neighs: dict[tuple[int, int, bytes], bytes] = {}  # (family, ifindex, dst)
        self.fdbs: dict[tuple[int, bytes], bytes] = {}  # (ifindex, mac)
        self.routes: dict[tuple[int, bytes, int, int], bytes] = {}  # (family, dst, dst_len, metric)
        self.notifications: list[tuple[int, bytes]] = []
        self.refuse: set[bytes] = set()  # destinations whose writes fail (EINVAL)
        self.writes = 0
        self._seq = 0

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def write(self, items: Sequence[tuple[bytes, object]], ignore_on_delete: bool = True) -> list[WriteFailure]:
        failures = []
        for message, item in items:
            kind = nl.HDR.unpack_from(message)[1]
            payload = memoryview(message)[16:]
            self.writes += 1
            if kind in (nl.RTM_NEWNEIGH, nl.RTM_DELNEIGH):
                rec = nl.parse_neigh(payload)
                if rec.dst in self.refuse:
                    failures.append(WriteFailure(item, 22, "Invalid argument"))
                    continue
                table, key = ((self.fdbs, (rec.ifindex, rec.lladdr)) if rec.family == nl.AF_BRIDGE
                              else (self.neighs, (rec.family, rec.ifindex, rec.dst)))
            else:
                rec_r = nl.parse_route(payload)
                if rec_r.dst in self.refuse:
                    failures.append(WriteFailure(item, 22, "Invalid argument"))
                    continue
                table, key = self.routes, (rec_r.family, rec_r.dst, rec_r.dst_len, rec_r.metric)
            if kind in (nl.RTM_NEWNEIGH, nl.RTM_NEWROUTE):
                table[key] = bytes(payload)  # type: ignore[index]
            else:
                table.pop(key, None)  # type: ignore[arg-type]
            self.notifications.append((kind, bytes(payload)))
        return failures

    def dump(self, request: bytes) -> Iterator[tuple[int, memoryview]]:
        kind = nl.HDR.unpack_from(request)[1]
        body = memoryview(request)[16:]
        if kind == nl.RTM_GETNEIGH:
            family, ifindex = struct.unpack_from("=Bxxxi", body)
            if family == nl.AF_BRIDGE:
                found = [p for (ix, _mac), p in self.fdbs.items() if ix == ifindex]
            else:
                ifindex = nl.U32.unpack_from(body, nl.NDMSG.size + 4)[0]
                found = [p for (fam, ix, _dst), p in self.neighs.items() if fam == family and ix == ifindex]
            yield from ((nl.RTM_NEWNEIGH, memoryview(p)) for p in found)
        elif kind == nl.RTM_GETROUTE:
            family = body[0]
            yield from ((nl.RTM_NEWROUTE, memoryview(p)) for (fam, *_rest), p in self.routes.items() if fam == family)

    def delete_route(self, dst: str) -> None:
        """What `ip route del` would do (and the notification it would cause)."""
        import ipaddress

        net = ipaddress.ip_network(dst)
        for key, payload in list(self.routes.items()):
            if key[1] == net.network_address.packed and key[2] == net.prefixlen:
                del self.routes[key]
                self.notifications.append((nl.RTM_DELROUTE, payload))


@dataclass
class FakeKernel:
    bulk: FakeBulk = field(default_factory=FakeBulk)
    links_by_name: dict[str, ObservedLink] = field(default_factory=dict)
    addrs: dict[int, set[tuple[str, int]]] = field(default_factory=dict)
    sysctls: dict[str, str] = field(default_factory=dict)
    tx_csum: dict[str, bool] = field(default_factory=dict)
    _next_index: int = 10

    def add_plain(self, name: str, index: int, mtu: int = 1500) -> None:
        self.links_by_name[name] = ObservedLink(name, index, None, mtu, "02:00:00:00:00:01", True)

    def link(self, name: str) -> ObservedLink | None:
        return self.links_by_name.get(name)

    def create_vxlan(self, spec: VxlanLink, underlay_index: int, mac: str | None) -> ObservedLink:
        if spec.name in self.links_by_name:
            raise KernelError(f"creating VXLAN device {spec.name}: File exists", 17)
        self._next_index += 1
        local = "IFLA_VXLAN_LOCAL6" if ":" in spec.local else "IFLA_VXLAN_LOCAL"
        data = {"IFLA_VXLAN_ID": spec.vni, "IFLA_VXLAN_LINK": underlay_index, local: spec.local,
                "IFLA_VXLAN_PORT": spec.port or 8472, "IFLA_VXLAN_LEARNING": int(spec.learning),
                **({"IFLA_VXLAN_GBP": True} if spec.gbp else {})}
        link = ObservedLink(spec.name, self._next_index, "vxlan", 1500, mac, False, data)
        self.links_by_name[spec.name] = link
        self.tx_csum[spec.name] = True
        return link

    def delete_link(self, index: int) -> None:
        for name, link in list(self.links_by_name.items()):
            if link.index == index:
                del self.links_by_name[name]
                self.addrs.pop(index, None)
                for table in (self.bulk.neighs, self.bulk.fdbs):
                    for key in [k for k in table if index in k]:
                        del table[key]

    def set_link(self, index: int, *, mtu: int | None = None, up: bool | None = None) -> None:
        from dataclasses import replace

        for name, link in self.links_by_name.items():
            if link.index == index:
                self.links_by_name[name] = replace(link, mtu=mtu if mtu is not None else link.mtu,
                                                   up=up if up is not None else link.up)

    def addresses(self, index: int | None = None):  # type: ignore[no-untyped-def]
        from flanneld.dataplane.netlink import AddrInfo

        return [AddrInfo(ix, ip, plen, 0) for ix, entries in self.addrs.items() for ip, plen in entries
                if index is None or ix == index]

    def onlink_routes(self, index: int) -> list[tuple[int, bytes, int]]:
        return [(rec.family, rec.dst, rec.dst_len) for p in self.bulk.routes.values()
                if nl.is_onlink_route(rec := nl.parse_route(memoryview(p)), index)]

    def add_address(self, index: int, ip: str, prefixlen: int) -> None:
        self.addrs.setdefault(index, set()).add((ip, prefixlen))

    def del_address(self, index: int, ip: str, prefixlen: int) -> None:
        self.addrs.get(index, set()).discard((ip, prefixlen))

    def sysctl(self, path: str, value: str) -> None:
        self.sysctls[path] = value

    def tx_checksum(self, name: str) -> bool:
        return self.tx_csum.get(name, True)

    def set_tx_checksum(self, name: str, enabled: bool) -> None:
        self.tx_csum[name] = enabled


class FakeEtcdClient:
    """etcd's revision semantics for one prefix: get, put, delete, listing at a revision."""

    def __init__(self) -> None:
        self.data: dict[str, KeyValue] = {}
        self.revision = 1
        self.etcd_leases: dict[int, int] = {}  # id -> TTL
        self.requests: Counter[str] = Counter()  # what a client asked for, by call
        self.before_txn: Callable[[], None] = lambda: None  # a test's writer racing every transaction

    def grant(self, ttl: int) -> int:
        self.requests["grant"] += 1
        lease_id = 0x1000 + len(self.etcd_leases)
        self.etcd_leases[lease_id] = ttl
        return lease_id

    def keepalive(self, lease_id: int) -> int:
        self.requests["keepalive"] += 1
        return self.etcd_leases.get(lease_id, 0)

    def revoke(self, lease_id: int) -> None:
        self.etcd_leases.pop(lease_id, None)
        for key in [k for k, kv in self.data.items() if kv.lease_id == lease_id]:
            self.delete(key)

    def put(self, key: str, value: bytes, lease_id: int = 0) -> int:
        self.revision += 1
        old = self.data.get(key)
        self.data[key] = KeyValue(key, value, self.revision, old.create_revision if old else self.revision,
                                  (old.version + 1) if old else 1, lease_id)
        return self.revision

    def delete(self, key: str) -> bool:
        if key not in self.data:
            return False
        self.revision += 1
        del self.data[key]
        return True

    def get(self, key: str) -> KeyValue | None:
        self.requests["get"] += 1
        return self.data.get(key)

    def list_prefix(self, prefix: str, revision: int | None = None,
                    serializable: bool = False) -> tuple[int, list[KeyValue]]:
        self.requests["list"] += 1
        return self.revision, [kv for key, kv in sorted(self.data.items()) if key.startswith(prefix)]

    def txn(self, compares, puts=(), deletes=()) -> bool:  # type: ignore[no-untyped-def]
        """Compares as etcd evaluates them: on one key, or on every key of [key, range_end) (an
        empty range compares a key that does not exist: version 0, mod revision 0)."""
        import operator

        self.requests["txn"] += 1
        self.before_txn()
        ops = {"==": operator.eq, "<": operator.lt, ">": operator.gt, "!=": operator.ne}
        for c in compares:
            if c.range_end is None:
                found = [kv for kv in [self.data.get(c.key)] if kv is not None]
            else:
                end = c.range_end.decode() if isinstance(c.range_end, bytes) else c.range_end
                found = [kv for key, kv in self.data.items() if c.key <= key < end]
            values = [kv.version if c.target == "version" else kv.mod_revision for kv in found] or [0]
            if not all(ops[c.op](have, c.value) for have in values):
                return False
        for key, value, lease_id in puts:
            self.put(key, value, lease_id)
        for key in deletes:
            self.delete(key)
        return True


class FakeWireguard:
    """The wireguard kind's handler, in memory: records every write the reconciler makes."""

    kind = "wireguard"

    def __init__(self) -> None:
        self.peers: dict[str, dict[str, WgPeer]] = {}
        self.writes: list[tuple[list[WgPeer], list[WgPeer]]] = []

    def incompatible(self, link, spec, underlay_index):  # type: ignore[no-untyped-def]
        return ""

    def create(self, kernel, spec, underlay_index, replaced):  # type: ignore[no-untyped-def]
        kernel.add_plain(spec.name, 40)
        self.peers[spec.name] = {}
        return kernel.link(spec.name)

    def settle(self, kernel, spec, link) -> None:  # type: ignore[no-untyped-def]
        pass

    def read_peers(self, kernel, spec) -> set[WgPeer]:  # type: ignore[no-untyped-def]
        return set(self.peers[spec.name].values())

    def write_peers(self, kernel, spec, put, delete):  # type: ignore[no-untyped-def]
        self.writes.append((list(put), list(delete)))
        for p in delete:
            self.peers[spec.name].pop(p.public_key, None)
        for p in put:
            self.peers[spec.name][p.public_key] = p
        return []
