"""Device kinds: how the reconciler creates, adopts and recreates each kind of device, one place per kind.

A backend describes the devices it wants as data (a :class:`~flanneld.netstate.LinkSpec` of some
kind); the reconciler looks the kind up here. A backend without devices (host-gw, alloc) simply
has no links. A new kind (e.g. WireGuard, with its own peer table) adds one handler here and the
kernel calls it needs; the daemon does not change. A kind with a peer table of its own (WireGuard)
reads and writes it here too, so the reconciler diffs it like the neighbour and FDB tables.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any, Protocol

from .kernel import Kernel, KernelError, LinkInfo, WriteFailure
from .netstate import VxlanLink, WgPeer, WireguardLink
from .wggenl import GenlClient
from .wgkeys import Key
from .wguapi import DeviceState, PeerChange, UapiClient, UapiError

log = logging.getLogger(__name__)


def random_mac() -> str:
    """A random locally administered unicast MAC."""
    raw = bytearray(secrets.token_bytes(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return bytes(raw).hex(":")


class DeviceKind(Protocol):
    kind: str

    def incompatible(self, link: LinkInfo, spec: Any, underlay_index: int) -> str:
        """Why an existing device cannot serve as `spec` ('' if it can): it is then recreated."""

    def create(self, kernel: Kernel, spec: Any, underlay_index: int, replaced: LinkInfo | None) -> LinkInfo:
        """Make the device (`replaced`: the incompatible one just deleted, whose identity may be kept)."""

    def settle(self, kernel: Kernel, spec: Any, link: LinkInfo) -> None:
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

    def incompatible(self, link: LinkInfo, spec: VxlanLink, underlay_index: int) -> str:
        """As upstream judges it."""
        if link.kind != "vxlan" or link.vxlan is None:
            return f"it is a {link.kind or 'plain'} device, not vxlan"
        v = link.vxlan
        if v.vni != spec.vni:
            return f"its VNI is {v.vni}, want {spec.vni}"
        if v.underlay and v.underlay != underlay_index:
            return f"it runs over interface index {v.underlay}, want {spec.underlay} ({underlay_index})"
        if link.vxlan_local and link.vxlan_local != spec.local:
            return f"its local address is {link.vxlan_local}, want {spec.local}"
        if v.port and v.port != (spec.port or 8472):
            return f"its port is {v.port}, want {spec.port or 8472}"
        if v.gbp != spec.gbp or v.learning != spec.learning:
            return f"GBP/learning are {v.gbp}/{v.learning}, want {spec.gbp}/{spec.learning}"
        return ""

    def create(self, kernel: Kernel, spec: VxlanLink, underlay_index: int, replaced: LinkInfo | None) -> LinkInfo:
        # the MAC peers know (from our lease), else the replaced device's: peers' FDB entries stay valid
        mac = spec.mac or (replaced.mac if replaced else None) or random_mac()
        link = kernel.create_vxlan(spec, underlay_index, mac)
        log.info("created VXLAN device %s: VNI %d, local %s via %s, MAC %s, MTU %d", spec.name, spec.vni,
                 spec.local, spec.underlay, link.mac, spec.mtu)
        return link

    def settle(self, kernel: Kernel, spec: VxlanLink, link: LinkInfo) -> None:
        if spec.disable_tx_checksum and kernel.tx_checksum(spec.name):
            kernel.set_tx_checksum(spec.name, False)
            log.info("turned off tx checksum offload on %s", spec.name)


class _Control(Protocol):
    def get(self) -> DeviceState: ...

    def set(self, private_key: Key | None = None, listen_port: int | None = None,
            changes: Sequence[PeerChange] = ()) -> None: ...


class _Kernel:
    """A kernel WireGuard device, through generic netlink (one short-lived socket per call)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def get(self) -> DeviceState:
        client = GenlClient()
        try:
            return client.get(self.name)
        finally:
            client.close()

    def set(self, private_key: Key | None = None, listen_port: int | None = None,
            changes: Sequence[PeerChange] = ()) -> None:
        client = GenlClient()
        try:
            client.set(self.name, private_key, listen_port, list(changes))
        finally:
            client.close()


class _Userspace:
    """A wireguard-go device, through its UAPI socket; errors as KernelError like the kernel's."""

    def __init__(self, name: str) -> None:
        self.client = UapiClient(name)

    def get(self) -> DeviceState:
        try:
            return self.client.get()
        except UapiError as exc:
            raise KernelError(str(exc), exc.errno) from None

    def set(self, private_key: Key | None = None, listen_port: int | None = None,
            changes: Sequence[PeerChange] = ()) -> None:
        try:
            self.client.set(private_key, listen_port, changes)
        except UapiError as exc:
            raise KernelError(str(exc), exc.errno) from None


def wireguard_go() -> str | None:
    """The wireguard-go binary ($WG_GO_BINARY, else on PATH, else Debian's)."""
    found = os.environ.get("WG_GO_BINARY") or shutil.which("wireguard-go")
    if found is None and os.access("/usr/bin/wireguard-go", os.X_OK):
        found = "/usr/bin/wireguard-go"
    return found


