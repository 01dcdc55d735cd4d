"""Device kinds: how the reconciler creates, adopts and recreates each kind of device, one place per kind.

A backend describes the devices it wants as data (a :class:`~flanneld.plan.state.LinkSpec` of some
kind); the reconciler looks the kind up here. A backend without devices (host-gw, alloc) simply
has no links. A new kind (e.g. WireGuard, with its own peer table) adds one handler here and the
kernel calls it needs; the daemon does not change. A kind with a peer table of its own (WireGuard)
reads and writes it too, so the reconciler diffs it like the neighbour and FDB tables. WireGuard's
handler lives in :mod:`flanneld.dataplane.wireguard.devices`, loaded when a WireGuard device is first asked for.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Protocol

from flanneld.dataplane.netlink import Kernel, KernelError, WriteFailure
from flanneld.plan.state import ObservedLink, VxlanLink, WgPeer

log = logging.getLogger(__name__)


def random_mac() -> str:
    """A random locally administered unicast MAC."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return bytes(raw).hex(":")


class DeviceKind(Protocol):
    kind: str

    def incompatible(self, link: ObservedLink, spec: Any, underlay_index: int) -> str:
        """Why an existing device cannot serve as `spec` ('' if it can): it is then recreated."""

    def create(self, kernel: Kernel, spec: Any, underlay_index: int, replaced: ObservedLink | None) -> ObservedLink:
        """Make the device (`replaced`: the incompatible one just deleted, whose identity may be kept)."""

    def settle(self, kernel: Kernel, spec: Any, link: ObservedLink) -> None:
        """Kind-specific settings after creation or adoption (MTU and up are handled for every kind)."""

    def read_peers(self, kernel: Kernel, spec: Any) -> set[WgPeer]:
        """The device's own peer table (empty for kinds without one)."""

    def write_peers(self, kernel: Kernel, spec: Any, put: Sequence[WgPeer], delete: Sequence[WgPeer]
                    ) -> list[WriteFailure]:
        """Add or update `put`, remove `delete`, one peer at a time (never replacing the table)."""


class NoPeerTable:
    """Kinds whose peers live in the neighbour, FDB and route tables."""

    def read_peers(self, kernel: Kernel, spec: Any) -> set[WgPeer]:
        return set()

    def write_peers(self, kernel: Kernel, spec: Any, put: Sequence[WgPeer], delete: Sequence[WgPeer]
                    ) -> list[WriteFailure]:
        return []


class VxlanDevices(NoPeerTable):
    kind = "vxlan"

    def incompatible(self, link: ObservedLink, spec: VxlanLink, underlay_index: int) -> str:
        """As upstream judges it."""
        if link.kind != "vxlan" or not link.data:
            return f"it is a {link.kind or 'plain'} device, not vxlan"
        d = link.data
        vni, underlay, local, port = (d.get("IFLA_VXLAN_ID"), d.get("IFLA_VXLAN_LINK"),
                                      d.get("IFLA_VXLAN_LOCAL") or d.get("IFLA_VXLAN_LOCAL6"),
                                      d.get("IFLA_VXLAN_PORT"))
        gbp, learning = "IFLA_VXLAN_GBP" in d, bool(d.get("IFLA_VXLAN_LEARNING"))
        if vni != spec.vni:
            return f"its VNI is {vni}, want {spec.vni}"
        if underlay and underlay != underlay_index:
            return f"it runs over interface index {underlay}, want {spec.underlay} ({underlay_index})"
        if local and local != spec.local:
            return f"its local address is {local}, want {spec.local}"
        if port and port != (spec.port or 8472):
            return f"its port is {port}, want {spec.port or 8472}"
        if gbp != spec.gbp or learning != spec.learning:
            return f"GBP/learning are {gbp}/{learning}, want {spec.gbp}/{spec.learning}"
        return ""

    def create(self, kernel: Kernel, spec: VxlanLink, underlay_index: int, replaced: ObservedLink | None
               ) -> ObservedLink:
        # the MAC peers know (from our lease), else the replaced device's: peers' FDB entries stay valid
        mac = spec.mac or (replaced.mac if replaced else None) or random_mac()
        link = kernel.create_vxlan(spec, underlay_index, mac)
        log.info("created VXLAN device %s: VNI %d, local %s via %s, MAC %s, MTU %d", spec.name, spec.vni,
                 spec.local, spec.underlay, link.mac, spec.mtu)
        return link

    def settle(self, kernel: Kernel, spec: VxlanLink, link: ObservedLink) -> None:
        """Tx checksum offload as Backend.DisableTxChecksumOffloading says, both ways: an option set
        back to false turns it on again (the kernel's default for a VXLAN device)."""
        wanted = not spec.disable_tx_checksum
        if kernel.tx_checksum(spec.name) != wanted:
            kernel.set_tx_checksum(spec.name, wanted)
            log.info("turned %s tx checksum offload on %s", "on" if wanted else "off", spec.name)


KINDS: dict[str, DeviceKind] = {"vxlan": VxlanDevices()}


def handler(kind: str) -> DeviceKind:
    found = KINDS.get(kind)
    if found is None and kind == "wireguard":
        # loaded on first use: a node without WireGuard loads none of its code (its UAPI and
        # generic netlink codecs, key handling: ~10 ms of every start)
        from flanneld.dataplane.wireguard.devices import WireguardDevices

        found = KINDS[kind] = WireguardDevices()
    if found is None:
        raise KernelError(f"no handler for device kind {kind!r}")
    return found
