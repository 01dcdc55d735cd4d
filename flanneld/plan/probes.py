"""The overlay self-test, its pure half: what to probe for each peer, what the answers mean, and
how to say it to an operator.

Every table can be right while packets still die between two nodes (VXLAN's UDP port dropped by
a firewall or a virtual switch, a path MTU below the overlay's, a forward policy). The daemon's
prober (:mod:`flanneld.node.prober`) sends per peer a small echo request and a full-size one
(the overlay MTU, don't-fragment) over the overlay's own path, and, when those fail, one to the
peer's public address over the underlay. :func:`classify` turns the answers into a state:

- ``ok``: both overlay probes answered;
- ``mtu``: the small one answered, the full-size one did not (the size that passes is named);
- ``unreachable``: the underlay reaches the peer, the overlay does not (encapsulation blocked);
- ``underlay-unreachable``: not even the underlay reaches it;
- ``unprobed``: nothing to probe (no overlay address to aim at; for host-gw, a peer whose pod
  gateway never answered: no pod there yet).

What is probed is the peer's device address for vxlan and wireguard (its subnet's first address,
held by upstream's nodes and ours alike, so upstream peers are probed too) and, for host-gw, its
pod gateway (the subnet's .1 on the CNI bridge).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from flanneld.model.config import NetworkConfig
from flanneld.model.lease import Lease

OK, MTU, UNREACHABLE, UNDERLAY, UNPROBED = "ok", "mtu", "unreachable", "underlay-unreachable", "unprobed"
STATES = (OK, MTU, UNREACHABLE, UNDERLAY, UNPROBED)
FAILING = (UNREACHABLE, UNDERLAY, MTU)  # what doctor and the cluster view report (unprobed is not a failure)
ENCAPSULATED = {"vxlan": "VXLAN", "wireguard": "WireGuard"}
DEFAULT_PORTS = {"vxlan": 8472, "wireguard": 51820}
PORT_OPTIONS = {"vxlan": "Port", "wireguard": "ListenPort"}
IP_HEADER = {4: 20, 6: 40}
ICMP_HEADER = 8


@dataclass(frozen=True, slots=True)
class Target:
    """One peer, as the prober aims at it."""

    key: str  # the lease's key (its subnet: subnet_of)
    public: str  # its public address (underlay)
    overlay: str  # the address probed over the overlay ('' when there is none: unprobed)
    version: int  # 4 or 6


def target_for(lease: Lease, config: NetworkConfig) -> Target:
    """What the prober aims at for a peer lease: IPv4 where the network has it (dual-stack
    networks are probed over IPv4), else IPv6."""
    kind = config.backend.type
    if lease.subnet is not None and config.ipv4 is not None:
        subnet, public, version = lease.subnet, str(lease.public_ip), 4
    elif lease.subnet6 is not None and config.ipv6 is not None:
        subnet, public, version = lease.subnet6, str(lease.public_ipv6 or ""), 6
    else:
        return Target(lease.key, str(lease.public_ip), "", 4)
    if kind in ENCAPSULATED:
        overlay = str(subnet.network_address)
    elif kind == "host-gw" and subnet.num_addresses > 2:
        overlay = str(subnet.network_address + 1)
    else:
        overlay = ""  # alloc, extension: no data path of ours to probe
    return Target(lease.key, public, overlay, version)


def _key_part(key: str, version: int) -> str:
    v4, _, v6 = key.partition("&")
    return v4 if version == 4 or not v6 else v6


def subnet_of(target: Target) -> str:
    """The probed subnet, from the lease key (``198.18.5.0-24``, ``…&2001:db8::-64``): not kept
    per peer, which at 5000 peers is memory."""
    return _key_part(target.key, target.version).replace("-", "/")


def device_address(key: str, version: int) -> str:
    """The subnet's first address (vxlan's and wireguard's device address), from the lease key."""
    return _key_part(key, version).partition("-")[0]


class Answers(NamedTuple):
    """What came back from one look at a peer."""

    small: bool
    full: bool
    underlay: bool | None  # None: not asked (the overlay answered)


def classify(answers: Answers, ever_answered: bool, kind: str) -> str:
    """The state a look's answers mean. For host-gw a pod gateway that never answered is taken
    for one that does not exist yet (no pod on the peer): unprobed, not a failure."""
    if answers.small:
        return OK if answers.full else MTU
    if answers.underlay is None:
        return UNPROBED
    if not answers.underlay:
        return UNDERLAY
    if kind == "host-gw" and not ever_answered:
        return UNPROBED
    return UNREACHABLE


def encapsulation(config: NetworkConfig) -> str:
    """How the overlay crosses the underlay, in an operator's words."""
    kind = config.backend.type
    if kind in ENCAPSULATED:
        port = config.backend.get(PORT_OPTIONS[kind]) or DEFAULT_PORTS[kind]
        return f"{ENCAPSULATED[kind]} on UDP {port}"
    return "routed pod traffic"


def cause(state: str, target: Target, config: NetworkConfig, mtu: int, passing: int | None) -> str:
    """The likely reason for `state`, in words (the log line's and the table's)."""
    if state == UNREACHABLE:
        if config.backend.type == "host-gw":
            return (f"underlay reaches {target.public} but its pod gateway {target.overlay} gets no answer — "
                    "forwarding off or a firewall's forward policy on the peer?")
        return (f"underlay reaches {target.public} but {encapsulation(config)} gets no answer — a firewall or "
                "switch between the nodes?")
    if state == UNDERLAY:
        return f"{target.public} does not answer on the underlay either — the node is down or cut off?"
    if state == MTU:
        passes = f"{passing} pass" if passing else "no size tried passes"
        return (f"packets of {mtu} bytes are lost, {passes}: the path MTU is below the overlay MTU; set "
                "Backend.MTU")
    if state == UNPROBED:
        return "nothing to probe" if not target.overlay else f"no answer from {target.overlay} yet (no pod there?)"
    return ""


def payload_size(total: int, version: int) -> int:
    """The echo payload that makes an IP packet of `total` bytes."""
    return max(8, total - IP_HEADER[version] - ICMP_HEADER)


def ladder(low: int, high: int, steps: int) -> list[int]:
    """Packet sizes strictly between `low` (passes) and `high` (lost), evenly spread, `steps` at
    most: one round of the search for the size that passes."""
    if high - low <= 1:
        return []
    count = min(steps, high - low - 1)
    return sorted({low + (high - low) * i // (count + 1) for i in range(1, count + 1)})


