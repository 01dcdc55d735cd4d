"""Network configuration (`<prefix>/config`): parsing and validation, pure.

Semantics follow upstream Flannel so that one config document serves upstream nodes and ours:
keys match case-insensitively (like Go's encoding/json), unknown keys are ignored, a JSON
``null`` means "not set", and the SubnetLen/SubnetMin/SubnetMax defaults and error messages are
upstream's. Deliberate deviations: a missing ``Backend`` (or ``Backend.Type``) means ``vxlan``
(upstream defaults to ``udp``), and SubnetMin > SubnetMax is an error instead of a silently
empty range.

Every problem raises :class:`ConfigError` with a message naming the offending field; nothing
else escapes :func:`parse_config` (the fuzz tests hold us to that).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flanneld.model.family import Family, family_of
from flanneld.model.gofields import GoObject, lookup

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_BACKEND = "vxlan"


class ConfigError(ValueError):
    """The network config is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class FamilyConfig:
    """The allocation range of one address family: Network split into SubnetLen subnets."""

    network: IPNetwork
    subnet_len: int
    subnet_min: IPAddress
    subnet_max: IPAddress

    @property
    def version(self) -> int:
        return self.network.version

    @property
    def family(self) -> Family:
        return family_of(self.network.version)

    def subnet_size(self) -> int:
        return 1 << (self.network.max_prefixlen - self.subnet_len)

    def fits(self, subnet: IPNetwork | None) -> bool:
        """Whether a leased subnet is usable under this config (upstream isSubnetConfigCompat)."""
        if subnet is None or subnet.version != self.version:
            return False
        return (
            subnet.prefixlen == self.subnet_len
            and self.subnet_min <= subnet.network_address <= self.subnet_max
        )

    def contains(self, subnet: IPNetwork) -> bool:
        """``subnet.subnet_of(network)`` in integer arithmetic: called per peer lease, 6x cheaper."""
        net = self.network
        shift = net.max_prefixlen - net.prefixlen
        return (subnet.version == net.version and subnet.prefixlen >= net.prefixlen
                and int(subnet.network_address) >> shift == int(net.network_address) >> shift)

    def misfit(self, subnet: IPNetwork) -> str:
        """How a peer's leased subnet of this family departs from the config ('' when it fits).

        Only the size counts: SubnetMin..SubnetMax bound what *we* allocate, and leases outside it
        (an older range, an operator's reservation) are ordinary, not worth a line each.
        """
        if subnet.prefixlen != self.subnet_len:
            return f"it is a /{subnet.prefixlen} but the network config's SubnetLen is {self.subnet_len}"
        return ""

    def subnet_count(self) -> int:
        """Number of subnets in SubnetMin..SubnetMax."""
        return (int(self.subnet_max) - int(self.subnet_min)) // self.subnet_size() + 1


@dataclass(frozen=True)
class BackendConfig:
    """The ``Backend`` object: its lower-cased ``Type`` and the remaining options.

    Options keep the operator's spelling; :meth:`get` looks them up case-insensitively, the way
    Go's decoder fills the backend's config struct.
    """

    type: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        found = lookup(self.options, name)
        return default if found is None else found


@dataclass(frozen=True)
class NetworkConfig:
    """A validated network config with upstream defaults filled in."""

    ipv4: FamilyConfig | None
    ipv6: FamilyConfig | None
    enable_nftables: bool
    backend: BackendConfig

    @property
    def enable_ipv4(self) -> bool:
        return self.ipv4 is not None

    @property
    def enable_ipv6(self) -> bool:
        return self.ipv6 is not None

    def families(self) -> list[FamilyConfig]:
        """The enabled families' configs, IPv4 first: what every per-family loop runs over."""
        return [f for f in (self.ipv4, self.ipv6) if f is not None]

    def of(self, family: Family) -> FamilyConfig | None:
        """This config's half for `family` (None when the family is not enabled)."""
        return self.ipv4 if family.version == 4 else self.ipv6


