"""``flannelctl doctor``: is this node's overlay what its lease and the other leases say it should be?

Three sources are compared: subnet.env (what pods are configured from), the leases in etcd (what
peers believe), and the kernel (what packets meet). The expected kernel state comes from the
daemon's own pure planner; the actual state is read with pyroute2 and the firewall tools — a
reader independent of the daemon's netlink codec, so a bug there cannot hide itself here.

:func:`diagnose` is pure: it takes the three sources as values and returns findings.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from flanneld.ctl.views import human_duration
from flanneld.dataplane.brnetfilter import bridge_calls_iptables, problem
from flanneld.dataplane.firewall import NFT_TABLE, FirewallSpec, iptables_rules, iptables_tool, nft_script
from flanneld.dataplane.nlcodec import IFF_UP, NUD_PERMANENT, RTN_BLACKHOLE, RTN_UNICAST, RTNH_F_ONLINK, RTPROT_KERNEL
from flanneld.leases.listing import Listed, Listing
from flanneld.leases.overlaps import unprogrammed
from flanneld.model.config import ConfigError, NetworkConfig
from flanneld.model.lease import Lease
from flanneld.model.subnetenv import SubnetEnv
from flanneld.model.wgkeys import Key, WgKeyError
from flanneld.plan.backend import Backend, External, NodeSettings, create_backend
from flanneld.plan.state import Fdb, Neigh, ObservedLink, Route, WgPeer, endpoint_learnt, sorted_cidrs

OK, WARN, PROBLEM = "ok", "warning", "problem"


@dataclass(frozen=True)
class Finding:
    level: str  # ok | warning | problem
    area: str  # subnet.env, lease, device, neighbour, fdb, route, wireguard peer, firewall, peers, pods
    text: str


@dataclass
class KernelView:
    """What the kernel holds, in the planner's value types."""

    links: dict[str, ObservedLink] = field(default_factory=dict)
    addresses: dict[int, list[tuple[str, int, int]]] = field(default_factory=dict)  # index -> (ip, plen, scope)
    neighs: set[Neigh] = field(default_factory=set)
    fdbs: set[Fdb] = field(default_factory=set)
    routes: set[Route] = field(default_factory=set)
    wg_peers: set[WgPeer] = field(default_factory=set)
    firewall: dict[str, str] = field(default_factory=dict)  # "iptables-4 nat" / "nft-4" -> listing text
    bridge_nf: dict[int, bool | None] = field(default_factory=dict)  # family -> bridge-nf-call-ip*tables

    def link_by_index(self, index: int | None) -> ObservedLink | None:
        return next((link for link in self.links.values() if link.index == index), None)


@dataclass(frozen=True)
class Inputs:
    config: NetworkConfig
    env: SubnetEnv | None
    env_problem: str  # why subnet.env could not be used ('' if fine)
    listing: Listing
    ttls: dict[int, int]
    kernel: KernelView
    forward_rules: bool = True


# -- reading the kernel (imperative) ----------------------------------------------------------


def observed_link(msg: Any) -> ObservedLink:
    """A pyroute2 link message as the device it describes (the daemon's codec reads the same type)."""
    info = msg.get_attr("IFLA_LINKINFO")
    kind = (info.get_attr("IFLA_INFO_KIND") if info else None) or ""
    data = info.get_attr("IFLA_INFO_DATA") if info else None
    attrs = dict(data["attrs"]) if data is not None and not isinstance(data, str | bytes) else {}
    return ObservedLink(msg.get_attr("IFLA_IFNAME"), msg["index"], kind, msg.get_attr("IFLA_MTU"),
                        (msg.get_attr("IFLA_ADDRESS") or "").lower(), bool(msg["flags"] & IFF_UP), attrs)


