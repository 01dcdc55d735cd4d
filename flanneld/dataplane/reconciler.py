"""Make the kernel equal the desired state: diff what we own against what we want, apply the rest.

Three ways in, one mechanism ("make actual equal desired"):

* :meth:`Reconciler.reconcile` — full: devices, addresses, then dumps of our neighbour, FDB and
  route tables, diffed against the desired state. Used at start (which also removes entries of
  peers that left while we were down), after drift and periodically.
* :meth:`Reconciler.change` — incremental, for lease events: the entries of peers that came,
  changed or went are written without dumping anything (cost proportional to the change).
* :meth:`Reconciler.is_drift` — decides whether a netlink notification shows someone changed
  what we own (deleted our route, neighbour, FDB entry, address or device), so the daemon can
  run a full reconcile within milliseconds. Our own writes produce notifications that agree
  with the desired state and are ignored.

What we own: the devices the backend asks for (each kind handled by :mod:`flanneld.dataplane.devices`);
permanent neighbours and FDB entries on them; addresses inside the overlay networks on them;
main-table routes (not kernel-made) whose destination lies in an overlay network, whether they
leave by one of our devices or by the external interface (host-gw, DirectRouting). A backend with
no devices is the same code with empty device tables.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from flanneld.dataplane import nlcodec as nl
from flanneld.dataplane.devices import handler
from flanneld.dataplane.netlink import Kernel, WriteFailure
from flanneld.model.family import family_of
from flanneld.plan.backend import PeerPlan
from flanneld.plan.state import (
    Address,
    DesiredState,
    Fdb,
    LinkSpec,
    Neigh,
    ObservedLink,
    Route,
    TableDiff,
    WgPeer,
    diff,
    endpoint_learnt,
)

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What one reconcile did (for logs, metrics and tests)."""

    full: bool
    created: list[str] = field(default_factory=list)
    devices: dict[str, ObservedLink] = field(default_factory=dict)
    written: int = 0
    deleted: int = 0
    failures: list[WriteFailure] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.created or self.written or self.deleted)


