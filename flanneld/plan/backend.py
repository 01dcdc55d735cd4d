"""What every backend provides, the registry the daemon, doctor and flannelctl find backends in,
and the external-interface facts backends plan with.

A backend is a small plug-in: a module that registers its ``Backend.Type`` name, an options
parser and a constructor (upstream's ``backend.Register("vxlan", New)``). Whatever a backend
publishes in its lease (``BackendData``/``BackendV6Data``), reads back from a previous lease at
restart, and the devices it wants are its own business: the daemon only holds a :class:`Backend`.
"""

from __future__ import annotations

import importlib
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from flanneld.model.config import BackendConfig, ConfigError, NetworkConfig
from flanneld.model.lease import Lease, LeaseAttrs
from flanneld.plan.state import DesiredState, Fdb, LinkSpec, Neigh, ObservedLink, Route, WgPeer, sorted_cidrs


@dataclass(frozen=True)
class External:
    """The interface flannel runs over (``--iface`` & co.) and the addresses it publishes."""

    name: str
    index: int
    mtu: int
    ip4: ipaddress.IPv4Address | None = None  # address on the interface (VTEP source)
    public_ip: ipaddress.IPv4Address | None = None  # published to peers (--public-ip, else ip4)
    ip6: ipaddress.IPv6Address | None = None
    public_ipv6: ipaddress.IPv6Address | None = None
    onlink: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(default=())  # directly reachable

    def reaches_directly(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether `ip` is on one of our L2 segments (no router between us)."""
        return any(ip.version == n.version and ip in n for n in self.onlink)

    def segments(self, version: int) -> str:
        """Our directly reachable networks of one family, for messages."""
        return ", ".join(str(n) for n in self.onlink if n.version == version) or "none"


@dataclass(frozen=True)
class NodeSettings:
    """Daemon flags some backends plan with."""

    blackhole_route: bool = False
    wireguard_provider: str = "auto"  # --wireguard-provider: kernel, userspace (wireguard-go) or auto
    create_identity: bool = True  # may a backend create node-local identity (a key file)? Not in doctor


@dataclass(frozen=True)
class Plan:
    desired: DesiredState
    skipped: tuple[tuple[str, str], ...] = ()  # (lease key, why) for peers we cannot program


_NONE: list[str] = []
_NO_ENTRIES: list[Any] = []

# why a peer is not (fully) programmed, as a metric label
SKIP_KINDS = ("backend-type", "outside-network", "no-public-address", "own-address", "backend-data",
              "not-on-segment", "overlap")


@dataclass(slots=True)
class PeerPlan:
    """One peer's entries (cached by the daemon until the peer's lease changes, so kept small)."""

    neighs: list[Neigh] = field(default_factory=list)
    fdbs: list[Fdb] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    wg_peers: list[WgPeer] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    skipped_kinds: list[str] = field(default_factory=list)  # one of SKIP_KINDS per reason, for /metrics
    backend_type: str = ""  # the peer lease's BackendType (set by the daemon, for /metrics)

    @classmethod
    def unskipped(cls) -> PeerPlan:
        """A plan for one peer, to fill: every fully programmed peer shares the same empty skip lists
        (thousands of peers), and skip() copies on write."""
        return cls(skipped=_NONE, skipped_kinds=_NONE)

    def compact(self) -> PeerPlan:
        """This plan, its empty entry lists made one shared empty list: a plan is kept unchanged
        for as long as its lease stands (nothing appends to a kept plan), and an empty list per
        table per peer cost 72 bytes each (0.4 MB of a vxlan node's RSS at 5000 peers)."""
        for name in ("neighs", "fdbs", "routes", "wg_peers"):
            if not getattr(self, name):
                setattr(self, name, _NO_ENTRIES)
        return self

    def held_back(self, reason: str, kind: str) -> PeerPlan:
        """This plan with nothing to program: its skip reasons and `reason`."""
        out = PeerPlan(skipped=self.skipped, skipped_kinds=self.skipped_kinds, backend_type=self.backend_type)
        out.skip(reason, kind)
        return out

    def skip(self, reason: str, kind: str) -> None:
        self.skipped = [*self.skipped, reason]
        self.skipped_kinds = [*self.skipped_kinds, kind]


def merge(base: DesiredState, peers: Iterable[PeerPlan]) -> DesiredState:
    """The base state plus every peer's entries."""
    neighs, fdbs, routes, wg = set(base.neighs), set(base.fdbs), set(base.routes), set(base.wg_peers)
    for pp in peers:
        neighs.update(pp.neighs)
        fdbs.update(pp.fdbs)
        routes.update(pp.routes)
        wg.update(pp.wg_peers)
    return DesiredState(base.links, base.addresses, frozenset(neighs), frozenset(fdbs), frozenset(routes),
                        base.owned_networks, frozenset(one_per_key(wg)))


def one_per_key(peers: Iterable[WgPeer]) -> list[WgPeer]:
    """WireGuard knows one peer per public key: leases sharing a key (an upstream node that moved
    to a new subnet leaves its old lease until it expires) become one peer with every subnet, and
    the same endpoint whatever order they came in (otherwise each full reconcile would flap)."""
    by_key: dict[tuple[str, str], list[WgPeer]] = {}
    for p in peers:
        by_key.setdefault(p.key, []).append(p)
    out = []
    for same in by_key.values():
        if len(same) == 1:
            out.append(same[0])
            continue
        first = min(same, key=lambda p: (p.endpoint, p.allowed_ips))
        out.append(replace(first, allowed_ips=sorted_cidrs({ip for p in same for ip in p.allowed_ips})))
    return out


BLACKHOLE_METRIC = 4000  # low priority: never shadows the pod bridge's connected route (see docs/compatibility.md)


def int_option(backend: BackendConfig, name: str, default: int, low: int, high: int) -> int:
    """An integer option of a ``Backend`` object; ConfigError naming it and the range otherwise."""
    value = backend.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"Backend.{name} must be an integer in {low}..{high}, got {value!r}")
    return value


