"""What flannelctl shows and decides, pure: rows, tables, JSON/YAML, stats, safety checks.

Kept apart from the click wiring (``ctl.py``) so every rule — which subnets may be reserved,
which config changes a running cluster can take, how a lease prints — is unit-tested without
etcd.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flanneld.model.config import ConfigError, NetworkConfig
from flanneld.model.lease import Lease
from flanneld.plan.backend import lookup

if TYPE_CHECKING:  # the leases package pulls in gRPC: flannelctl --help and completion do without it
    from flanneld.leases.listing import Listed, Listing

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
UNKNOWN_TTL = -1  # etcd did not say (the lease vanished between listing and asking)


@dataclass(frozen=True)
class Row:
    """One lease as flannelctl presents it."""

    listed: Listed
    ttl: int | None  # seconds left; None for a reservation

    @property
    def lease(self) -> Lease:
        return self.listed.lease

    @property
    def reserved(self) -> bool:
        return self.listed.reserved


def sort_key(lease: Lease) -> tuple[int, int, int]:
    """By IPv4 subnet, then IPv6 subnet (IPv6-only leases after every IPv4 one)."""
    v6 = int(lease.subnet6.network_address) if lease.subnet6 else 0
    if lease.subnet is None:
        return (1, 0, v6)
    return (0, int(lease.subnet.network_address), v6)


def row(listed: Listed, ttls: dict[int, int]) -> Row:
    """A lease with its TTL from `ttls` (None for a reservation, UNKNOWN_TTL when etcd did not say)."""
    return Row(listed, None if listed.reserved else ttls.get(listed.kv.lease_id, UNKNOWN_TTL))


def rows(listing: Listing, ttls: dict[int, int], public_ip: str = "", backend: str = "",
         reserved_only: bool = False) -> list[Row]:
    """Leases as rows, filtered and sorted by subnet."""
    out = []
    for listed in listing.leases.values():
        lease = listed.lease
        if public_ip and public_ip not in (str(lease.public_ip), str(lease.public_ipv6 or "")):
            continue
        if backend and lease.backend_type.lower() != backend.lower():
            continue
        if reserved_only and not listed.reserved:
            continue
        out.append(row(listed, ttls))
    out.sort(key=lambda r: sort_key(r.lease))
    return out


def human_duration(seconds: int) -> str:
    """23h59m, 4m10s, 12s."""
    if seconds < 0:
        return "expired"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def expires_text(row: Row) -> str:
    if row.ttl is None:
        return "reserved"
    if row.ttl == UNKNOWN_TTL:
        return "expired"
    return human_duration(row.ttl)


def _identity(lease: Lease, data: dict[str, Any]) -> str:
    """What the lease's backend publishes as its node's identity (VXLAN: the VTEP MAC, WireGuard: the
    public key), per the backend itself."""
    try:
        return lookup(lease.backend_type).describe_data(data)
    except ConfigError:  # a type this build does not run has no describer: show nothing
        return ""


def _identity_label(lease: Lease) -> str:
    try:
        return lookup(lease.backend_type).identity_label or "identity"
    except ConfigError:
        return "identity"


def _vni(data: dict[str, Any]) -> str:
    vni = data.get("VNI")
    return str(vni) if isinstance(vni, int) else ""


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _public_ip(lease: Lease) -> str:
    return "" if int(lease.public_ip) == 0 else str(lease.public_ip)


# IDENTITY: what the backend publishes to be reached by (VXLAN: the VTEP MAC, WireGuard: the public key)
TABLE_COLUMNS = ("SUBNET", "IPV6 SUBNET", "PUBLIC IP", "BACKEND", "IDENTITY", "EXPIRES IN")
WIDE_COLUMNS = (*TABLE_COLUMNS, "PUBLIC IPV6", "VNI", "IPV6 IDENTITY", "ETCD LEASE", "MOD REVISION", "EXTRA")


def table_cells(row: Row, wide: bool = False) -> list[str]:
    lease = row.lease
    cells = [_text(lease.subnet) or "-", _text(lease.subnet6) or "-", _public_ip(lease) or "-",
             lease.backend_type or "-", _identity(lease, lease.backend) or _identity(lease, lease.backend_v6) or "-",
             expires_text(row)]
    if wide:
        cells += [_text(lease.public_ipv6) or "-", _vni(lease.backend) or _vni(lease.backend_v6) or "-",
                  _identity(lease, lease.backend_v6) or "-",
                  f"{row.listed.kv.lease_id:x}" if row.listed.kv.lease_id else "-",
                  str(row.listed.kv.mod_revision), ",".join(name for name, _ in lease.extra) or "-"]
    return cells


def render_table(header: Sequence[str], body: Iterable[Sequence[str]], headers: bool = True) -> list[str]:
    """Left-aligned columns separated by two spaces, no trailing blanks."""
    lines = [list(header)] if headers else []
    lines += [list(r) for r in body]
    if not lines:
        return []
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in lines]


def lease_document(lease: Lease, *, reserved: bool, ttl: int | None = None, etcd_lease: int = 0,
                   mod_revision: int | None = None) -> dict[str, Any]:
    """The machine-readable form of a lease: upstream's field names plus what etcd knows."""
    doc: dict[str, Any] = {
        "key": lease.key,
        "subnet": _text(lease.subnet) or None,
        "ipv6Subnet": _text(lease.subnet6) or None,
        "PublicIP": _public_ip(lease) or None,
        "PublicIPv6": _text(lease.public_ipv6) or None,
        "BackendType": lease.backend_type or None,
        "BackendData": json.loads(lease.backend_data) if lease.backend_data is not None else None,
        "BackendV6Data": json.loads(lease.backend_v6_data) if lease.backend_v6_data is not None else None,
        "reserved": reserved,
        "ttlSeconds": ttl,
        "etcdLease": f"{etcd_lease:x}" if etcd_lease else None,
    }
    if mod_revision is not None:
        doc["modRevision"] = mod_revision
    if lease.extra:
        doc["extra"] = {name: json.loads(raw) for name, raw in lease.extra}
    return doc


