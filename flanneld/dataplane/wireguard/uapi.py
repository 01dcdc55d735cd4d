"""wireguard-go's configuration protocol (the cross-platform UAPI), text codec and socket client.

A userspace WireGuard device is configured through ``/var/run/wireguard/<device>.sock``: a
``get=1`` request answers with ``key=value`` lines (device first, then one block per peer
starting at ``public_key``), a ``set=1`` request carries changes in the same form; both end with
an empty line and the reply with ``errno=N``. Keys are hex on this socket, base64 in leases.
The protocol is small and stable (https://www.wireguard.com/xplatform/), so it is spoken here
directly rather than through a library (pyroute2's WireGuard support is kernel-only).

Every ``set`` names only what changes: peers are added, updated or removed one by one, never
by replacing the whole table.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

from flanneld.model.wgkeys import ZERO, Key, WgKeyError
from flanneld.plan.state import sorted_cidrs

RUN_DIR = "/var/run/wireguard"  # wireguard-go's, fixed at build time


class UapiError(Exception):
    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True)
class PeerState:
    public_key: str  # base64
    endpoint: str = ""
    allowed_ips: tuple[str, ...] = ()
    keepalive: int = 0
    psk: Key | None = None
    last_handshake: int = 0  # seconds since the epoch, 0: never
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass(frozen=True)
class DeviceState:
    private_key: Key | None
    listen_port: int
    peers: dict[str, PeerState] = field(default_factory=dict)  # by base64 public key


@dataclass(frozen=True)
class PeerChange:
    """A peer to add or update (all its settings given), or to remove."""

    public_key: str  # base64
    remove: bool = False
    endpoint: str = ""
    allowed_ips: tuple[str, ...] = ()
    keepalive: int = 0
    psk: Key | None = None


def normal_endpoint(text: str) -> str:
    """``ip:port`` with the address in canonical form (IPv6 in brackets)."""
    host, _, port = text.rpartition(":")
    address = ipaddress.ip_address(host.strip("[]"))
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def encode_set(private_key: Key | None = None, listen_port: int | None = None,
               changes: Iterable[PeerChange] = ()) -> bytes:
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={private_key.hex}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    for change in changes:
        lines.append(f"public_key={Key.from_base64(change.public_key).hex}")
        if change.remove:
            lines.append("remove=true")
            continue
        lines.append(f"preshared_key={(change.psk or ZERO).hex}")
        if change.endpoint:
            lines.append(f"endpoint={change.endpoint}")
        lines.append(f"persistent_keepalive_interval={change.keepalive}")
        lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={cidr}" for cidr in change.allowed_ips]
    return ("\n".join(lines) + "\n\n").encode()


def parse_get(text: str) -> DeviceState:
    """A ``get=1`` reply (without its errno line) as a DeviceState."""
    private: Key | None = None
    port = 0
    peers: dict[str, PeerState] = {}
    peer: dict[str, object] | None = None

    def finish() -> None:
        if peer is not None:
            ips = sorted_cidrs(peer.pop("allowed_ips"))  # type: ignore[arg-type]
            peers[peer["public_key"]] = PeerState(allowed_ips=ips, **peer)  # type: ignore[arg-type,index]

    for line in text.splitlines():
        if not line or "=" not in line:
            continue
        name, _, value = line.partition("=")
        try:
            if name == "public_key":
                finish()
                peer = {"public_key": Key.from_hex(value).base64, "allowed_ips": []}
            elif peer is None:
                if name == "private_key":
                    private = Key.from_hex(value)
                elif name == "listen_port":
                    port = int(value)
            elif name == "endpoint":
                peer["endpoint"] = normal_endpoint(value)
            elif name == "allowed_ip":
                peer["allowed_ips"].append(str(ipaddress.ip_network(value, strict=False)))  # type: ignore[attr-defined]
            elif name == "persistent_keepalive_interval":
                peer["keepalive"] = int(value)
            elif name == "preshared_key":
                psk = Key.from_hex(value)
                peer["psk"] = None if psk == ZERO else psk
            elif name == "last_handshake_time_sec":
                peer["last_handshake"] = int(value)
            elif name in ("rx_bytes", "tx_bytes"):
                peer[name] = int(value)
        except (ValueError, WgKeyError) as exc:
            raise UapiError(f"unreadable {name} in the device's reply: {exc}") from None
    finish()
    return DeviceState(private, port, peers)


class UapiClient:
    """Talks to one wireguard-go device's socket (one short connection per request)."""

    def __init__(self, device: str, run_dir: str = RUN_DIR, timeout: float = 5.0) -> None:
        self.device = device
        self.path = os.path.join(run_dir, f"{device}.sock")
        self.timeout = timeout

    def alive(self) -> bool:
        """Whether a wireguard-go process answers on the device's socket."""
        try:
            self.get()
        except UapiError:
            return False
        return True

    def _exchange(self, request: bytes) -> str:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                sock.sendall(request)
                chunks: list[bytes] = []
                last = b""
                while True:  # the reply ends with an empty line
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    last = (last + chunk)[-2:]
                    if last == b"\n\n":
                        break
        except OSError as exc:
            raise UapiError(f"wireguard-go socket {self.path}: {exc.strerror or exc}", exc.errno or 0) from None
        text = b"".join(chunks).decode(errors="replace")
        body, _, tail = text.rstrip("\n").rpartition("errno=")
        if not tail:
            raise UapiError(f"wireguard-go socket {self.path}: reply without errno")
        err = int(tail.strip() or 0)
        if err:
            raise UapiError(f"wireguard-go refused the request on {self.path}: {os.strerror(err)}", err)
        return body

    def get(self) -> DeviceState:
        return parse_get(self._exchange(b"get=1\n\n"))

    def set(self, private_key: Key | None = None, listen_port: int | None = None,
            changes: Iterable[PeerChange] = ()) -> None:
        self._exchange(encode_set(private_key, listen_port, changes))