class WireguardDevices:
    """WireGuard devices from the kernel module where there is one, else from wireguard-go.

    A wireguard-go process is started detached (its own session, reparented to init once it has
    daemonised), so it outlives a daemon restart: the device, its peers and its traffic stay
    while flanneld is down. A device whose process died is gone from the kernel with it, which
    the netlink monitor reports as drift: it is recreated with the same key and the peers replayed.
    """

    kind = "wireguard"

    @staticmethod
    def control(link: LinkInfo | None, name: str) -> _Control:
        return _Kernel(name) if link is not None and link.kind == "wireguard" else _Userspace(name)

    def incompatible(self, link: LinkInfo, spec: WireguardLink, underlay_index: int) -> str:
        if link.kind == "wireguard":
            return "it is a kernel WireGuard device, but --wireguard-provider=userspace" \
                if spec.provider == "userspace" else ""
        if link.kind == "tun":
            if spec.provider == "kernel":
                return "it is a wireguard-go device, but --wireguard-provider=kernel"
            return "" if UapiClient(spec.name).alive() else "it is a tun device no wireguard-go process serves"
        return f"it is a {link.kind or 'plain'} device, not WireGuard"

    def create(self, kernel: Kernel, spec: WireguardLink, underlay_index: int, replaced: LinkInfo | None
               ) -> LinkInfo:
        if spec.provider != "userspace":
            try:
                link = kernel.create_plain_link(spec.name, spec.mtu, "wireguard")
            except KernelError as exc:
                if spec.provider == "kernel" or exc.errno != errno.EOPNOTSUPP:
                    raise
                log.info("the kernel has no WireGuard module; using wireguard-go for %s", spec.name)
            else:
                log.info("created kernel WireGuard device %s (MTU %d)", spec.name, spec.mtu)
                return link
        return self._start_userspace(kernel, spec)

    def _start_userspace(self, kernel: Kernel, spec: WireguardLink) -> LinkInfo:
        binary = wireguard_go()
        if binary is None:
            raise KernelError(f"cannot create WireGuard device {spec.name}: the kernel has no WireGuard module "
                              "and wireguard-go is not installed (Debian package wireguard-go)")
        env = {k: v for k, v in os.environ.items() if k not in ("WG_PROCESS_FOREGROUND", "WG_TUN_FD", "WG_UAPI_FD")}
        try:
            # without -f it creates the device and socket, then re-executes itself in the background
            # and exits: once run() returns the device exists, and the process is no child of ours
            done = subprocess.run([binary, spec.name], env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KernelError(f"starting wireguard-go for {spec.name}: {exc}") from None
        if done.returncode != 0:
            why = [line for line in done.stderr.decode(errors="replace").splitlines() if line.strip("│┌┐└┘─ ")]
            raise KernelError(f"wireguard-go for {spec.name} exited with {done.returncode}: "
                              f"{'; '.join(why[-3:]) or 'no message'}")
        link = kernel.link(spec.name)
        if link is None:
            raise KernelError(f"wireguard-go reported success but there is no device {spec.name}")
        log.info("started wireguard-go for %s (MTU %d)", spec.name, spec.mtu)
        return link

    def settle(self, kernel: Kernel, spec: WireguardLink, link: LinkInfo) -> None:
        control = self.control(link, spec.name)
        state = control.get()
        if state.private_key != spec.private_key or state.listen_port != spec.listen_port:
            control.set(private_key=spec.private_key, listen_port=spec.listen_port)
            log.info("configured WireGuard device %s: listen port %d, our public key %s", spec.name,
                     spec.listen_port, spec.public_key)

    def read_peers(self, kernel: Kernel, spec: WireguardLink) -> set[WgPeer]:
        state = self.control(kernel.link(spec.name), spec.name).get()
        return {WgPeer(spec.name, p.public_key, p.endpoint, p.allowed_ips, p.keepalive, p.psk)
                for p in state.peers.values()}

    def write_peers(self, kernel: Kernel, spec: WireguardLink, put: Sequence[WgPeer], delete: Sequence[WgPeer]
                    ) -> list[WriteFailure]:
        changes = [PeerChange(p.public_key, remove=True) for p in delete]
        changes += [PeerChange(p.public_key, False, p.endpoint, p.allowed_ips, p.keepalive, p.psk) for p in put]
        if not changes:
            return []
        try:
            self.control(kernel.link(spec.name), spec.name).set(changes=changes)
        except KernelError as exc:
            return [WriteFailure(p, exc.errno, str(exc)) for p in (*delete, *put)]
        return []


KINDS: dict[str, DeviceKind] = {k.kind: k for k in (VxlanDevices(), WireguardDevices())}


def handler(kind: str) -> DeviceKind:
    try:
        return KINDS[kind]
    except KeyError:
        raise KernelError(f"no handler for device kind {kind!r}") from None
