"""Choosing the external interface and the addresses we publish (``--iface`` and friends).

Upstream rules: ``--iface`` values (names or IPs) are tried in order, first match wins; then
``--iface-regex`` values, each matched against interface addresses first, then names; then
``--iface-can-reach`` (the interface the kernel would route that address through); otherwise
the interface holding the default route. Addresses are ranked global before link-local and
permanent before dynamic. ``--public-ip``/``--public-ipv6`` override what we publish.

:func:`choose` is pure (it works on a snapshot), :func:`select` takes the snapshot.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from flanneld.dataplane import nlcodec as nl
from flanneld.dataplane.netlink import AddrInfo, Kernel, KernelError
from flanneld.dataplane.nlcodec import RT_SCOPE_UNIVERSE
from flanneld.model.family import IPV4, IPV6
from flanneld.plan.backend import External


class IfaceError(Exception):
    """No usable external interface; the message says what was tried."""


@dataclass(frozen=True)
class IfaceOptions:
    ifaces: tuple[str, ...] = ()
    regexes: tuple[str, ...] = ()
    can_reach: str = ""
    public_ip: str = ""
    public_ipv6: str = ""


@dataclass(frozen=True)
class Iface:
    name: str
    index: int
    mtu: int
    up: bool
    addrs: tuple[AddrInfo, ...] = field(default=())

    def ranked(self, version: int) -> list[AddrInfo]:
        """This family's usable addresses (never deprecated, tentative or failed DAD), as upstream
        ranks them since v0.28: global before link-local, permanent before dynamic, temporary
        (privacy) ones last, so host-gw over IPv6 survives a SLAAC privacy address rotating."""
        mine = [a for a in self.addrs if a.version == version and a.usable]
        return sorted(mine, key=lambda a: (a.scope != RT_SCOPE_UNIVERSE, not a.permanent,
                                           bool(a.flags & nl.IFA_F_TEMPORARY)))

    def first_global(self, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        for a in self.ranked(version):
            if a.scope == RT_SCOPE_UNIVERSE:
                return ipaddress.ip_address(a.ip)
        return None


def _by_ip(interfaces: list[Iface], ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Iface | None:
    for iface in interfaces:
        if any(ipaddress.ip_address(a.ip) == ip for a in iface.addrs):
            return iface
    return None


class Choice(NamedTuple):
    iface: Iface
    why: str  # for the log
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None  # the address that chose it


def choose(interfaces: list[Iface], opts: IfaceOptions, default_index: int | None,
           can_reach: tuple[int | None, str | None, str | None] | None = None) -> Choice:
    """The interface to use, why, and the address that chose it (upstream's rules): --iface names
    or addresses in order, then --iface-regex (addresses before names), then --iface-can-reach
    (the route's interface and preferred source); with none of them, the interface holding
    --public-ip/--public-ipv6, else the default route's."""
    for spec in opts.ifaces:
        try:
            ip = ipaddress.ip_address(spec)
        except ValueError:
            found = next((i for i in interfaces if i.name == spec), None)
            if found is not None:
                return Choice(found, f"--iface {spec}")
        else:
            found = _by_ip(interfaces, ip)
            if found is not None:
                return Choice(found, f"--iface {spec}", ip)
    for pattern in opts.regexes:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise IfaceError(f"--iface-regex {pattern!r} is not a valid regular expression: {exc}") from None
        for iface in interfaces:
            matched = next((a for a in iface.ranked(4) + iface.ranked(6) if regex.search(a.ip)), None)
            if matched is not None:
                return Choice(iface, f"--iface-regex {pattern} (address)", ipaddress.ip_address(matched.ip))
        for iface in interfaces:
            if regex.search(iface.name):
                return Choice(iface, f"--iface-regex {pattern} (name)")
    if opts.can_reach:
        if can_reach is None or can_reach[0] is None:
            raise IfaceError(f"--iface-can-reach {opts.can_reach}: no route to it")
        found = next((i for i in interfaces if i.index == can_reach[0]), None)
        if found is None:
            raise IfaceError(f"--iface-can-reach {opts.can_reach}: the route's interface vanished")
        source = ipaddress.ip_address(can_reach[2]) if can_reach[2] else None
        return Choice(found, f"--iface-can-reach {opts.can_reach}", source)
    if opts.ifaces or opts.regexes:
        tried = ", ".join([*(f"--iface {s}" for s in opts.ifaces), *(f"--iface-regex {r}" for r in opts.regexes)])
        raise IfaceError(f"failed to find an interface matching {tried}")
    for flag, public in (("--public-ip", opts.public_ip), ("--public-ipv6", opts.public_ipv6)):
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(public)
            found = _by_ip(interfaces, ip)
            if found is not None:
                return Choice(found, f"{flag} {public} is its address", ip)
    if default_index is None:
        raise IfaceError("no default route: use --iface, --iface-regex or --iface-can-reach to pick an interface")
    found = next((i for i in interfaces if i.index == default_index), None)
    if found is None:
        raise IfaceError("the default route's interface vanished")
    return Choice(found, "default route")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def onlink_networks(addrs: Iterable[AddrInfo], routes: Iterable[tuple[int, bytes, int]]) -> tuple[Network, ...]:
    """What an interface reaches without a router: the prefixes of its global addresses and its
    on-link routes (``ip route add 198.51.100.128/25 dev eth0``: upstream's host-gw routes a peer
    there, the kernel taking the gateway as on-link), sorted, each once."""
    nets = {ipaddress.ip_network(f"{a.ip}/{a.prefixlen}", strict=False) for a in addrs if a.scope == RT_SCOPE_UNIVERSE}
    nets.update((ipaddress.IPv4Network if family == nl.AF_INET else ipaddress.IPv6Network)(
        (int.from_bytes(dst, "big"), length), strict=False) for family, dst, length in routes)
    return tuple(sorted(nets, key=lambda n: (n.version, n)))  # type: ignore[arg-type]


def read_onlink(kernel: Kernel, index: int) -> tuple[Network, ...]:
    return onlink_networks(kernel.addresses(index), kernel.onlink_routes(index))


def touches_onlink(kind: int, payload: bytes, index: int) -> bool:
    """Whether a netlink notification may change what interface `index` reaches directly: an
    address of it, or an on-link route out of it, came or went (renumbering, a subnet added)."""
    view = memoryview(payload)
    if kind in (nl.RTM_NEWADDR, nl.RTM_DELADDR):
        return nl.parse_addr(view).ifindex == index
    if kind in (nl.RTM_NEWROUTE, nl.RTM_DELROUTE):
        return nl.is_onlink_route(nl.parse_route(view), index)
    return False


def external(iface: Iface, opts: IfaceOptions, need_v4: bool, need_v6: bool,
             onlink_routes: Iterable[tuple[int, bytes, int]] = (),
             chosen: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None) -> External:
    """Addresses to run over and to publish on the chosen interface: per family the address that
    chose it (upstream publishes and sends from the matched address), else --public-ip/--public-ipv6
    when the interface holds it (upstream #2072: the published IPv6 address is the one used), else
    the best ranked."""
    try:
        given4 = ipaddress.IPv4Address(opts.public_ip) if opts.public_ip else None
        given6 = ipaddress.IPv6Address(opts.public_ipv6) if opts.public_ipv6 else None
    except ValueError as exc:
        raise IfaceError(f"bad --public-ip/--public-ipv6: {exc}") from None
    held = {ipaddress.ip_address(a.ip) for a in iface.addrs}
    ip4 = chosen if chosen is not None and chosen.version == 4 else \
        given4 if given4 in held else iface.first_global(4)
    ip6 = chosen if chosen is not None and chosen.version == 6 else \
        given6 if given6 in held else iface.first_global(6)
    if need_v4 and ip4 is None:
        raise IfaceError(f"interface {iface.name} has no IPv4 address")
    if need_v6 and ip6 is None:
        raise IfaceError(f"interface {iface.name} has no global IPv6 address")
    public, public6 = given4 or ip4, given6 or ip6
    onlink = onlink_networks(iface.addrs, onlink_routes)
    return External(iface.name, iface.index, iface.mtu, ip4 if need_v4 else None,  # type: ignore[arg-type]
                    public if need_v4 else None, ip6 if need_v6 else None,  # type: ignore[arg-type]
                    public6 if need_v6 else None, onlink)  # type: ignore[arg-type]


def check_one_interface(interfaces: list[Iface], choice: Choice, opts: IfaceOptions, need_v6: bool) -> None:
    """Dual-stack with ``--iface <IPv4 address>``: an interface holding --public-ipv6 must be the
    chosen one (upstream refuses "v6 interface X must be the same with v4 interface Y"); an
    address no interface holds (NAT) is only published."""
    if not (need_v6 and opts.public_ipv6 and choice.address is not None and choice.address.version == 4):
        return
    with contextlib.suppress(ValueError):
        holder = _by_ip(interfaces, ipaddress.IPv6Address(opts.public_ipv6))
        if holder is not None and holder.index != choice.iface.index:
            raise IfaceError(f"--public-ipv6 {opts.public_ipv6} is an address of {holder.name} but {choice.why} "
                             f"chose {choice.iface.name}: both families must run over one interface")


def snapshot(kernel: Kernel) -> list[Iface]:
    addrs = kernel.addresses()
    return [Iface(link.name, link.index, link.mtu, link.up, tuple(a for a in addrs if a.index == link.index))
            for link in kernel.links()]


def select(kernel: Kernel, opts: IfaceOptions, need_v4: bool, need_v6: bool) -> tuple[External, str]:
    """Pick the external interface in the current namespace."""
    interfaces = snapshot(kernel)
    reach = None
    if opts.can_reach:
        try:
            reach = kernel.route_get(opts.can_reach)
        except KernelError as exc:
            raise IfaceError(f"--iface-can-reach {opts.can_reach}: {exc}") from None
    default = kernel.default_route_oif(IPV4 if need_v4 else IPV6)
    choice = choose(interfaces, opts, default, reach)
    check_one_interface(interfaces, choice, opts, need_v6)
    return external(choice.iface, opts, need_v4, need_v6, kernel.onlink_routes(choice.iface.index),
                    choice.address), choice.why
