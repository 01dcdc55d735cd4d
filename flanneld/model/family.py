"""The address family as one value: everything that differs between IPv4 and IPv6, in one place.

Config, leases, planners, the firewall, the reconciler and the ctl views ask a :class:`Family`
instead of re-deciding "version 4 or 6" each on their own: a dual-stack node is the same code
run for each family its config enables.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    version: int
    name: str  # "IPv4", for messages
    af: int  # socket.AF_INET / AF_INET6
    bits: int
    multicast: str  # never masqueraded
    iptables: str  # the iptables tool family: iptables / ip6tables
    nft_family: str  # nftables address family and table: ip flannel-ipv4 / ip6 flannel-ipv6
    nft_table: str
    route_metric: int  # what the kernel gives routes without a metric (IPv6: 1024): keeps diffs stable

    def __str__(self) -> str:
        return self.name

    # -- a lease's halves (duck-typed: flanneld.model.lease.Lease and LeaseAttrs) -----------------------

    def subnet(self, lease: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        return lease.subnet if self.version == 4 else lease.subnet6

    def public(self, lease: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The lease's public address of this family; None when unset (IPv4 0.0.0.0 included)."""
        address = lease.public_ip if self.version == 4 else lease.public_ipv6
        return address if address is not None and int(address) != 0 else None

    def backend_data(self, lease: Any) -> Any:
        """BackendData (IPv4) or BackendV6Data, decoded."""
        return lease.backend if self.version == 4 else lease.backend_v6

    def network(self, address: int, prefixlen: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        cls = ipaddress.IPv4Network if self.version == 4 else ipaddress.IPv6Network
        return cls((address, prefixlen))


IPV4 = Family(4, "IPv4", socket.AF_INET, 32, "224.0.0.0/4", "iptables", "ip", "flannel-ipv4", 0)
IPV6 = Family(6, "IPv6", socket.AF_INET6, 128, "ff00::/8", "ip6tables", "ip6", "flannel-ipv6", 1024)
FAMILIES = (IPV4, IPV6)


def family_of(version: int) -> Family:
    """The family of an address or network's ``.version``."""
    return IPV4 if version == 4 else IPV6
