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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # both CLIs import this module for DEFAULT_PATH: it stays cheap to import
    from flanneld.model.lease import Lease

DEFAULT_PATH = "/run/flannel/subnet.env"
MIN_MTU, MAX_MTU = 68, 65535  # IPv4's minimum link MTU; the largest an IP packet can be


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
        """Upstream's lines in upstream's order, each present when its value is (a file read back
        renders as it was read: parse(render()) is the same SubnetEnv)."""
        lines = []
        if self.networks:
            lines.append("FLANNEL_NETWORK=" + ",".join(str(n) for n in self.networks))
        if self.subnet is not None:
            lines.append(f"FLANNEL_SUBNET={self.subnet}")
        if self.ipv6_networks:
            lines.append("FLANNEL_IPV6_NETWORK=" + ",".join(str(n) for n in self.ipv6_networks))
        if self.ipv6_subnet is not None:
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
    """Parse subnet.env text by the rules the CNI plugin reads it with (upstream's plugin's).

    The plugin keeps a reader of its own (it may import the standard library only), so the two
    are one contract, pinned by a property test that feeds both the same fuzzed files: a line is
    split at its first ``=`` (a line without one is a name with an empty value), the name is
    taken as it stands, the value stripped and parsed as the line is read (a bad value is an
    error even if the name comes again); unknown names are ignored, the last of a repeated name
    wins. A network or a subnet, an MTU and IPMASQ must be there.
    """
    fields: dict[str, Any] = {}
    try:
        for line in text.splitlines():
            name, _, value = line.partition("=")
            if name in _FIELDS:
                field, parse_value = _FIELDS[name]
                fields[field] = parse_value(value.strip())
    except ValueError as exc:
        raise SubnetEnvError(str(exc)) from None
    missing = [name for name in ("FLANNEL_MTU", "FLANNEL_IPMASQ") if _FIELDS[name][0] not in fields]
    if not fields.get("networks") and not fields.get("ipv6_networks"):
        missing[:0] = ["FLANNEL_NETWORK or FLANNEL_IPV6_NETWORK"]
    if fields.get("subnet") is None and fields.get("ipv6_subnet") is None:
        missing[:0] = ["FLANNEL_SUBNET or FLANNEL_IPV6_SUBNET"]
    if missing:
        raise SubnetEnvError(f"missing {', '.join(missing)}")
    return SubnetEnv(**fields)


def _cidr(text: str, version: int) -> str:
    """`text` stripped, for ipaddress to parse, refusing first what it accepts but the plugin (and
    Go's ParseCIDR) does not: an IPv6 zone, IPv4 embedded in IPv6, a missing prefix length."""
    text = text.strip()
    if "%" in text or "/" not in text or (version == 6 and "." in text):
        raise ValueError(f"{text!r} is not an IPv{version} CIDR")
    return text


def _networks(text: str, version: int) -> tuple:
    cls = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    return tuple(cls(_cidr(part, version), strict=False) for part in text.split(",") if part.strip())


def _mtu(text: str) -> int:
    """Decimal digits only (Go's ParseUint; not Python's int, which takes "-1", "+5", "1_450") and
    an MTU a link can have."""
    if not (text.isascii() and text.isdigit()) or not MIN_MTU <= int(text) <= MAX_MTU:
        raise ValueError(f"FLANNEL_MTU must be a number in {MIN_MTU}..{MAX_MTU}, got {text!r}")
    return int(text)


def _ipmasq(text: str) -> bool:
    """What the daemon (ours or upstream's strconv.FormatBool) writes; upstream's plugin took any
    other word for false, silently turning pod masquerading off."""
    if text not in ("true", "false"):
        raise ValueError(f"FLANNEL_IPMASQ must be true or false, got {text!r}")
    return text == "true"


_FIELDS: dict[str, tuple[str, Callable[[str], Any]]] = {  # name -> (SubnetEnv field, value parser)
    "FLANNEL_NETWORK": ("networks", lambda v: _networks(v, 4)),
    "FLANNEL_SUBNET": ("subnet", lambda v: ipaddress.IPv4Interface(_cidr(v, 4))),
    "FLANNEL_IPV6_NETWORK": ("ipv6_networks", lambda v: _networks(v, 6)),
    "FLANNEL_IPV6_SUBNET": ("ipv6_subnet", lambda v: ipaddress.IPv6Interface(_cidr(v, 6))),
    "FLANNEL_MTU": ("mtu", _mtu),
    "FLANNEL_IPMASQ": ("ipmasq", _ipmasq),
}


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
    import tempfile

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
    from flanneld.model.atomicfile import write_atomically

    write_atomically(path, env.render(), 0o644)