def read_kernel(nftables: bool, families: Sequence[int]) -> KernelView:
    """Links, addresses, our-kind table entries and firewall listings, via pyroute2 and the tools."""
    from pyroute2 import IPRoute  # only doctor needs it: keeps the other commands fast

    view = KernelView()
    with IPRoute() as ipr:
        for msg in ipr.get_links():
            link = observed_link(msg)
            view.links[link.name] = link
        names = {link.index: link.name for link in view.links.values()}
        for msg in ipr.get_addr():
            view.addresses.setdefault(msg["index"], []).append(
                (msg.get_attr("IFA_ADDRESS"), msg["prefixlen"], msg["scope"]))
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ipr.get_neighbours(family=family):
                if msg["state"] & NUD_PERMANENT and msg.get_attr("NDA_LLADDR") and msg.get_attr("NDA_DST"):
                    view.neighs.add(Neigh(names.get(msg["ifindex"], str(msg["ifindex"])), _ip(msg.get_attr("NDA_DST")),
                                          msg.get_attr("NDA_LLADDR").lower()))
        for msg in ipr.get_neighbours(family=socket.AF_BRIDGE):
            if msg["state"] & NUD_PERMANENT and msg.get_attr("NDA_DST") and msg.get_attr("NDA_LLADDR"):
                view.fdbs.add(Fdb(names.get(msg["ifindex"], str(msg["ifindex"])), msg.get_attr("NDA_LLADDR").lower(),
                                  _ip(msg.get_attr("NDA_DST"))))
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ipr.get_routes(family=family, table=254):
                if msg["proto"] == RTPROT_KERNEL or msg["type"] not in (RTN_UNICAST, RTN_BLACKHOLE):
                    continue
                dst = msg.get_attr("RTA_DST")
                if dst is None:
                    continue
                cidr = f"{_ip(dst)}/{msg['dst_len']}"
                metric = msg.get_attr("RTA_PRIORITY") or 0
                if msg["type"] == RTN_BLACKHOLE:
                    view.routes.add(Route(cidr, blackhole=True, metric=metric))
                    continue
                gateway = msg.get_attr("RTA_GATEWAY")
                oif = msg.get_attr("RTA_OIF")
                view.routes.add(Route(cidr, _ip(gateway) if gateway else None,
                                      names.get(oif, str(oif)) if oif is not None else None,
                                      bool(msg["flags"] & RTNH_F_ONLINK), False, metric))
    wg_devices, view.wg_peers = read_wireguard()
    for name, data in wg_devices.items():
        if name in view.links:
            link = view.links[name]
            view.links[name] = replace(link, data=data)
    for version in families:
        view.bridge_nf[version] = bridge_calls_iptables(version)
        if nftables:
            view.firewall[f"nft-{version}"] = _tool(["nft", "list", "table", *NFT_TABLE[version]])
        else:
            for table in ("nat", "filter"):
                view.firewall[f"iptables-{version} {table}"] = _tool([iptables_tool(version, "save"), "-t", table])
    return view


def read_wireguard() -> tuple[dict[str, dict[str, object]], set[WgPeer]]:
    """Every WireGuard device's public key and port, and its peers, as ``wg show all dump`` tells
    (wireguard-tools reads kernel devices and wireguard-go's sockets alike; the private key column
    is dropped unread)."""
    devices: dict[str, dict[str, object]] = {}
    peers: set[WgPeer] = set()
    for line in _tool(["wg", "show", "all", "dump"]).splitlines():
        cols = line.split("\t")
        try:
            if len(cols) == 5:  # interface, private key, public key, listen port, fwmark
                devices[cols[0]] = {"public_key": cols[2], "listen_port": int(cols[3])}
            elif len(cols) == 9:  # interface, public key, psk, endpoint, allowed ips, handshake, rx, tx, keepalive
                dev, key, psk, endpoint, allowed, *_counters, keepalive = cols
                ips = () if allowed == "(none)" else sorted_cidrs(str(ipaddress.ip_network(c))
                                                                  for c in allowed.split(","))
                peers.add(WgPeer(dev, key, "" if endpoint == "(none)" else endpoint, ips,
                                 0 if keepalive == "off" else int(keepalive),
                                 None if psk == "(none)" else Key.from_base64(psk)))
        except (ValueError, WgKeyError):
            continue  # a line we cannot read is left out: its peer then shows as missing
    return devices, peers


