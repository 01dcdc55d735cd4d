"""WireGuard devices: made by the kernel module or a detached wireguard-go, configured and their
peer tables read and written through generic netlink or wireguard-go's UAPI socket.

The :data:`flanneld.dataplane.devices.KINDS` handler for the ``wireguard`` kind, in a module of its own so
that a node running another backend never loads it (see :func:`flanneld.dataplane.devices.handler`).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from typing import Protocol

from flanneld.dataplane.netlink import Kernel, KernelError, WriteFailure
from flanneld.dataplane.wireguard.genl import GenlClient
from flanneld.dataplane.wireguard.uapi import DeviceState, PeerChange, UapiClient, UapiError
from flanneld.model.wgkeys import Key
from flanneld.plan.state import ObservedLink, WgPeer, WireguardLink

log = logging.getLogger("flanneld.dataplane.devices")  # one logger for every device kind's handler


class _Control(Protocol):
    def get(self) -> DeviceState: ...

    def set(self, private_key: Key | None = None, listen_port: int | None = None,
            changes: Sequence[PeerChange] = ()) -> None: ...


class _GenlControl:
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


class _UapiControl:
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
    def control(link: ObservedLink | None, name: str) -> _Control:
        return _GenlControl(name) if link is not None and link.kind == "wireguard" else _UapiControl(name)

    def incompatible(self, link: ObservedLink, spec: WireguardLink, underlay_index: int) -> str:
        if link.kind == "wireguard":
            return "it is a kernel WireGuard device, but --wireguard-provider=userspace" \
                if spec.provider == "userspace" else ""
        if link.kind == "tun":
            if spec.provider == "kernel":
                return "it is a wireguard-go device, but --wireguard-provider=kernel"
            return "" if UapiClient(spec.name).alive() else "it is a tun device no wireguard-go process serves"
        return f"it is a {link.kind or 'plain'} device, not WireGuard"

    def create(self, kernel: Kernel, spec: WireguardLink, underlay_index: int, replaced: ObservedLink | None
               ) -> ObservedLink:
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

    def _start_userspace(self, kernel: Kernel, spec: WireguardLink) -> ObservedLink:
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

    def settle(self, kernel: Kernel, spec: WireguardLink, link: ObservedLink) -> None:
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
