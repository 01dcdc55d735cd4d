"""subnet.env: the contract between flanneld and the CNI plugin (upstream format, atomic).

Lines, in this order, no quotes: FLANNEL_NETWORK, FLANNEL_SUBNET (if IPv4), FLANNEL_IPV6_NETWORK,
FLANNEL_IPV6_SUBNET (if IPv6), FLANNEL_MTU, FLANNEL_IPMASQ. The *_SUBNET values are the first
address of the lease with the lease's prefix length (10.5.72.1/24). The file is replaced with
rename(2) so a CNI ADD never reads half a file.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import tempfile
from dataclasses import dataclass

from flanneld.model.atomicfile import write_atomically
from flanneld.model.lease import Lease

DEFAULT_PATH = "/run/flannel/subnet.env"


class SubnetEnvError(ValueError):
    """subnet.env exists but cannot be understood."""


@dataclass(frozen=True)
class SubnetEnv:
    networks: tuple[ipaddress.IPv4Network, ...] = ()
    subnet: ipaddress.IPv4Interface | None = None
    ipv6_networks: tuple[ipaddress.IPv6Network, ...] = ()
    ipv6_subnet: ipaddress.IPv6Interface | None = None
    mtu: int = 0
    ipmasq: bool = False

    @property
    def lease_subnet(self) -> ipaddress.IPv4Network | None:
        return self.subnet.network if self.subnet is not None else None

    @property
    def lease_subnet6(self) -> ipaddress.IPv6Network | None:
        return self.ipv6_subnet.network if self.ipv6_subnet is not None else None

    def render(self) -> str:
        lines = []
        if self.subnet is not None:
            lines.append("FLANNEL_NETWORK=" + ",".join(str(n) for n in self.networks))
            lines.append(f"FLANNEL_SUBNET={self.subnet}")
        if self.ipv6_subnet is not None:
            lines.append("FLANNEL_IPV6_NETWORK=" + ",".join(str(n) for n in self.ipv6_networks))
            lines.append(f"FLANNEL_IPV6_SUBNET={self.ipv6_subnet}")
        lines.append(f"FLANNEL_MTU={self.mtu}")
        lines.append(f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}")
        return "\n".join(lines) + "\n"


def _first_address(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    return f"{net.network_address + 1}/{net.prefixlen}"


def for_lease(
    lease: Lease,
    network: ipaddress.IPv4Network | None,
    ipv6_network: ipaddress.IPv6Network | None,
    mtu: int,
    ipmasq: bool,
) -> SubnetEnv:
    """The subnet.env content for our lease."""
    subnet = ipaddress.IPv4Interface(_first_address(lease.subnet)) if lease.subnet and network else None
    subnet6 = (
        ipaddress.IPv6Interface(_first_address(lease.subnet6)) if lease.subnet6 and ipv6_network else None
    )
    return SubnetEnv(
        networks=(network,) if subnet is not None and network is not None else (),
        subnet=subnet,
        ipv6_networks=(ipv6_network,) if subnet6 is not None and ipv6_network is not None else (),
        ipv6_subnet=subnet6,
        mtu=mtu,
        ipmasq=ipmasq,
    )


def parse(text: str) -> SubnetEnv:
    """Parse subnet.env text; unknown keys and blank/comment lines are ignored."""
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise SubnetEnvError(f"line {number}: expected NAME=VALUE, got {line!r}")
        values[name.strip()] = value.strip()
    try:
        return SubnetEnv(
            networks=_networks(values.get("FLANNEL_NETWORK", ""), ipaddress.IPv4Network),
            subnet=ipaddress.IPv4Interface(values["FLANNEL_SUBNET"]) if values.get("FLANNEL_SUBNET") else None,
            ipv6_networks=_networks(values.get("FLANNEL_IPV6_NETWORK", ""), ipaddress.IPv6Network),
            ipv6_subnet=(
                ipaddress.IPv6Interface(values["FLANNEL_IPV6_SUBNET"])
                if values.get("FLANNEL_IPV6_SUBNET")
                else None
            ),
            mtu=int(values.get("FLANNEL_MTU", "0") or 0),
            ipmasq=values.get("FLANNEL_IPMASQ", "false").lower() == "true",
        )
    except ValueError as exc:
        raise SubnetEnvError(str(exc)) from None


def _networks(text: str, cls: type) -> tuple:
    return tuple(cls(part.strip()) for part in text.split(",") if part.strip())


def read(path: str) -> SubnetEnv | None:
    """The parsed file, or None when it does not exist."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise SubnetEnvError(f"{path} is not a text file") from None
    try:
        return parse(text)
    except SubnetEnvError as exc:
        raise SubnetEnvError(f"{path}: {exc}") from None


def check_writable(path: str) -> None:
    """Make sure `path` can be written (its directory created); SubnetEnvError saying why not.

    The daemon checks this before it leases a subnet or programs anything, so a bad
    --subnet-file fails at once instead of after the data plane was set up.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        with tempfile.NamedTemporaryFile(prefix=f".{os.path.basename(path)}.", dir=directory):
            pass
    except OSError as exc:
        raise SubnetEnvError(f"cannot write the subnet file {path} (--subnet-file): {exc.strerror or exc}") from None


def write(path: str, env: SubnetEnv) -> None:
    """Atomically replace `path` (mode 0644), creating its directory (0755) if needed."""
    write_atomically(path, env.render(), 0o644)
