"""The VXLAN backend, pure: device parameters, lease attributes and the per-peer plan.

Per peer lease, as upstream: a permanent neighbour ``<peer subnet IP> lladdr <VtepMAC>``, an FDB
entry ``<VtepMAC> dst <PublicIP>`` and an onlink route ``<peer subnet> via <peer subnet IP> dev
flannel.<VNI>``; with DirectRouting and the peer on our L2 only ``<peer subnet> via <PublicIP>``.
IPv4 and IPv6 are the same code over two families (devices ``flannel.<VNI>`` and
``flannel-v6.<VNI>``). Differences from upstream: the IPv6 device's MTU leaves room for the
70-byte IPv6 encapsulation, and the optional blackhole route uses a high metric so it never
shadows the pod bridge's connected route.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from flanneld.model.config import BackendConfig, ConfigError, FamilyConfig, NetworkConfig
from flanneld.model.family import IPV4, IPV6, Family, family_of
from flanneld.model.lease import Lease, LeaseAttrs, backend_json
from flanneld.plan.backend import (
    BackendBase,
    BackendType,
    External,
    PeerPlan,
    int_option,
    own_routes,
    published_addresses,
    register,
)
from flanneld.plan.state import Address, DesiredState, Fdb, Neigh, ObservedLink, Route, VxlanLink

ENCAP_OVERHEAD = {4: 50, 6: 70}
DEFAULT_PORT = 8472  # the kernel's (Linux's historical VXLAN port), which upstream uses
_MAC_RE = re.compile(r"[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}")


def normalize_mac(value: Any) -> str | None:
    if not isinstance(value, str) or not _MAC_RE.fullmatch(value.lower()):
        return None
    return value.lower().replace("-", ":")


def is_unicast(mac: str) -> bool:
    """A MAC an FDB entry can point at: the kernel refuses multicast and broadcast ones (the low bit
    of the first octet) and the all-zero one with EOPNOTSUPP/EINVAL, on every try."""
    return not int(mac[:2], 16) & 1 and mac != "00:00:00:00:00:00"


@dataclass(frozen=True)
class VxlanOptions:
    """The ``Backend`` object of a vxlan config (upstream option names)."""

    vni: int = 1
    port: int = 0
    gbp: bool = False
    learning: bool = False
    direct_routing: bool = False
    mtu: int = 0  # underlay MTU to plan with; 0: the external interface's
    disable_tx_checksum: bool = False  # upstream issue #1279 workaround

    @classmethod
    def parse(cls, backend: BackendConfig) -> VxlanOptions:
        def flag(name: str) -> bool:
            value = backend.get(name, False)
            if not isinstance(value, bool):
                raise ConfigError(f"Backend.{name} must be true or false, got {value!r}")
            return value

        opts = cls(
            vni=int_option(backend, "VNI", 1, 0, 0xFFFFFF),
            port=int_option(backend, "Port", 0, 0, 65535),
            gbp=flag("GBP"),
            learning=flag("Learning"),
            direct_routing=flag("DirectRouting"),
            mtu=int_option(backend, "MTU", 0, 0, 65535),
            disable_tx_checksum=flag("DisableTxChecksumOffloading"),
        )
        if opts.mtu and opts.mtu < 1280:
            raise ConfigError(f"Backend.MTU {opts.mtu} is too small for an overlay (minimum 1280)")
        return opts


@dataclass(frozen=True)
class _Family:
    """One enabled family's VXLAN device: the same code serves IPv4 and IPv6."""

    family: Family
    fam: FamilyConfig
    device: str
    local: ipaddress.IPv4Address | ipaddress.IPv6Address
    public: ipaddress.IPv4Address | ipaddress.IPv6Address