def _wg_text(peer: WgPeer) -> str:
    text = f"{peer.public_key} endpoint {peer.endpoint or '(none)'} allowed-ips {','.join(peer.allowed_ips)}"
    text += f" keepalive {peer.keepalive}" if peer.keepalive else ""
    return text + (" with PSK" if peer.psk else "") + f" dev {peer.dev}"


def _ip(text: str) -> str:
    return ipaddress.ip_address(text).compressed


def _tool(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout if proc.returncode == 0 else ""


# -- the diagnosis (pure) ---------------------------------------------------------------------


def own_listed(listing: Listing, env: SubnetEnv | None) -> Listed | None:
    """This node's lease: the one holding subnet.env's subnet(s)."""
    if env is None:
        return None
    want = (env.lease_subnet, env.lease_subnet6)
    return next((li for li in listing.leases.values() if (li.lease.subnet, li.lease.subnet6) == want), None)


def _own_lease(inputs: Inputs) -> Lease | None:
    listed = own_listed(inputs.listing, inputs.env)
    return listed.lease if listed is not None else None


def _external(inputs: Inputs, own: Lease) -> External:
    """The underlay as the daemon saw it: the interface holding our public address."""
    kernel = inputs.kernel
    publics = {str(own.public_ip), str(own.public_ipv6)}
    index = next((i for i, addrs in kernel.addresses.items() if any(a[0] in publics for a in addrs)), None)
    underlay = kernel.link_by_index(index)
    addrs = kernel.addresses.get(underlay.index, []) if underlay else []
    ip4 = next((ipaddress.IPv4Address(a[0]) for a in addrs if ":" not in a[0] and a[2] == 0), None)
    ip6 = next((ipaddress.IPv6Address(a[0]) for a in addrs if ":" in a[0] and a[2] == 0), None)
    onlink = tuple(ipaddress.ip_network(f"{a[0]}/{a[1]}", strict=False) for a in addrs if a[2] == 0)
    public = own.public_ip if int(own.public_ip) else None
    return External(underlay.name if underlay else "?", underlay.index if underlay else 0,
                    underlay.mtu if underlay else 1500, ip4 or public, public,
                    ip6 or own.public_ipv6, own.public_ipv6, onlink)


def _own_subnets(own: Lease) -> set[str]:
    return {str(s) for s in (own.subnet, own.subnet6) if s is not None}


def _route_text(route: Route) -> str:
    if route.blackhole:
        return f"blackhole {route.dst} metric {route.metric}"
    text = f"{route.dst} via {route.gateway} dev {route.dev}" + (" onlink" if route.onlink else "")
    return text + (f" metric {route.metric}" if route.metric else "")


def _check_env(inputs: Inputs, own: Lease | None, backend: Backend | None) -> list[Finding]:
    env, config = inputs.env, inputs.config
    if env is None:
        return [Finding(PROBLEM, "subnet.env", inputs.env_problem)]
    out = []
    if config.ipv4 and tuple(env.networks) != (config.ipv4.network,):
        out.append(Finding(PROBLEM, "subnet.env", f"FLANNEL_NETWORK is {','.join(map(str, env.networks)) or 'unset'} "
                                                  f"but the config's Network is {config.ipv4.network}"))
    if config.ipv6 and tuple(env.ipv6_networks) != (config.ipv6.network,):
        out.append(Finding(PROBLEM, "subnet.env", f"FLANNEL_IPV6_NETWORK is "
                                                  f"{','.join(map(str, env.ipv6_networks)) or 'unset'} but the "
                                                  f"config's IPv6Network is {config.ipv6.network}"))
    if own is None:
        subnets = " and ".join(str(s) for s in (env.lease_subnet, env.lease_subnet6) if s)
        out.append(Finding(PROBLEM, "lease", f"no lease in etcd for this node's subnet {subnets or '(none)'} "
                                             "(expired or deleted: is flanneld running?)"))
    if backend is not None and env.mtu != backend.mtu():
        out.append(Finding(PROBLEM, "subnet.env", f"FLANNEL_MTU is {env.mtu} but the {backend.type.upper()} MTU is "
                                                  f"{backend.mtu()}"))
    if not out:
        out.append(Finding(OK, "subnet.env", f"subnet {env.subnet or env.ipv6_subnet}, MTU {env.mtu}, "
                                             f"ipmasq {'on' if env.ipmasq else 'off'}"))
    return out


def _check_lease(inputs: Inputs, own: Lease, ext: External) -> list[Finding]:
    listed = inputs.listing.leases[own.key]
    local = {a[0] for addrs in inputs.kernel.addresses.values() for a in addrs}
    out = []
    for public in (own.public_ip if int(own.public_ip) else None, own.public_ipv6):
        if public is not None and str(public) not in local:
            out.append(Finding(WARN, "lease", f"public IP {public} is not an address of this host (fine "
                                              "behind NAT with --public-ip, otherwise the lease is another node's)"))
    if listed.reserved:
        expiry = "a reservation (no TTL)"
    else:
        ttl = inputs.ttls.get(listed.kv.lease_id, -1)
        if ttl <= 0:
            out.append(Finding(PROBLEM, "lease", f"lease {own.key} has expired or its etcd lease is gone"))
            return out
        expiry = f"expires in {human_duration(ttl)}"
    out.append(Finding(OK, "lease", f"{own.key} for {own.public_ip if int(own.public_ip) else own.public_ipv6}, "
                                    f"{expiry}, underlay {ext.name}"))
    return out


def _check_devices(inputs: Inputs, own: Lease, backend: Backend) -> list[Finding]:
    out = []
    kernel = inputs.kernel
    addresses = backend.base_state(own).addresses
    for spec in backend.links():
        link = kernel.links.get(spec.name)
        if link is None:
            out.append(Finding(PROBLEM, "device", f"{spec.name} is missing"))
            continue
        wrong, summary = backend.device_problems(spec, link, own)
        if link.mtu != spec.mtu:
            wrong.append(f"MTU {link.mtu}, expected {spec.mtu}")
        if not link.up:
            wrong.append("is down")
        local = link.data.get("IFLA_VXLAN_LOCAL") or link.data.get("IFLA_VXLAN_LOCAL6")
        if local and not any(a[0] == local for addrs in kernel.addresses.values() for a in addrs):
            wrong.append(f"sends from {local}, which no interface holds now (renumbered?): peers cannot reach this "
                         "node; restart flanneld to run over the interface's new address")
        have = {f"{ip}/{plen}" for ip, plen, _ in kernel.addresses.get(link.index, [])}
        for addr in sorted(a.cidr for a in addresses if a.dev == spec.name):
            if addr not in have:
                wrong.append(f"lacks address {addr}")
        if wrong:
            out += [Finding(PROBLEM, "device", f"{spec.name} {w}") for w in wrong]
        else:
            out.append(Finding(OK, "device", f"{spec.name}: {summary}"))
    return out


def _check_tables(inputs: Inputs, own: Lease, backend: Backend) -> tuple[list[Finding], int]:
    """The table findings, and how many peers cannot be (fully) programmed."""
    kernel = inputs.kernel
    waiting = unprogrammed(((key, li.lease, li.kv.create_revision) for key, li in inputs.listing.leases.items()),
                           inputs.config, own)
    peers = [li.lease for key, li in inputs.listing.leases.items() if key != own.key and key not in waiting]
    plan = backend.plan(own, peers)
    desired = plan.desired
    devices = set(desired.devices)
    nets = [ipaddress.ip_network(n) for n in desired.owned_networks]
    own_subnets = _own_subnets(own)
    out = [Finding(WARN, "peers", f"peer {key} not programmed: {why}")
           for key, why in (*waiting.items(), *plan.skipped)]

    actual_neighs = {n for n in kernel.neighs if n.dev in devices}
    actual_wg = {p for p in kernel.wg_peers if p.dev in devices}
    actual_fdbs = {f for f in kernel.fdbs if f.dev in devices}
    actual_routes = {r for r in kernel.routes
                     if any(ipaddress.ip_network(r.dst).subnet_of(n)  # type: ignore[arg-type]
                            for n in nets if n.version == ipaddress.ip_network(r.dst).version)
                     and not (r.dst in own_subnets and not r.blackhole and r.dev not in devices)}
    counts = {}
    for area, want, have, show in (
        ("neighbour", desired.neighs, actual_neighs, lambda n: f"{n.ip} lladdr {n.mac} dev {n.dev}"),
        ("fdb", desired.fdbs, actual_fdbs, lambda f: f"{f.mac} dst {f.dst} dev {f.dev}"),
        ("route", desired.routes, actual_routes, _route_text),
        ("wireguard peer", desired.wg_peers, actual_wg, _wg_text),
    ):
        have_keys = {h.key: h for h in have}  # type: ignore[attr-defined]
        want_keys = {w.key: w for w in want}  # type: ignore[attr-defined]
        for key, entry in sorted(want_keys.items(), key=lambda kv: str(kv[0])):
            found = have_keys.get(key)
            if found is None:
                out.append(Finding(PROBLEM, area, f"missing {area} {show(entry)}"))
            elif isinstance(found, WgPeer) and endpoint_learnt(found, entry):  # type: ignore[arg-type]
                out.append(Finding(OK, area, f"wireguard peer {found.public_key} reached at {found.endpoint}, learnt "
                                             f"from its handshakes (its lease: {entry.endpoint})"))  # type: ignore[attr-defined]
            elif found != entry:
                out.append(Finding(PROBLEM, area, f"wrong {area} {show(found)}, expected {show(entry)}"))
        for key, entry in sorted(have_keys.items(), key=lambda kv: str(kv[0])):
            if key not in want_keys:
                out.append(Finding(PROBLEM, area, f"stale {area} {show(entry)} (no lease wants it)"))
        counts[area] = len(want_keys)
    programmed = len(peers) - len({k for k, _ in plan.skipped})
    skipped = len(waiting) + len(peers) - programmed
    if not any(f.level == PROBLEM and f.area in counts for f in out):
        wireguard = f", {counts['wireguard peer']} WireGuard peers" if counts["wireguard peer"] else ""
        out.append(Finding(OK, "peers", f"{programmed} peer(s): {counts['neighbour']} neighbours, {counts['fdb']} "
                                        f"FDB entries, {counts['route']} routes{wireguard} as the leases say"))
    return out, skipped


def _normalize_rule(text: str) -> str:
    return " ".join(text.replace(" --random-fully", "").replace(" fully-random", "").split())


def _check_firewall(inputs: Inputs, own: Lease) -> list[Finding]:
    env, config = inputs.env, inputs.config
    spec = FirewallSpec.for_lease(config, own, bool(env and env.ipmasq), inputs.forward_rules)
    out = []
    for fam in spec.families:
        version = fam.network.version
        if spec.nftables:
            script = nft_script(spec, fam)
            listing = {_normalize_rule(line) for line in inputs.kernel.firewall.get(f"nft-{version}", "").splitlines()}
            wanted = [_normalize_rule(line) for line in (script or "").splitlines()[1:-1]
                      if line.strip() not in ("}", "") and "type " not in line and "chain " not in line]
            missing = [rule for rule in wanted if rule not in listing]
            out += [Finding(PROBLEM, "firewall", f"nftables IPv{version}: missing rule '{rule}'") for rule in missing]
            continue
        for chain in iptables_rules(spec, fam):
            saved = inputs.kernel.firewall.get(f"iptables-{version} {chain.table}", "")
            lines = {_normalize_rule(line) for line in saved.splitlines()}
            if not chain.rules:
                continue
            for rule in (chain.jump, *chain.rules):
                if _normalize_rule(rule) not in lines:
                    out.append(Finding(PROBLEM, "firewall", f"iptables IPv{version} {chain.table}: missing rule "
                                                            f"'{rule}'"))
    if not out:
        mode = "nftables" if spec.nftables else "iptables"
        parts = [p for p, on in (("masquerade", spec.masq), ("forward", spec.forward)) if on]
        out.append(Finding(OK, "firewall", f"{mode}: {' and '.join(parts) or 'no'} rules in place"))
    return out


def _check_pod_bridges(inputs: Inputs, own: Lease) -> list[Finding]:
    """A bridge holding an address of the flannel network outside our subnet: the gateway of pods
    started before our subnet moved (the bridge plugin never removes it). They are cut off, and the
    bridge plugin fails every new pod ("already has an IP address different from ...")."""
    out = []
    for link in inputs.kernel.links.values():
        if link.kind != "bridge":
            continue
        for ip, plen, scope in inputs.kernel.addresses.get(link.index, []):
            address = ipaddress.ip_interface(f"{ip}/{plen}")
            family = next((fc for fc in inputs.config.families() if fc.network.version == address.version), None)
            ours = family.family.subnet(own) if family is not None else None
            if scope == 0 and family is not None and address.ip in family.network and (
                    ours is None or address.ip not in ours):
                out.append(Finding(PROBLEM, "pods", f"bridge {link.name} holds {address}, not in our subnet "
                                   f"{ours}: pods started before our subnet moved cannot reach the overlay, and the "
                                   f"bridge plugin refuses new pods until it is gone; delete those pods, then "
                                   f"ip addr del {address} dev {link.name}"))
    return out


def _backend(inputs: Inputs, own: Lease, ext: External) -> Backend:
    """The backend as the daemon runs it (ConfigError when the config cannot run here)."""
    # A blackhole route for our own subnet means flanneld runs with --ip-blackhole-route: expect it.
    own_subnets = _own_subnets(own)
    blackhole = any(r.blackhole and r.dst in own_subnets for r in inputs.kernel.routes)
    backend = create_backend(inputs.config, ext, NodeSettings(blackhole_route=blackhole,
                                                                            create_identity=False))
    backend.adopt(own)
    return backend


def examine(inputs: Inputs) -> tuple[list[Finding], dict[str, int]]:
    """Every finding (problems first within each area), and the peer counts /metrics reports as
    flanneld_peers and flanneld_skipped_leases, so the two can be compared ({} without our lease)."""
    own = _own_lease(inputs)
    if own is None:
        return _check_env(inputs, None, None), {}
    ext = _external(inputs, own)
    try:
        backend = _backend(inputs, own, ext)
    except ConfigError as exc:
        return [*_check_env(inputs, own, None), Finding(PROBLEM, "config", str(exc))], {}
    findings = _check_env(inputs, own, backend)
    findings += _check_lease(inputs, own, ext)
    findings += _check_devices(inputs, own, backend)
    tables, skipped = _check_tables(inputs, own, backend)
    findings += tables
    findings += _check_firewall(inputs, own)
    findings += _check_pod_bridges(inputs, own)
    findings += [Finding(WARN, "firewall", text) for version, state in sorted(inputs.kernel.bridge_nf.items())
                 if (text := problem(version, state))]
    return findings, {"leases": len(inputs.listing.leases) - 1, "skipped": skipped}


def diagnose(inputs: Inputs) -> list[Finding]:
    """Every finding, problems first within each area."""
    return examine(inputs)[0]


def healthy(findings: Sequence[Finding]) -> bool:
    return not any(f.level == PROBLEM for f in findings)