def own_routes(own: Lease, config: NetworkConfig, blackhole: bool) -> frozenset[Route]:
    """Routes for our own subnets: the optional blackhole (--ip-blackhole-route)."""
    if not blackhole:
        return frozenset()
    return frozenset(Route(str(mine), blackhole=True, metric=BLACKHOLE_METRIC)
                     for fc in config.families() if (mine := fc.family.subnet(own)) is not None)


def published_addresses(config: NetworkConfig, ext: External) -> LeaseAttrs:
    """The public addresses this node publishes, per enabled family (upstream: 0.0.0.0 without IPv4)."""
    if config.ipv4 is not None and ext.public_ip is None:
        raise ConfigError(f"interface {ext.name} has no IPv4 address, but the network config enables IPv4")
    if config.ipv6 is not None and ext.public_ipv6 is None:
        raise ConfigError(f"interface {ext.name} has no global IPv6 address, but the network config enables IPv6")
    return LeaseAttrs(
        public_ip=ext.public_ip if config.ipv4 is not None and ext.public_ip else ipaddress.IPv4Address(0),
        public_ipv6=ext.public_ipv6 if config.ipv6 is not None else None,
    )


class Backend(Protocol):
    """A planner plus the devices it needs; pure apart from randomness for new device identities."""

    type: str

    def adopt(self, lease: Lease | None) -> None:
        """Our lease (previous at start, current later): identities to keep when (re)creating devices."""

    def links(self) -> tuple[LinkSpec, ...]:
        """Devices to create or adopt (none for backends without a device)."""

    def mtu(self) -> int:
        """FLANNEL_MTU for pods."""

    def lease_attrs(self, devices: Mapping[str, ObservedLink]) -> LeaseAttrs:
        """What we publish in our lease, given our devices as they exist."""

    def published_by_us(self, lease: Lease, devices: Mapping[str, ObservedLink]) -> bool:
        """Whether a lease with another public IP was written by this node (its address changed)."""

    def base_state(self, own: Lease) -> DesiredState:
        """Everything but peers: devices, our addresses, our own routes."""

    def plan_peer(self, peer: Lease) -> PeerPlan:
        """One peer's entries."""

    def plan(self, own: Lease, peers: Iterable[Lease]) -> Plan:
        """Desired kernel state for our lease and every peer lease."""

    def device_problems(self, spec: LinkSpec, link: ObservedLink, own: Lease) -> tuple[list[str], str]:
        """For flannelctl doctor: what is wrong with one of our devices beyond MTU, state and
        addresses (which are checked for every kind), and a one-line summary when nothing is."""

    def prepare(self) -> None:
        """Once at start-up, before our lease is acquired (extension's PreStartupCommand)."""

    def start(self, own: Lease) -> None:
        """Once our lease is known and before peers are programmed (hooks, e.g. extension's)."""

    def peer_changed(self, kind: str, peer: Lease) -> None:
        """A peer lease was added, changed or removed (hooks; the data plane comes from plan_peer)."""

    def underlay_changed(self, onlink: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
        """The external interface reaches `onlink` directly now (renumbered, an on-link route
        added or gone). True when peer plans depend on it and must be made again."""

    def underlay_mtu_changed(self, mtu: int) -> bool:
        """The external interface's MTU is `mtu` now; True when it changed (devices and mtu()
        follow it unless the backend's MTU option fixes them)."""


class BackendBase:
    """What most backends do not need, done once: no device identity, no devices, no hooks, and
    the whole plan as the base state plus every peer's entries."""

    ext: External
    uses_onlink = False  # whether plan_peer asks ext.reaches_directly (host-gw, DirectRouting)

    def adopt(self, lease: Lease | None) -> None:
        pass

    def links(self) -> tuple[LinkSpec, ...]:
        return ()

    def published_by_us(self, lease: Lease, devices: Mapping[str, ObservedLink]) -> bool:
        return False  # nothing but the public address identifies a node

    def device_problems(self, spec: LinkSpec, link: ObservedLink, own: Lease) -> tuple[list[str], str]:
        return [], ""

    def prepare(self) -> None:
        pass

    def start(self, own: Lease) -> None:
        pass

    def peer_changed(self, kind: str, peer: Lease) -> None:
        pass

    def underlay_mtu_changed(self, mtu: int) -> bool:
        if mtu == self.ext.mtu:
            return False
        self.ext = replace(self.ext, mtu=mtu)
        return True

    def underlay_changed(self, onlink: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
        changed = onlink != self.ext.onlink
        self.ext = replace(self.ext, onlink=onlink)
        return changed and self.uses_onlink

    def base_state(self, own: Lease) -> DesiredState:
        raise NotImplementedError

    def plan_peer(self, peer: Lease) -> PeerPlan:
        raise NotImplementedError

    def plan(self, own: Lease, peers: Iterable[Lease]) -> Plan:
        plans = {p.key: self.plan_peer(p) for p in peers if p.key != own.key}
        return Plan(merge(self.base_state(own), plans.values()),
                    tuple((key, why) for key, pp in plans.items() for why in pp.skipped))


@dataclass(frozen=True)
class BackendType:
    """A registered backend: its ``Backend.Type``, options parser and constructor."""

    name: str
    parse: Callable[[BackendConfig], Any]  # raises ConfigError naming the option
    build: Callable[[NetworkConfig, External, Any, NodeSettings], Backend]
    # the identity a lease publishes in its BackendData (VTEP MAC, public key ...), for flannelctl
    describe_data: Callable[[Mapping[str, Any]], str] = lambda _data: ""
    identity_label: str = ""  # what describe_data shows, by its BackendData name ("VtepMAC", "PublicKey")


_REGISTRY: dict[str, BackendType] = {}
# The backends of this build, by ``Backend.Type``, and the module that registers each when first
# looked up: a node loads only the backend it runs (WireGuard's and the extension's code is
# ~10 ms of every start a vxlan node would otherwise pay).
_MODULES = {"alloc": "alloc", "extension": "extension", "host-gw": "host_gw", "vxlan": "vxlan",
            "wireguard": "wireguard"}
_REFUSED = {
    "udp": "upstream deprecated the udp backend (a userspace data path); use vxlan",
    "ipip": "not implemented by this build; use vxlan, or host-gw on one L2 segment",
    "ipsec": "not implemented by this build; use vxlan",
}


def register(backend_type: BackendType) -> BackendType:
    _REGISTRY[backend_type.name] = backend_type
    return backend_type


def lookup(name: str) -> BackendType:
    """The registered backend for a ``Backend.Type``; ConfigError saying what this build supports."""
    found = _REGISTRY.get(name)
    if found is None and name in _MODULES:
        importlib.import_module(f"flanneld.backends.{_MODULES[name]}")
        found = _REGISTRY[name]
    if found is not None:
        return found
    why = _REFUSED.get(name, "unknown backend type")
    raise ConfigError(f"backend type {name!r} is not supported: {why} (this build supports: "
                      f"{', '.join(supported())})")


def validate_backend(backend: BackendConfig) -> None:
    """Check the Backend object of a network config; ConfigError with the reason if unusable."""
    lookup(backend.type).parse(backend)


def create_backend(config: NetworkConfig, ext: External, settings: NodeSettings) -> Backend:
    kind = lookup(config.backend.type)
    return kind.build(config, ext, kind.parse(config.backend), settings)


def supported() -> list[str]:
    return sorted(_MODULES)
