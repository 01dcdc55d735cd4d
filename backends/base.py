"""What every backend provides, and the external-interface facts backends plan with."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from ..lease import Lease, LeaseAttrs
from ..netstate import DesiredState, Fdb, Neigh, Route, VxlanLink


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


@dataclass(frozen=True)
class Plan:
    desired: DesiredState
    skipped: tuple[tuple[str, str], ...] = ()  # (lease key, why) for peers we cannot program


@dataclass(slots=True)
class PeerPlan:
    """One peer's entries (cached by the daemon until the peer's lease changes, so kept small)."""

    neighs: list[Neigh] = field(default_factory=list)
    fdbs: list[Fdb] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped = [*self.skipped, reason]


def merge(base: DesiredState, peers: Iterable[PeerPlan]) -> DesiredState:
    """The base state plus every peer's entries."""
    neighs, fdbs, routes = set(base.neighs), set(base.fdbs), set(base.routes)
    for pp in peers:
        neighs.update(pp.neighs)
        fdbs.update(pp.fdbs)
        routes.update(pp.routes)
    return DesiredState(base.links, base.addresses, frozenset(neighs), frozenset(fdbs), frozenset(routes),
                        base.owned_networks)


class Backend(Protocol):
    """A planner plus the device parameters it needs; pure apart from randomness for new MACs."""

    type: str

    def links(self, macs: dict[str, str]) -> tuple[VxlanLink, ...]:
        """Devices to create, reusing `macs` (device name -> MAC) so peers' entries stay valid."""

    def mtu(self) -> int:
        """FLANNEL_MTU for pods."""

    def lease_attrs(self, macs: dict[str, str]) -> LeaseAttrs:
        """What we publish in our lease, given the devices' actual MACs."""

    def published_by_us(self, lease: Lease, macs: dict[str, str]) -> bool:
        """Whether a lease with another public IP was written by this node (its address changed)."""

    def base_state(self, own: Lease, macs: dict[str, str]) -> DesiredState:
        """Everything but peers: devices, our addresses, our own routes."""

    def plan_peer(self, peer: Lease) -> PeerPlan:
        """One peer's entries."""

    def plan(self, own: Lease, peers: Iterable[Lease], macs: dict[str, str]) -> Plan:
        """Desired kernel state for our lease and every peer lease."""