class VxlanBackend(BackendBase):
    type = "vxlan"

    def __init__(self, config: NetworkConfig, ext: External, options: VxlanOptions, blackhole: bool = False):
        self.config = config
        self.ext = ext
        self.options = options
        self.blackhole = blackhole
        self.uses_onlink = options.direct_routing
        self.publics = published_addresses(config, ext)
        self.families: list[_Family] = []
        self.macs: dict[str, str] = {}  # device -> the MAC our lease publishes: kept when a device is recreated
        if config.ipv4 is not None:
            if ext.ip4 is None:
                raise ConfigError(f"interface {ext.name} has no IPv4 address, but the network config enables IPv4")
            self.families.append(_Family(IPV4, config.ipv4, f"flannel.{options.vni}", ext.ip4,
                                         self.publics.public_ip))
        if config.ipv6 is not None:
            if ext.ip6 is None or self.publics.public_ipv6 is None:
                raise ConfigError(f"interface {ext.name} has no global IPv6 address, but the network config "
                                  "enables IPv6")
            self.families.append(_Family(IPV6, config.ipv6, f"flannel-v6.{options.vni}", ext.ip6,
                                         self.publics.public_ipv6))

    def adopt(self, lease: Lease | None) -> None:
        """Remember the VTEP MACs `lease` publishes, so our devices are (re)created with them."""
        if lease is None:
            return
        for f in self.families:
            mac = normalize_mac(f.family.backend_data(lease).get("VtepMAC"))
            if mac:
                self.macs[f.device] = mac

    def device_mtu(self, version: int) -> int:
        return (self.options.mtu or self.ext.mtu) - ENCAP_OVERHEAD[version]  # outer IP header differs

    def mtu(self) -> int:
        return min(self.device_mtu(f.family.version) for f in self.families)

    def links(self) -> tuple[VxlanLink, ...]:
        o = self.options
        return tuple(
            VxlanLink(f.device, o.vni, str(f.local), self.ext.name, o.port, o.gbp, o.learning,
                      self.device_mtu(f.family.version), self.macs.get(f.device), o.disable_tx_checksum)
            for f in self.families
        )

    def lease_attrs(self, devices: Mapping[str, ObservedLink]) -> LeaseAttrs:
        data: dict[int, str] = {
            f.family.version: backend_json({"VNI": self.options.vni, "VtepMAC": devices[f.device].mac})
            for f in self.families
        }
        return replace(self.publics, backend_type="vxlan", backend_data=data.get(4), backend_v6_data=data.get(6))

    def published_by_us(self, lease: Lease, devices: Mapping[str, ObservedLink]) -> bool:
        """Whether `lease` carries one of our devices' VTEP MACs: proof it is ours when our address changed.

        A device keeps its random MAC across restarts (and a recreated one gets it back), so no
        other node can publish it.
        """
        ours = {d.mac for d in devices.values() if d.mac}
        return lease.backend_type == "vxlan" and any(
            normalize_mac(data.get("VtepMAC")) in ours for data in (lease.backend, lease.backend_v6))

    def device_problems(self, spec: VxlanLink, link: ObservedLink, own: Lease) -> tuple[list[str], str]:  # type: ignore[override]
        wrong = []
        vni, port = link.data.get("IFLA_VXLAN_ID"), link.data.get("IFLA_VXLAN_PORT")
        if link.kind != "vxlan":
            wrong.append(f"is a {link.kind or 'plain'} device, not vxlan")
        if vni is not None and vni != spec.vni:
            wrong.append(f"VNI {vni}, expected {spec.vni}")
        want_port = spec.port or DEFAULT_PORT
        if port is not None and port != want_port:
            wrong.append(f"UDP port {port}, expected {want_port}")
        published = normalize_mac(family_of(spec.family).backend_data(own).get("VtepMAC"))
        if published and link.mac != published:
            wrong.append(f"MAC {link.mac} but our lease publishes VtepMAC {published} (peers send to the wrong MAC)")
        return wrong, f"VNI {spec.vni}, port {want_port}, MTU {spec.mtu}, MAC {link.mac}"

    def _direct(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return self.options.direct_routing and self.ext.reaches_directly(ip)

    def base_state(self, own: Lease) -> DesiredState:
        """Devices, our addresses, blackhole routes: everything but peers."""
        addresses = frozenset(Address(f.device, f"{mine.network_address}/{mine.max_prefixlen}") for f in self.families
                              if (mine := f.family.subnet(own)) is not None)
        return DesiredState(
            links=self.links(),
            addresses=addresses,
            routes=own_routes(own, self.config, self.blackhole),
            owned_networks=tuple(str(f.fam.network) for f in self.families),
        )

    def plan_peer(self, peer: Lease) -> PeerPlan:
        """Entries for one peer lease, and why parts of it were skipped."""
        entries = PeerPlan.unskipped()
        if peer.backend_type != "vxlan":
            entries.skip(f"backend type {peer.backend_type or 'none'!r} is not vxlan", "backend-type")
            return entries
        for f in self.families:
            skipped = self._plan_peer(f, peer, entries)
            if skipped:
                entries.skip(*skipped)
        return entries

    def _plan_peer(self, f: _Family, peer: Lease, out: PeerPlan) -> tuple[str, str] | None:
        """Add one family's entries for a peer; return why (and the kind of why) it was skipped, or None."""
        fam = f.family
        subnet, public = fam.subnet(peer), fam.public(peer)
        if subnet is None:
            return None  # a single-stack peer in a dual-stack cluster: nothing for this family
        if not f.fam.contains(subnet):
            return f"subnet {subnet} is outside the network {f.fam.network}", "outside-network"
        if public is None:
            return f"no {fam} public address", "no-public-address"
        if public == f.public:
            return f"it has our own public address {public} (a stale lease of this node?)", "own-address"
        metric = fam.route_metric
        if self._direct(public):
            out.routes.append(Route(str(subnet), gateway=str(public), dev=self.ext.name, metric=metric))
            return None
        mac = normalize_mac(fam.backend_data(peer).get("VtepMAC"))
        if mac is None:
            return f"its BackendData has no valid {fam} VtepMAC", "backend-data"
        if not is_unicast(mac):
            return (f"its {fam} VtepMAC {mac} is not a unicast MAC (multicast, broadcast or all-zero): no FDB "
                    "entry can point at it", "backend-data")
        gateway = str(subnet.network_address)
        out.neighs.append(Neigh(f.device, gateway, mac))
        out.fdbs.append(Fdb(f.device, mac, str(public)))
        out.routes.append(Route(str(subnet), gateway=gateway, dev=f.device, onlink=True, metric=metric))
        return None


def _describe(data: Mapping[str, Any]) -> str:
    mac = normalize_mac(data.get("VtepMAC"))
    return mac or ""


VXLAN = register(BackendType(
    "vxlan", VxlanOptions.parse,
    lambda config, ext, options, settings: VxlanBackend(config, ext, options, settings.blackhole_route),
    _describe, "VtepMAC",
))