class _OwnedRoutes:
    """Fast ownership test on raw route dumps: destination inside one of the overlay networks."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.nets = [ipaddress.ip_network(n) for n in networks]

    def owns(self, family: int, dst: bytes, dst_len: int) -> bool:
        value = int.from_bytes(dst, "big")
        bits = 32 if family == nl.AF_INET else 128
        for net in self.nets:
            if net.max_prefixlen == bits and dst_len >= net.prefixlen and \
                    value >> (bits - net.prefixlen) == int(net.network_address) >> (bits - net.prefixlen):
                return True
        return False


class Reconciler:
    def __init__(self, kernel: Kernel, underlay: str, underlay_index: int) -> None:
        """`underlay`: the external interface chosen by interface selection (routes of host-gw and
        DirectRouting leave by it; device kinds that need a lower device are created over it)."""
        self.kernel = kernel
        self.underlay = underlay
        self.underlay_index = underlay_index
        self._told: set[tuple[object, int]] = set()  # write refusals already warned of (see _say)
        self.desired: DesiredState | None = None  # devices, addresses, owned networks of the last reconcile
        self.index: dict[str, int] = {underlay: underlay_index}  # our devices and the underlay by name
        self._names: dict[int, str] = {underlay_index: underlay}
        self._owned = _OwnedRoutes(())
        self._neigh_keys: dict[tuple[str, str], Neigh] = {}
        self._fdb_keys: dict[tuple[str, str], Fdb] = {}
        self._route_keys: dict[tuple[str, int], Route] = {}
        self._wg_keys: dict[tuple[str, str], WgPeer] = {}
        # per WireGuard peer, the endpoint its lease gave when we last wrote or adopted it: one the
        # device reports otherwise was learnt from the peer's handshakes (see _learnt_endpoints_kept)
        self._wg_endpoints: dict[tuple[str, str], str] = {}

    def underlay_recreated(self, index: int) -> None:
        """The external interface was deleted and created again under the same name (a bond,
        VLAN or bridge rebuilt, a NIC re-probed): devices over it are created on the new one."""
        self._names.pop(self.underlay_index, None)
        self.underlay_index = index
        self.index[self.underlay] = index
        self._names[index] = self.underlay

    # -- devices and addresses ---------------------------------------------------------------

    def ensure_links(self, links: Iterable[LinkSpec], report: Report | None = None) -> dict[str, ObservedLink]:
        """Create, adopt or repair our devices (each through its kind's handler); returns them as they now are."""
        result: dict[str, ObservedLink] = {}
        for spec in links:
            kind = handler(spec.kind)
            current = self.kernel.link(spec.name)
            replaced = None
            if current is not None:
                why = kind.incompatible(current, spec, self.underlay_index)
                if why:
                    log.warning("%s exists but %s; recreating it", spec.name, why)
                    self.kernel.delete_link(current.index)
                    replaced, current = current, None
            if current is None:
                current = kind.create(self.kernel, spec, self.underlay_index, replaced)
                if report is not None:
                    report.created.append(spec.name)
                if spec.family == 6:
                    self.kernel.sysctl(f"net/ipv6/conf/{spec.name}/accept_ra", "0")
            if current.mtu != spec.mtu:
                log.info("setting MTU of %s to %d (was %d)", spec.name, spec.mtu, current.mtu)
                self.kernel.set_link(current.index, mtu=spec.mtu)
            if not current.up:
                self.kernel.set_link(current.index, up=True)
            kind.settle(self.kernel, spec, current)
            self.index[spec.name] = current.index
            result[spec.name] = replace(current, mtu=spec.mtu, up=True)  # as it now is
        self._names = {v: k for k, v in self.index.items()}
        return result

    def _ensure_addresses(self, desired: DesiredState) -> None:
        nets = [ipaddress.ip_network(n) for n in desired.owned_networks]
        for dev in desired.devices:
            index = self.index[dev]
            want = {a.cidr for a in desired.addresses if a.dev == dev}
            have = set()
            for a in self.kernel.addresses(index):
                cidr = f"{a.ip}/{a.prefixlen}"
                addr = ipaddress.ip_address(a.ip)
                if cidr in want:
                    have.add(cidr)
                elif any(addr.version == n.version and addr in n for n in nets):
                    log.info("removing stale address %s from %s", cidr, dev)
                    self.kernel.del_address(index, a.ip, a.prefixlen)
            for cidr in sorted(want - have):
                ip, plen = cidr.split("/")
                self.kernel.add_address(index, ip, int(plen))
                log.info("added address %s to %s", cidr, dev)

    # -- tables ------------------------------------------------------------------------------

    def _actual(self, desired: DesiredState) -> tuple[set[Neigh], set[Fdb], set[Route], set[WgPeer]]:
        bulk = self.kernel.bulk
        neighs: set[Neigh] = set()
        fdbs: set[Fdb] = set()
        wg: set[WgPeer] = set()
        for link in desired.links:
            wg |= handler(link.kind).read_peers(self.kernel, link)
            index = self.index[link.name]
            family = family_of(link.family).af
            for _kind, payload in bulk.dump(nl.dump_neighs(bulk.next_seq(), family, index)):
                rec = nl.parse_neigh(payload)
                if rec.ifindex == index and rec.state & nl.NUD_PERMANENT and rec.dst and rec.lladdr:
                    neighs.add(Neigh(link.name, nl.ip_text(rec.dst), nl.mac_text(rec.lladdr)))
            for _kind, payload in bulk.dump(nl.dump_neighs(bulk.next_seq(), nl.AF_BRIDGE, index)):
                rec = nl.parse_neigh(payload)
                if rec.ifindex == index and rec.state & nl.NUD_PERMANENT and rec.dst and rec.lladdr:
                    fdbs.add(Fdb(link.name, nl.mac_text(rec.lladdr), nl.ip_text(rec.dst)))
        routes: set[Route] = set()
        families = {family_of(ipaddress.ip_network(n).version).af for n in desired.owned_networks}
        for family in sorted(families):
            for _kind, payload in bulk.dump(nl.dump_routes(bulk.next_seq(), family)):
                rec = nl.parse_route(payload)
                if rec.table != nl.RT_TABLE_MAIN or rec.protocol == nl.RTPROT_KERNEL or \
                        rec.rtype not in (nl.RTN_UNICAST, nl.RTN_BLACKHOLE):
                    continue
                if self._owned.owns(rec.family, rec.dst, rec.dst_len):
                    routes.add(self._route_of(rec))
        return neighs, fdbs, routes, wg

    def _route_of(self, rec: nl.RouteRecord) -> Route:
        dst = f"{nl.ip_text(rec.dst)}/{rec.dst_len}"
        if rec.rtype == nl.RTN_BLACKHOLE:
            return Route(dst, blackhole=True, metric=rec.metric)
        dev = self._names.get(rec.oif, f"if{rec.oif}") if rec.oif is not None else None
        return Route(dst, nl.ip_text(rec.gateway) if rec.gateway else None, dev,
                     bool(rec.flags & nl.RTNH_F_ONLINK), False, rec.metric)

    def _write(self, neigh: TableDiff[Neigh], fdb: TableDiff[Fdb], route: TableDiff[Route], wg: TableDiff[WgPeer],
               report: Report) -> None:
        """Deletes first (routes, FDB, neighbours), then puts (neighbours, FDB, routes): upstream order.
        WireGuard peers go to their device's own table, one request per device."""
        if wg:
            self._write_wg(wg, report)
        bulk = self.kernel.bulk
        ix = self.index
        items: list[tuple[bytes, object]] = []
        for r in route.delete:
            net = ipaddress.ip_network(r.dst)
            items.append((nl.route(bulk.next_seq(), True, net.network_address.packed, net.prefixlen, None, None,
                                   False, r.blackhole, r.metric), r))
        items += [(nl.fdb(bulk.next_seq(), True, ix[f.dev], nl.mac_bytes(f.mac), nl.ip_bytes(f.dst)), f)
                  for f in fdb.delete if f.dev in ix]
        items += [(nl.neigh(bulk.next_seq(), True, ix[n.dev], nl.ip_bytes(n.ip), b""), n)
                  for n in neigh.delete if n.dev in ix]
        report.deleted += len(items)
        puts: list[tuple[bytes, object]] = []
        puts += [(nl.neigh(bulk.next_seq(), False, ix[n.dev], nl.ip_bytes(n.ip), nl.mac_bytes(n.mac)), n)
                 for n in neigh.put]
        puts += [(nl.fdb(bulk.next_seq(), False, ix[f.dev], nl.mac_bytes(f.mac), nl.ip_bytes(f.dst)), f)
                 for f in fdb.put]
        for r in route.put:
            net = ipaddress.ip_network(r.dst)
            gw = nl.ip_bytes(r.gateway) if r.gateway else None
            oif = ix.get(r.dev) if r.dev else None
            if r.dev and oif is None:
                oif = self._lookup_index(r.dev)
            puts.append((nl.route(bulk.next_seq(), False, net.network_address.packed, net.prefixlen, gw, oif,
                                  r.onlink, r.blackhole, r.metric), r))
        report.written += len(puts)
        self._say(bulk.write(items + puts), report)

    def _write_wg(self, wg: TableDiff[WgPeer], report: Report) -> None:
        desired = self.desired
        specs = {link.name: link for link in desired.links} if desired is not None else {}
        for p in wg.put:
            self._wg_endpoints[p.key] = p.endpoint
        for p in wg.delete:
            self._wg_endpoints.pop(p.key, None)
        for dev, spec in specs.items():
            put = [p for p in wg.put if p.dev == dev]
            delete = [p for p in wg.delete if p.dev == dev]
            if not put and not delete:
                continue
            failures = handler(spec.kind).write_peers(self.kernel, spec, put, delete)
            report.written += len(put)
            report.deleted += len(delete)
            self._say(failures, report, "WireGuard peer ")

    def _learnt_endpoints_kept(self, table: TableDiff[WgPeer], actual: set[WgPeer]) -> TableDiff[WgPeer]:
        """WireGuard learns a peer's endpoint from its handshakes: a peer behind NAT is reached at
        its mapped address and port, not the one its lease publishes. Such an endpoint is no
        drift; the lease's is written when the peer is new or the lease's endpoint changed (or the
        peer differs in anything else). A peer met first on a device we adopt keeps its endpoint."""
        have = {p.key: p for p in actual}
        put = []
        for peer in table.put:
            current = have.get(peer.key)
            if current is not None and endpoint_learnt(current, peer) and \
                    self._wg_endpoints.get(peer.key, peer.endpoint) == peer.endpoint:
                self._wg_endpoints[peer.key] = peer.endpoint
                continue
            put.append(peer)
        return TableDiff(put, table.delete)

    def _say(self, failures: list[WriteFailure], report: Report, what: str = "") -> None:
        """Add `failures` to the report; warn of each once, not on every retry of the same refusal
        (a full reconcile forgets the ones it no longer meets, so a refusal that comes back is told)."""
        for failure in failures:
            if (failure.item, failure.errno) not in self._told:
                self._told.add((failure.item, failure.errno))
                log.warning("could not write %s%s: %s", what, failure.item, failure.message)
        report.failures += failures

    def _lookup_index(self, name: str) -> int | None:
        link = self.kernel.link(name)
        if link is not None:
            self.index[name] = link.index
            self._names[link.index] = name
            return link.index
        return None

    def _adopt(self, desired: DesiredState) -> None:
        """Remember `desired`, keyed the way the kernel keys entries (for changes and drift checks).

        The table entries live only in the keyed dicts: keeping the merged frozensets as well
        would hold every entry twice.
        """
        self.desired = DesiredState(desired.links, desired.addresses, owned_networks=desired.owned_networks)
        self._owned = _OwnedRoutes(desired.owned_networks)
        self._neigh_keys = {n.key: n for n in desired.neighs}
        self._fdb_keys = {f.key: f for f in desired.fdbs}
        self._route_keys = {r.key: r for r in desired.routes}
        self._wg_keys = {p.key: p for p in desired.wg_peers}

    # -- entry points ------------------------------------------------------------------------

    def reconcile(self, desired: DesiredState) -> Report:
        """Full reconcile: devices, addresses and every owned table entry."""
        start = time.perf_counter()
        report = Report(full=True)
        report.devices = self.ensure_links(desired.links, report)
        self._adopt(desired)
        self._ensure_addresses(desired)
        neighs, fdbs, routes, wg = self._actual(desired)
        self._write(diff(desired.neighs, neighs), diff(desired.fdbs, fdbs), diff(desired.routes, routes),
                    self._learnt_endpoints_kept(diff(desired.wg_peers, wg), wg), report)
        self._told &= {(f.item, f.errno) for f in report.failures}
        report.seconds = time.perf_counter() - start
        return report

    def change(self, added: PeerPlan, removed: PeerPlan) -> Report:
        """Write what peers added and delete what they took away (call reconcile() first).

        An entry whose key another peer still wants is replaced, not deleted; a full reconcile
        later settles any such overlap exactly.
        """
        start = time.perf_counter()
        report = Report(full=False)
        tables: list[TableDiff] = []
        for keys, gone, new in ((self._neigh_keys, removed.neighs, added.neighs),
                                (self._fdb_keys, removed.fdbs, added.fdbs),
                                (self._route_keys, removed.routes, added.routes),
                                (self._wg_keys, removed.wg_peers, added.wg_peers)):
            for entry in gone:
                if keys.get(entry.key) == entry:
                    del keys[entry.key]
            put = []
            for entry in new:
                if keys.get(entry.key) != entry:
                    keys[entry.key] = entry
                    put.append(entry)
            tables.append(TableDiff(put, [e for e in gone if e.key not in keys]))
        self._write(tables[0], tables[1], tables[2], tables[3], report)
        report.seconds = time.perf_counter() - start
        return report

    def is_drift(self, kind: int, payload: bytes) -> bool:
        """Does this netlink notification contradict the desired state?"""
        desired = self.desired
        if desired is None:
            return False
        view = memoryview(payload)
        try:
            if kind in (nl.RTM_NEWLINK, nl.RTM_DELLINK):
                link = nl.parse_link(view)
                ours = link.index in self._names and self._names[link.index] in desired.devices
                named = link.name in desired.devices
                if kind == nl.RTM_DELLINK:
                    return ours or named
                return (named and self.index.get(link.name) != link.index) or (ours and not link.up)
            if kind in (nl.RTM_NEWADDR, nl.RTM_DELADDR):
                addr = nl.parse_addr(view)
                dev = self._names.get(addr.ifindex)
                if dev not in desired.devices or addr.address is None:
                    return False
                present = Address(dev, f"{nl.ip_text(addr.address)}/{addr.prefixlen}") in desired.addresses
                return present if kind == nl.RTM_DELADDR else not present and self._owned.owns(
                    addr.family, addr.address, addr.prefixlen)
            if kind in (nl.RTM_NEWNEIGH, nl.RTM_DELNEIGH):
                # a deleted entry is reported in whatever state it ended in (often FAILED), so
                # deletions match by key; additions count only when permanent (ours) or wrong
                rec = nl.parse_neigh(view)
                dev = self._names.get(rec.ifindex)
                if dev not in desired.devices or not rec.dst:
                    return False
                permanent = bool(rec.state & nl.NUD_PERMANENT)
                if rec.family == nl.AF_BRIDGE:
                    if not rec.lladdr:
                        return False
                    fdb = Fdb(dev, nl.mac_text(rec.lladdr), nl.ip_text(rec.dst))
                    wanted = self._fdb_keys.get(fdb.key)
                    if kind == nl.RTM_DELNEIGH:
                        return wanted == fdb
                    return (wanted is not None or permanent) and wanted != fdb
                ip = nl.ip_text(rec.dst)
                wanted_n = self._neigh_keys.get((dev, ip))
                if kind == nl.RTM_DELNEIGH:
                    return wanted_n is not None
                if wanted_n is None:
                    return permanent
                return not permanent or rec.lladdr is None or wanted_n != Neigh(dev, ip, nl.mac_text(rec.lladdr))
            if kind in (nl.RTM_NEWROUTE, nl.RTM_DELROUTE):
                rec_r = nl.parse_route(view)
                if rec_r.table != nl.RT_TABLE_MAIN or rec_r.protocol == nl.RTPROT_KERNEL or \
                        not self._owned.owns(rec_r.family, rec_r.dst, rec_r.dst_len):
                    return False
                route = self._route_of(rec_r)
                wanted_r = self._route_keys.get(route.key)
                return wanted_r == route if kind == nl.RTM_DELROUTE else wanted_r != route
        except (ValueError, KeyError, IndexError) as exc:  # a message we cannot read: look everything over
            log.debug("unparseable netlink notification %d: %s", kind, exc)
            return True
        return False
