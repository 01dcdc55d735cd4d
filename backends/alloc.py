"""The alloc backend: a subnet lease and subnet.env, no data path (the operator programs their own).

As upstream: the lease has no BackendType and no BackendData; MTU is the interface's. We own
nothing in the kernel, so nothing in the overlay networks is ever deleted on this node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..config import BackendConfig, NetworkConfig
from ..lease import Lease, LeaseAttrs
from ..netstate import DesiredState, Device, LinkSpec, ObservedLink
from .base import BackendType, External, PeerPlan, Plan, published_addresses, register


@dataclass(frozen=True)
class AllocOptions:
    @classmethod
    def parse(cls, backend: BackendConfig) -> AllocOptions:
        return cls()


class AllocBackend:
    type = "alloc"

    def __init__(self, config: NetworkConfig, ext: External) -> None:
        self.ext = ext
        self.publics = published_addresses(config, ext)

    def adopt(self, lease: Lease | None) -> None:
        pass

    def links(self) -> tuple[LinkSpec, ...]:
        return ()

    def mtu(self) -> int:
        return self.ext.mtu

    def lease_attrs(self, devices: Mapping[str, Device]) -> LeaseAttrs:
        return self.publics

    def published_by_us(self, lease: Lease, devices: Mapping[str, Device]) -> bool:
        return False

    def device_problems(self, spec: LinkSpec, link: ObservedLink, own: Lease) -> tuple[list[str], str]:
        return [], ""

    def prepare(self) -> None:
        pass

    def start(self, own: Lease) -> None:
        pass

    def peer_changed(self, kind: str, peer: Lease) -> None:
        pass

    def base_state(self, own: Lease) -> DesiredState:
        return DesiredState()

    def plan_peer(self, peer: Lease) -> PeerPlan:
        return PeerPlan()

    def plan(self, own: Lease, peers: Iterable[Lease]) -> Plan:
        return Plan(DesiredState())


def _describe(_data: Mapping[str, Any]) -> str:
    return ""


ALLOC = register(BackendType("alloc", AllocOptions.parse,
                             lambda config, ext, _options, _settings: AllocBackend(config, ext), _describe))