def _bool(doc: Mapping[str, Any], name: str, default: bool) -> bool:
    value = lookup(doc, name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {json.dumps(value)}")
    return value


def _uint(doc: Mapping[str, Any], name: str) -> int | None:
    value = lookup(doc, name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {json.dumps(value)}")
    return value


def _network(doc: Mapping[str, Any], name: str, version: int) -> IPNetwork | None:
    value = lookup(doc, name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a CIDR string, got {json.dumps(value)}")
    try:
        # Upstream (net.ParseCIDR) masks host bits: "10.5.1.1/16" means 10.5.0.0/16.
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(f"{name} is not a valid CIDR: {value!r}") from None
    if "/" not in value:
        raise ConfigError(f"{name} is not a valid CIDR (missing prefix length): {value!r}")
    if net.version != version:
        raise ConfigError(f"{name} must be an IPv{version} network, got {value!r}")
    return net


def _address(doc: Mapping[str, Any], name: str, version: int) -> IPAddress | None:
    value = lookup(doc, name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be an IP address string, got {json.dumps(value)}")
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"{name} is not a valid IP address: {value!r}") from None
    if addr.version != version:
        raise ConfigError(f"{name} must be an IPv{version} address, got {value!r}")
    return addr


def _family(doc: Mapping[str, Any], version: int) -> FamilyConfig:
    """Validate one family exactly like upstream CheckNetworkConfig."""
    v6 = version == 6
    names = {
        "network": "IPv6Network" if v6 else "Network",
        "len": "IPv6SubnetLen" if v6 else "SubnetLen",
        "min": "IPv6SubnetMin" if v6 else "SubnetMin",
        "max": "IPv6SubnetMax" if v6 else "SubnetMax",
    }
    network = _network(doc, names["network"], version)
    if network is None:
        raise ConfigError(
            f"please define a correct {names['network']} parameter in the flannel config"
        )
    bits = network.max_prefixlen
    longest, minimum_net, default_len = (126, 124, 64) if v6 else (30, 28, 24)

    subnet_len = _uint(doc, names["len"]) or 0  # 0 means "not set", as upstream
    if subnet_len > 0:
        if subnet_len > longest:
            raise ConfigError(f"SubnetLen must be less than /{longest + 1}")
        if subnet_len < network.prefixlen + 2:
            raise ConfigError("network must be able to accommodate at least four subnets")
    elif network.prefixlen > minimum_net:
        which = "IPv6Network" if v6 else "network"
        raise ConfigError(f"{which} is too small. Minimum useful network prefix is /{minimum_net}")
    elif network.prefixlen <= default_len - 2:
        subnet_len = default_len
    else:
        subnet_len = network.prefixlen + 2

    size = 1 << (bits - subnet_len)
    cls = type(network.network_address)
    net_range = f"{names['network']}" if v6 else "Network"
    subnet_min = _address(doc, names["min"], version)
    if subnet_min is None:
        subnet_min = cls(int(network.network_address) + size)
    elif subnet_min not in network:
        raise ConfigError(f"{names['min']} is not in the range of the {net_range}")
    subnet_max = _address(doc, names["max"], version)
    if subnet_max is None:
        subnet_max = cls(int(network.broadcast_address) + 1 - size)
    elif subnet_max not in network:
        raise ConfigError(f"{names['max']} is not in the range of the {net_range}")

    mask = ((1 << bits) - 1) ^ (size - 1)
    if int(subnet_min) & mask != int(subnet_min):
        raise ConfigError(f"{names['min']} is not on a SubnetLen boundary: {subnet_min}")
    if int(subnet_max) & mask != int(subnet_max):
        raise ConfigError(f"{names['max']} is not on a SubnetLen boundary: {subnet_max}")
    if subnet_min > subnet_max:
        raise ConfigError(
            f"{names['min']} ({subnet_min}) is greater than {names['max']} ({subnet_max}):"
            " no subnet can be allocated"
        )
    return FamilyConfig(network, subnet_len, subnet_min, subnet_max)


def _backend(doc: Mapping[str, Any]) -> BackendConfig:
    raw = lookup(doc, "Backend")
    if raw is None:
        return BackendConfig(DEFAULT_BACKEND, {})
    if not isinstance(raw, dict):
        raise ConfigError(f"Backend must be a JSON object, got {json.dumps(raw)}")
    btype = lookup(raw, "Type")
    if btype is None or btype == "":
        btype = DEFAULT_BACKEND
    elif not isinstance(btype, str):
        raise ConfigError(f"Backend.Type must be a string, got {json.dumps(btype)}")
    options = {k: v for k, v in raw.items() if k.lower() != "type"}
    return BackendConfig(btype.lower(), options)


def parse_config(text: str | bytes) -> NetworkConfig:
    """Parse and validate a network config document.

    Raises ConfigError (only) with a message suitable for an operator.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"network config is not valid UTF-8: {exc.reason}") from None
    try:
        doc = json.loads(text, object_hook=GoObject)  # field names match in any case, at every level
    except (json.JSONDecodeError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ConfigError(f"network config is not valid JSON: {reason}{where}") from None
    if not isinstance(doc, dict):
        raise ConfigError("network config must be a JSON object")

    enable_v4 = _bool(doc, "EnableIPv4", True)
    enable_v6 = _bool(doc, "EnableIPv6", False)
    if not enable_v4 and not enable_v6:
        raise ConfigError("EnableIPv4 and EnableIPv6 are both false: enable at least one")
    return NetworkConfig(
        ipv4=_family(doc, 4) if enable_v4 else None,
        ipv6=_family(doc, 6) if enable_v6 else None,
        enable_nftables=_bool(doc, "EnableNFTables", False),
        backend=_backend(doc),
    )
