"""The WireGuard backend, pure apart from loading the node's key: devices, lease attributes, per-peer plan.

As upstream (``pkg/backend/wireguard``): devices ``flannel-wg`` (IPv4) and ``flannel-wg-v6`` (IPv6)
in the default ``separate`` mode, one ``flannel-wg`` for both families in ``auto``/``ipv4``/``ipv6``
mode; MTU = MTU - 80; our lease's address /32 (/128) on the device and one route for the whole
Network via it; per peer lease a WireGuard peer: its public key, endpoint PublicIP:Port, AllowedIPs
its subnet(s), the keepalive and PSK of the config. The lease publishes
``{"PublicKey":"<base64>","Port":N}`` in BackendData/BackendV6Data; a peer lease without ``Port``
(upstream before v0.26.6) means our listen port.

Unlike upstream the devices are kept when the daemon stops (a restart cuts no traffic), and they
come from the kernel module or from wireguard-go (``--wireguard-provider``).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from flanneld.model.config import BackendConfig, ConfigError, NetworkConfig
from flanneld.model.family import IPV4, IPV6, Family
from flanneld.model.lease import Lease, LeaseAttrs, backend_json
from flanneld.model.wgkeys import Key, WgKeyError, key_file, load, load_or_create, public_of
from flanneld.plan.backend import (
    BackendBase,
    BackendType,
    External,
    NodeSettings,
    PeerPlan,
    int_option,
    own_routes,
    published_addresses,
    register,
)
from flanneld.plan.state import Address, DesiredState, ObservedLink, Route, WgPeer, WireguardLink, sorted_cidrs

log = logging.getLogger(__name__)

OVERHEAD = 80  # outer IPv6 header 40 + UDP 8 + WireGuard 32 (upstream's figure, for both families)
MODES = ("separate", "auto", "ipv4", "ipv6")
PROVIDERS = ("auto", "kernel", "userspace")
DEVICE, DEVICE_V6 = "flannel-wg", "flannel-wg-v6"
# Go's net.IP.IsPrivate: what "auto" mode treats as not reachable from outside
_PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))


@dataclass(frozen=True)
class WireguardOptions:
    """The ``Backend`` object of a wireguard config (upstream option names)."""

    listen_port: int = 51820
    listen_port_v6: int = 51821
    psk: Key | None = None  # prints as <key>
    keepalive: int = 0  # PersistentKeepaliveInterval, seconds
    mode: str = "separate"
    mtu: int = 0  # underlay MTU to plan with; 0: the external interface's

    @classmethod
    def parse(cls, backend: BackendConfig) -> WireguardOptions:
        psk_text = backend.get("PSK", "")
        psk = None
        if psk_text not in ("", None):
            if not isinstance(psk_text, str):
                raise ConfigError("Backend.PSK must be a string: 32 bytes of base64, as `wg genpsk` prints")
            try:
                psk = Key.from_base64(psk_text)
            except WgKeyError as exc:  # never echo the value: it is a secret
                raise ConfigError(f"Backend.PSK is not a WireGuard key ({exc}): 32 bytes of base64, as "
                                  "`wg genpsk` prints") from None
        mode = backend.get("Mode", "separate")
        if mode not in MODES:
            raise ConfigError(f"Backend.Mode must be one of {', '.join(MODES)}, got {mode!r}")
        opts = cls(
            listen_port=int_option(backend, "ListenPort", 51820, 1, 65535),
            listen_port_v6=int_option(backend, "ListenPortV6", 51821, 1, 65535),
            psk=psk,
            keepalive=int_option(backend, "PersistentKeepaliveInterval", 0, 0, 65535),
            mode=mode,
            mtu=int_option(backend, "MTU", 0, 0, 65535),
        )
        if opts.mtu and opts.mtu - OVERHEAD < 1280:
            raise ConfigError(f"Backend.MTU {opts.mtu} is too small for WireGuard (minimum {1280 + OVERHEAD})")
        if mode == "separate" and opts.listen_port == opts.listen_port_v6:
            raise ConfigError(f"Backend.ListenPort and ListenPortV6 are both {opts.listen_port}: in separate mode "
                              "each device needs its own port")
        return opts


def _private(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(ip.version == n.version and ip in n for n in _PRIVATE)


def endpoint(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _public_key(data: Mapping[str, Any]) -> str | None:
    value = data.get("PublicKey")
    if not isinstance(value, str):
        return None
    try:
        return Key.from_base64(value).base64
    except WgKeyError:
        return None


def _port(data: Mapping[str, Any], default: int) -> int:
    value = data.get("Port")
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536 else default


class WireguardBackend(BackendBase):
    type = "wireguard"

    def __init__(self, config: NetworkConfig, ext: External, options: WireguardOptions, private_key: Key,
                 provider: str = "auto", blackhole: bool = False) -> None:
        self.config = config
        self.ext = ext
        self.options = options
        self.private_key = private_key
        self.public_key = public_of(private_key).base64
        self.provider = provider
        self.blackhole = blackhole
        self.publics = published_addresses(config, ext)
        if not options.mtu and self.mtu() < 1280:
            raise ConfigError(f"the WireGuard device's MTU would be {self.mtu()} (interface {ext.name}'s MTU {ext.mtu} "
                              f"minus {OVERHEAD}), below IPv6's minimum 1280: set Backend.MTU to at least "
                              f"{1280 + OVERHEAD} if the path allows it, or use an interface with a larger MTU")
        self.ranges = {fc.family.version: fc for fc in config.families()}
        families = tuple(fc.family for fc in config.families())
        # each device with the families it carries: one per family in separate mode, else one for all
        if options.mode == "separate":
            carried = [(DEVICE if f.version == 4 else DEVICE_V6,
                        options.listen_port if f.version == 4 else options.listen_port_v6, (f,)) for f in families]
        else:
            carried = [(DEVICE, options.listen_port, families)]
        self.devices = tuple(WireguardLink(name, self.mtu(), port, private_key, self.public_key,
                                           tuple(f.version for f in fams), provider) for name, port, fams in carried)
        self.families = {name: fams for name, _, fams in carried}

    def _device_of(self, family: Family) -> WireguardLink:
        return next(d for d in self.devices if family.version in d.versions)

    def mtu(self) -> int:
        return (self.options.mtu or self.ext.mtu) - OVERHEAD

    def links(self) -> tuple[WireguardLink, ...]:
        return self.devices

    def lease_attrs(self, devices: Mapping[str, ObservedLink]) -> LeaseAttrs:
        data = {f.version: backend_json({"PublicKey": self.public_key, "Port": self._device_of(f).listen_port})
                for f in (IPV4, IPV6) if f in {fc.family for fc in self.config.families()}}
        return replace(self.publics, backend_type="wireguard", backend_data=data.get(4), backend_v6_data=data.get(6))

    def published_by_us(self, lease: Lease, devices: Mapping[str, ObservedLink]) -> bool:
        """Whether `lease` carries our public key: proof it is ours when our address changed (the key
        file outlives restarts, and no other node holds the private key)."""
        return lease.backend_type == "wireguard" and any(
            _public_key(data) == self.public_key for data in (lease.backend, lease.backend_v6))

    def device_problems(self, spec: WireguardLink, link: ObservedLink, own: Lease  # type: ignore[override]
                        ) -> tuple[list[str], str]:
        wrong = []
        provider = {"wireguard": "kernel", "tun": "wireguard-go"}.get(link.kind)
        if provider is None:
            wrong.append(f"is a {link.kind or 'plain'} device, not WireGuard")
        key, port = link.data.get("public_key"), link.data.get("listen_port")
        if provider and key is None:
            wrong.append("cannot be read as a WireGuard device (no wireguard-go answering on its socket, or `wg` "
                         "missing)")
        published = {_public_key(f.backend_data(own)) for f in self._device_families(spec)} - {None}
        if key is not None and published and key not in published:
            wrong.append(f"has public key {key} but our lease publishes {', '.join(sorted(published))} "
                         "(peers cannot reach us)")
        if key is not None and key != self.public_key:
            wrong.append(f"has public key {key} but the key file's is {self.public_key}")
        if port is not None and port != spec.listen_port:
            wrong.append(f"listens on port {port}, expected {spec.listen_port}")
        return wrong, f"{provider or link.kind}, port {spec.listen_port}, MTU {spec.mtu}, public key {self.public_key}"

    def _device_families(self, spec: WireguardLink) -> tuple[Family, ...]:
        return self.families[spec.name]

    def base_state(self, own: Lease) -> DesiredState:
        """Devices, our addresses, one route per Network via its device, blackhole routes."""
        addresses = set()
        routes = set(own_routes(own, self.config, self.blackhole))
        for fc in self.config.families():
            dev = self._device_of(fc.family).name
            mine = fc.family.subnet(own)
            if mine is not None:
                addresses.add(Address(dev, f"{mine.network_address}/{mine.max_prefixlen}"))
            routes.add(Route(str(fc.network), dev=dev, metric=fc.family.route_metric))
        return DesiredState(links=self.links(), addresses=frozenset(addresses), routes=frozenset(routes),
                            owned_networks=tuple(str(fc.network) for fc in self.config.families()))

    def plan_peer(self, peer: Lease) -> PeerPlan:
        out = PeerPlan.unskipped()
        if peer.backend_type != "wireguard":
            out.skip(f"backend type {peer.backend_type or 'none'!r} is not wireguard", "backend-type")
            return out
        for dev in self.devices:
            subnets = []
            for f in self.families[dev.name]:
                fc = self.ranges[f.version]
                subnet = f.subnet(peer)
                if subnet is None:
                    continue  # a single-stack peer in a dual-stack cluster: nothing for this family
                if not fc.contains(subnet):
                    out.skip(f"subnet {subnet} is outside the network {fc.network}", "outside-network")
                    continue
                subnets.append((f, subnet))
            if not subnets:
                continue
            via = self._endpoint_family(dev, peer)
            public = via.public(peer)
            if public is None:
                out.skip(f"no {via} public address", "no-public-address")
                continue
            if public == via.public(self.publics):
                out.skip(f"it has our own public address {public} (a stale lease of this node?)", "own-address")
                continue
            data = via.backend_data(peer)
            # the key: IPv6 data wins where both are given, as upstream reads it
            key = next((k for f, _ in reversed(subnets) if (k := _public_key(f.backend_data(peer)))), None)
            if key is None:
                out.skip(f"its BackendData has no valid {via} PublicKey", "backend-data")
                continue
            out.wg_peers.append(WgPeer(
                dev.name, key, endpoint(public, _port(data, dev.listen_port)),
                sorted_cidrs(str(s) for _, s in subnets),
                self.options.keepalive, self.options.psk))
        return out

    def _endpoint_family(self, dev: WireguardLink, peer: Lease) -> Family:
        """Which of the peer's public addresses we reach it by (upstream's selectMode for "auto")."""
        if len(self.families[dev.name]) == 1:
            return self.families[dev.name][0]
        if self.options.mode in ("ipv4", "ipv6"):
            return IPV4 if self.options.mode == "ipv4" else IPV6
        v4, v6 = IPV4.public(peer), IPV6.public(peer)
        if v6 is None:
            return IPV4
        if v4 is not None and not _private(v4) and self.ext.public_ip is not None:
            return IPV4
        if not _private(v6) and self.ext.public_ipv6 is not None and not _private(self.ext.public_ipv6):
            return IPV6
        return IPV4


def _build(config: NetworkConfig, ext: External, options: WireguardOptions, settings: NodeSettings
           ) -> WireguardBackend:
    path = key_file()
    try:
        private = load(path)
        created = private is None and settings.create_identity
        if created:
            private, _ = load_or_create(path)
    except WgKeyError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"cannot write WireGuard key file {path}: {exc.strerror}") from None
    if private is None:
        raise ConfigError(f"WireGuard key file {path} is missing (flanneld creates it at start)")
    backend = WireguardBackend(config, ext, options, private, settings.wireguard_provider, settings.blackhole_route)
    if created:
        log.info("generated a WireGuard key in %s (public key %s)", path, backend.public_key)
    return backend


def _describe(data: Mapping[str, Any]) -> str:
    return _public_key(data) or ""


WIREGUARD = register(BackendType("wireguard", WireguardOptions.parse, _build, _describe, "PublicKey"))