def as_document(row: Row) -> dict[str, Any]:
    return lease_document(row.lease, reserved=row.reserved, ttl=row.ttl, etcd_lease=row.listed.kv.lease_id,
                          mod_revision=row.listed.kv.mod_revision)


def show_lines(row: Row) -> list[tuple[str, str]]:
    """`subnets show`: one lease in full, as (label, value) pairs."""
    lease = row.lease
    backend = lease.backend_type or "-"
    details = [f"{name} {value}" for data in (lease.backend, lease.backend_v6) for name, value in
               (("VNI", _vni(data)), (_identity_label(lease), _identity(lease, data))) if value]
    if details:
        backend += f" ({', '.join(dict.fromkeys(details))})"
    if row.ttl is None:
        expiry = "never (a reservation: key without TTL)"
    else:
        expiry = f"{expires_text(row)} (etcd lease {row.listed.kv.lease_id:x})"
    pairs = [
        ("key", lease.key),
        ("subnet", _text(lease.subnet) or "-"),
        ("ipv6 subnet", _text(lease.subnet6) or "-"),
        ("public ip", _public_ip(lease) or "-"),
        ("public ipv6", _text(lease.public_ipv6) or "-"),
        ("backend", backend),
        ("expires in", expiry),
        ("mod revision", str(row.listed.kv.mod_revision)),
    ]
    pairs += [(f"extra {name}", raw) for name, raw in lease.extra]
    pairs.append(("value", row.listed.kv.value.decode("utf-8", "replace")))
    return pairs


# -- YAML (a small emitter for JSON-shaped data: no PyYAML dependency for one output format) --


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    return json.dumps(str(value))  # a double-quoted JSON string is a valid YAML scalar


def to_yaml(value: Any, indent: int = 0) -> str:
    """Block-style YAML for dicts, lists and scalars."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return pad + "{}\n"
        out = []
        for key, item in value.items():
            name = _yaml_scalar(key) if not str(key).replace("_", "").isalnum() else str(key)
            if isinstance(item, dict | list) and item:
                out.append(f"{pad}{name}:\n{to_yaml(item, indent + 2)}")
            else:
                out.append(f"{pad}{name}: {_yaml_inline(item)}\n")
        return "".join(out)
    if isinstance(value, list):
        if not value:
            return pad + "[]\n"
        out = []
        for item in value:
            if isinstance(item, dict | list) and item:
                body = to_yaml(item, indent + 2)
                out.append(f"{pad}- {body[indent + 2:]}")
            else:
                out.append(f"{pad}- {_yaml_inline(item)}\n")
        return "".join(out)
    return pad + _yaml_scalar(value) + "\n"


def _yaml_inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _yaml_scalar(value)


# -- finding leases ----------------------------------------------------------------------------


def parse_subnet_arg(text: str) -> IPNetwork:
    """A subnet as CIDR (10.5.52.0/24) or in etcd key form (10.5.52.0-24)."""
    candidate = text.strip()
    if "/" not in candidate and candidate.count("-") == 1:
        candidate = candidate.replace("-", "/")
    try:
        return ipaddress.ip_network(candidate, strict=True)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a subnet ({exc})") from None


def find(listing: Listing, query: str) -> list[Listed]:
    """Leases matching a subnet (CIDR or key form, IPv4 or IPv6), a full key, or a public IP."""
    query = query.strip()
    if query in listing.leases:
        return [listing.leases[query]]
    try:
        address = ipaddress.ip_address(query)
    except ValueError:
        address = None
    if address is not None:
        return [li for li in listing.leases.values()
                if address in (li.lease.public_ip, li.lease.public_ipv6)]
    subnet = parse_subnet_arg(query)
    return [li for li in listing.leases.values() if subnet in (li.lease.subnet, li.lease.subnet6)]


def describe_config(config: NetworkConfig) -> str:
    parts = [f"IPv{f.version} {f.network} in /{f.subnet_len} subnets ({f.subnet_count()} from {f.subnet_min} to "
             f"{f.subnet_max})" for f in config.families()]
    return "; ".join(parts) + f"; backend {config.backend.type}" + ("; nftables" if config.enable_nftables else "")


# -- stats -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyStats:
    version: int
    network: str
    subnet_len: int
    total: int
    leased: int
    reserved: int
    outside: int  # leases of this family that do not fit the config

    @property
    def free(self) -> int:
        return max(self.total - self.leased - self.reserved, 0)

    @property
    def used_percent(self) -> float:
        return 100.0 * (self.leased + self.reserved) / self.total if self.total else 0.0


def stats(config: NetworkConfig, rows_: Sequence[Row]) -> list[FamilyStats]:
    out = []
    for fam in config.families():
        leased = reserved = outside = 0
        for row in rows_:
            subnet = fam.family.subnet(row.lease)
            if subnet is None:
                continue
            if not fam.fits(subnet):
                outside += 1
            elif row.reserved:
                reserved += 1
            else:
                leased += 1
        out.append(FamilyStats(fam.version, str(fam.network), fam.subnet_len, fam.subnet_count(), leased, reserved,
                               outside))
    return out


def expiring(rows_: Sequence[Row], within: int) -> list[Row]:
    """Leases (not reservations) with at most `within` seconds left, soonest first."""
    soon = [r for r in rows_ if r.ttl is not None and r.ttl <= within]
    return sorted(soon, key=lambda r: r.ttl if r.ttl is not None else 0)
