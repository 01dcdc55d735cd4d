"""The alloc backend: a subnet lease and subnet.env, no data path (the operator programs their own).

As upstream: the lease has no BackendType and no BackendData; MTU is the interface's. We own
nothing in the kernel, so nothing in the overlay networks is ever deleted on this node.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flanneld.model.config import BackendConfig, NetworkConfig
from flanneld.model.lease import Lease, LeaseAttrs
from flanneld.plan.backend import BackendBase, BackendType, External, PeerPlan, published_addresses, register
from flanneld.plan.state import DesiredState, ObservedLink


@dataclass(frozen=True)
class AllocOptions:
    @classmethod
    def parse(cls, backend: BackendConfig) -> AllocOptions:
        return cls()


class AllocBackend(BackendBase):
    type = "alloc"

    def __init__(self, config: NetworkConfig, ext: External) -> None:
        self.ext = ext
        self.publics = published_addresses(config, ext)

    def mtu(self) -> int:
        return self.ext.mtu

    def lease_attrs(self, devices: Mapping[str, ObservedLink]) -> LeaseAttrs:
        return self.publics

    def base_state(self, own: Lease) -> DesiredState:
        return DesiredState()

    def plan_peer(self, peer: Lease) -> PeerPlan:
        return PeerPlan()


ALLOC = register(BackendType("alloc", AllocOptions.parse,
                             lambda config, ext, _options, _settings: AllocBackend(config, ext)))
