"""The host-gw backend, pure: per peer a route ``<peer subnet> via <peer PublicIP> dev <external iface>``.

No device and no encapsulation: the external interface carries pod traffic as plain IP, so every
peer must be on our L2 segment (directly reachable). A peer that is not is skipped with one
warning naming it, while every other peer works (upstream's route network fails the route add
and retries forever). IPv4 and IPv6 are the same code (IPv6 via the peer's PublicIPv6). MTU is the
interface's. The lease is upstream's: ``BackendType:"host-gw"`` and no BackendData.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from flanneld.model.config import BackendConfig, ConfigError, NetworkConfig
from flanneld.model.lease import Lease, LeaseAttrs
from flanneld.plan.backend import (
    BackendBase,
    BackendType,
    External,
    PeerPlan,
    own_routes,
    published_addresses,
    register,
)
from flanneld.plan.state import DesiredState, ObservedLink, Route


@dataclass(frozen=True)
class HostGwOptions:
    """host-gw has no options of its own."""

    @classmethod
    def parse(cls, backend: BackendConfig) -> HostGwOptions:
        return cls()


class HostGwBackend(BackendBase):
    type = "host-gw"
    uses_onlink = True

    def __init__(self, config: NetworkConfig, ext: External, blackhole: bool = False) -> None:
        self.config = config
        self.ext = ext
        self.blackhole = blackhole
        self.publics = published_addresses(config, ext)
        local = {str(a) for a in (ext.ip4, ext.ip6) if a is not None}
        for public in (self.publics.public_ip if config.ipv4 else None, self.publics.public_ipv6):
            if public is not None and str(public) not in local:
                raise ConfigError(f"public address {public} is not an address of {ext.name}: host-gw cannot work "
                                  "behind NAT (peers route to the public address directly)")

    def mtu(self) -> int:
        return self.ext.mtu

    def lease_attrs(self, devices: Mapping[str, ObservedLink]) -> LeaseAttrs:
        return replace(self.publics, backend_type="host-gw")

    def base_state(self, own: Lease) -> DesiredState:
        return DesiredState(routes=own_routes(own, self.config, self.blackhole),
                            owned_networks=tuple(str(f.network) for f in self.config.families()))

    def plan_peer(self, peer: Lease) -> PeerPlan:
        out = PeerPlan.unskipped()
        if peer.backend_type != "host-gw":
            out.skip(f"backend type {peer.backend_type or 'none'!r} is not host-gw", "backend-type")
            return out
        for fc in self.config.families():
            fam = fc.family
            subnet, public, ours = fam.subnet(peer), fam.public(peer), fam.public(self.publics)
            if subnet is None:
                continue  # a single-stack peer in a dual-stack cluster: nothing for this family
            if not fc.contains(subnet):
                out.skip(f"subnet {subnet} is outside the network {fc.network}", "outside-network")
            elif public is None:
                out.skip(f"no {fam} public address", "no-public-address")
            elif public == ours:
                out.skip(f"it has our own public address {public} (a stale lease of this node?)", "own-address")
            elif not self.ext.reaches_directly(public):
                out.skip(f"its public address {public} is not on our L2 segment ({self.ext.segments(fam.version)}): "
                         "host-gw needs every node directly reachable; use vxlan across routers", "not-on-segment")
            else:
                out.routes.append(Route(str(subnet), gateway=str(public), dev=self.ext.name,
                                        metric=fam.route_metric))
        return out


HOST_GW = register(BackendType(
    "host-gw", HostGwOptions.parse,
    lambda config, ext, _options, settings: HostGwBackend(config, ext, settings.blackhole_route),
))
