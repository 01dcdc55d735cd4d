"""Desired kernel state: the value types planners produce and the reconciler enforces, pure.

Addresses are canonical strings (``inet_ntop`` form, lower-case MACs) so planner output,
netlink dumps and log lines compare and print alike. The table entries (addresses, neighbours,
FDB entries, routes) are named tuples: a node with 5000 peers builds, hashes and compares 15,000
of them on every start and full reconcile, and a tuple does each in C (a dataclass's generated
``__hash__`` and ``__eq__`` are Python calls). Each table entry has a ``key``: the part
the kernel uses to identify it. The diff replaces entries in place when only their value
changed (no window without a route or neighbour), and deletes only entries whose key is no
longer desired.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Generic, NamedTuple, Protocol, TypeVar

if TYPE_CHECKING:
    from flanneld.model.wgkeys import Key


class LinkSpec(Protocol):
    """A device a backend wants: the fields every kind has. Each kind adds its own parameters, and
    the reconciler creates, adopts and recreates it through that kind's one handler (flanneld.dataplane.devices)."""

    kind: ClassVar[str]

    @property
    def name(self) -> str: ...

    @property
    def mtu(self) -> int: ...

    @property
    def family(self) -> int: ...


@dataclass(frozen=True, slots=True)
class ObservedLink:
    """A device as it exists in the kernel: the one type for it, whoever read it (the daemon's netlink
    codec, flannelctl doctor through pyroute2). A backend publishes from it (its MAC), the device
    handlers judge whether an existing device can be adopted, doctor checks it.

    ``data`` holds its kind's attributes under their netlink names (``IFLA_VXLAN_ID`` ...), as
    pyroute2 names them, so a reader needs to know no kind and each kind checks its own.
    """

    name: str
    index: int
    kind: str | None
    mtu: int
    mac: str | None
    up: bool
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class VxlanLink:
    """A VXLAN device and the parameters that make an existing one reusable."""

    kind: ClassVar[str] = "vxlan"
    name: str
    vni: int
    local: str  # VTEP source address (the external interface's address)
    underlay: str  # external interface name
    port: int  # 0: kernel default (8472)
    gbp: bool
    learning: bool
    mtu: int
    mac: str | None  # preferred MAC when (re)creating: keeps peers' FDB entries valid
    disable_tx_checksum: bool = False

    @property
    def family(self) -> int:
        return 6 if ":" in self.local else 4


@dataclass(frozen=True, slots=True)
class WireguardLink:
    """A WireGuard device: made by the kernel's ``wireguard`` link kind or by a ``wireguard-go``
    process (`provider`: auto, kernel or userspace), configured with our key and listen port."""

    kind: ClassVar[str] = "wireguard"
    name: str
    mtu: int
    listen_port: int
    private_key: Key  # prints as <key>
    public_key: str  # base64: what our lease publishes
    versions: tuple[int, ...]  # the address families it carries
    provider: str = "auto"

    @property
    def family(self) -> int:
        return 6 if 6 in self.versions else 4


def sorted_cidrs(cidrs: Iterable[str]) -> tuple[str, ...]:
    """A peer's AllowedIPs in the one order planner, kernel readers and doctor all use: IPv4 first."""
    return tuple(sorted(cidrs, key=lambda c: (":" in c, c)))


@dataclass(frozen=True, slots=True)
class WgPeer:
    """One WireGuard peer of one of our devices: the peer table's entry, keyed by public key."""

    dev: str
    public_key: str  # base64, as leases carry it
    endpoint: str  # "198.51.100.12:51820", "[2001:db8:51::c]:51821"
    allowed_ips: tuple[str, ...]  # sorted CIDRs: the peer's subnet(s)
    keepalive: int = 0  # seconds, 0: off
    psk: Key | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.dev, self.public_key)


def endpoint_learnt(actual: WgPeer, wanted: WgPeer) -> bool:
    """Whether a device's peer differs from the lease's only in its endpoint: one WireGuard learnt
    from the peer's handshakes (behind NAT, its mapped address and port). Not drift."""
    return actual != wanted and replace(actual, endpoint=wanted.endpoint) == wanted


class Address(NamedTuple):
    dev: str
    cidr: str  # "198.18.3.0/32"


class Neigh(NamedTuple):
    dev: str
    ip: str
    mac: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.dev, self.ip)


class Fdb(NamedTuple):
    dev: str
    mac: str
    dst: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.dev, self.mac)


class Route(NamedTuple):
    """A main-table route; ``gateway``/``dev`` are None for a blackhole."""

    dst: str  # "198.18.2.0/24"
    gateway: str | None = None
    dev: str | None = None
    onlink: bool = False
    blackhole: bool = False
    metric: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.dst, self.metric)


@dataclass(frozen=True)
class DesiredState:
    """Everything one backend wants in the kernel.

    ``owned_networks`` bounds what the reconciler may delete: routes whose destination lies in
    one of them, and addresses in them on the devices listed in ``links``.
    """

    links: tuple[LinkSpec, ...] = ()
    addresses: frozenset[Address] = frozenset()
    neighs: frozenset[Neigh] = frozenset()
    fdbs: frozenset[Fdb] = frozenset()
    routes: frozenset[Route] = frozenset()
    owned_networks: tuple[str, ...] = ()
    wg_peers: frozenset[WgPeer] = frozenset()

    @property
    def devices(self) -> tuple[str, ...]:
        """Devices whose neighbour and FDB tables we own."""
        return tuple(link.name for link in self.links)


class _Keyed(Protocol):
    @property
    def key(self) -> object: ...


E = TypeVar("E", bound=_Keyed)


@dataclass(frozen=True)
class TableDiff(Generic[E]):
    """What to write (create or replace) and what to delete to turn `actual` into `desired`."""

    put: list[E]
    delete: list[E]

    def __bool__(self) -> bool:
        return bool(self.put or self.delete)


def diff(desired: Iterable[E], actual: Iterable[E]) -> TableDiff[E]:
    wanted = set(desired)
    have = set(actual)
    wanted_keys = {e.key for e in wanted}
    put = [e for e in wanted if e not in have]
    delete = [e for e in have if e.key not in wanted_keys]
    return TableDiff(put, delete)
