"""Subnet leases: the model and byte-exact codecs for etcd keys and values, pure.

Upstream nodes and ours share one etcd, so both directions must match upstream exactly:

* key   ``10.5.52.0-24`` or, dual-stack, ``10.5.52.0-24&fd00:12:13::-64`` (IPv6-only leases are
  written by upstream as ``0.0.0.0-0&<v6>-<len>``);
* value Go's ``json.Marshal`` of ``LeaseAttrs``: fields in Go order, ``"PublicIPv6":null`` when
  unset, BackendType/BackendData/BackendV6Data omitted when empty, no trailing newline.

Decoding keeps the raw (compacted) JSON of BackendData and of any top-level field this version
does not know, and encoding writes them back, so re-publishing a lease never drops what a newer
writer put there.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

from flanneld.model.gofields import GoObject

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network

SUBNETS_DIR = "subnets"
_ZERO_V4_KEY = "0.0.0.0-0"
_KEY_RE = re.compile(r"(\d{1,3}(?:\.\d{1,3}){3})-(\d{1,2})(?:&([0-9a-f:]+)-(\d{1,3}))?")
_V4_KEY_RE = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})-([0-9]{1,2})")
_KNOWN_FIELDS = ("PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data")
_KNOWN_LOWER = {name.lower(): name for name in _KNOWN_FIELDS}
_DECODER = json.JSONDecoder()
_GO_ESCAPES = re.compile(r'["\\<>&\x00-\x1f\u2028\u2029]')  # what _go_string must escape
_NEEDS_COMPACTING = re.compile("[ \t\r\n<>&\u2028\u2029]")

# A value exactly as Go's json.Marshal(LeaseAttrs) writes it (and encode_value does): the known
# fields in struct order, addresses as plain strings, BackendData/BackendV6Data flat objects of
# strings that need no escaping and integers. Such a value decodes from one match (~6 us a lease
# instead of ~13; a start decodes every lease): it has no unknown fields, no duplicates, no case
# variants, nothing to compact. Anything else, malformed values included, takes the general path.
_PLAIN = r'[^"\\\x00-\x20<>&\u2028\u2029]'  # a string character Go writes as it is
_SCALAR = rf'"{_PLAIN}*"|-?(?:0|[1-9][0-9]*)|true|false|null'
_FLAT_OBJECT = rf'\{{(?:"{_PLAIN}*":(?:{_SCALAR})(?:,"{_PLAIN}*":(?:{_SCALAR}))*)?\}}'
_GO_WRITTEN = re.compile(
    r'\{"PublicIP":"([0-9.]+)"'
    r'(?:,"PublicIPv6":(?:null|"([0-9A-Fa-f:.]+)"))?'
    r'(?:,"BackendType":"([A-Za-z0-9._-]*)")?'
    rf'(?:,"BackendData":(null|{_FLAT_OBJECT}))?'
    rf'(?:,"BackendV6Data":(null|{_FLAT_OBJECT}))?'
    r'\}')
UNSET_V4 = ipaddress.IPv4Address(0)  # Go's zero ip.IP4: "PublicIP":"0.0.0.0"


class LeaseDecodeError(ValueError):
    """An etcd key or value is not a valid lease."""


# ---------------------------------------------------------------------------------------------
# keys


def subnet_key(subnet: IPv4Network | None, subnet6: IPv6Network | None) -> str:
    """The key (below ``<prefix>/subnets/``) upstream uses for a lease."""
    v4 = f"{subnet.network_address}-{subnet.prefixlen}" if subnet is not None else _ZERO_V4_KEY
    if subnet6 is None:
        if subnet is None:
            raise ValueError("a lease needs at least one subnet")
        return v4
    return f"{v4}&{subnet6.network_address.compressed}-{subnet6.prefixlen}"


@lru_cache(maxsize=1024)
def parse_subnet_key(key: str) -> tuple[IPv4Network | None, IPv6Network | None]:
    """Parse a subnet key; raise LeaseDecodeError for anything that is not one.

    Cached (bounded, to keep the daemon small): contending acquirers re-list the same keys.
    """
    if (fast := _V4_KEY_RE.fullmatch(key)) is not None and (subnet := _v4_network(fast.groups())) is not None:
        return subnet, None  # the common key, parsed without ipaddress's text parser (5 -> 1.5 us)
    match = _KEY_RE.fullmatch(key)
    if match is None:
        raise LeaseDecodeError(f"{key!r} is not a subnet key")
    v4_ip, v4_len, v6_ip, v6_len = match.groups()
    subnet: IPv4Network | None
    if f"{v4_ip}-{v4_len}" == _ZERO_V4_KEY and v6_ip is not None:
        subnet = None
    else:
        subnet = _key_network(key, f"{v4_ip}/{v4_len}", 4)
    subnet6 = _key_network(key, f"{v6_ip}/{v6_len}", 6) if v6_ip is not None else None
    return subnet, subnet6  # type: ignore[return-value]


def _v4_network(groups: tuple[str, ...]) -> IPv4Network | None:
    """``a.b.c.d-len`` as ipaddress would read it, or None to let the general path say why not."""
    value = 0
    for octet in groups[:4]:
        if octet[0] == "0" and len(octet) > 1:
            return None  # leading zeros: ipaddress refuses them
        number = int(octet)
        if number > 255:
            return None
        value = value << 8 | number
    try:
        return IPv4Network((value, int(groups[4])))  # strict: host bits set is refused
    except ValueError:
        return None


def _key_network(key: str, text: str, version: int) -> IPv4Network | IPv6Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise LeaseDecodeError(f"{key!r} is not a subnet key: {exc}") from None
    if net.version != version:
        raise LeaseDecodeError(f"{key!r} is not a subnet key: {text} is not IPv{version}")
    return net


def leases_prefix(prefix: str) -> str:
    return f"{prefix.rstrip('/')}/{SUBNETS_DIR}/"


# ---------------------------------------------------------------------------------------------
# Go-compatible JSON pieces


def _go_string(text: str) -> str:
    """Encode a string the way Go's encoding/json does (HTML-safe, UTF-8 kept)."""
    if _GO_ESCAPES.search(text) is None:
        return f'"{text}"'  # addresses, names: nothing to escape
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or ch in "<>&" or code in (0x2028, 0x2029):
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def compact_json(raw: str) -> str:
    """Strip insignificant whitespace and HTML-escape, like Go's json.Compact for RawMessage."""
    if _NEEDS_COMPACTING.search(raw) is None:
        return raw  # what Go writes is already compact: the common case
    out: list[str] = []
    in_string = escaped = False
    for ch in raw:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            if ch in "<>&" or ch in "\u2028\u2029":
                out.append(f"\\u{ord(ch):04x}")
                continue
            out.append(ch)
        elif ch in " \t\r\n":
            continue
        else:
            if ch == '"':
                in_string = True
            out.append(ch)
    return "".join(out)


def _split_object(text: str) -> list[tuple[str, str]]:
    """Split a JSON object into (key, raw value text) pairs, in document order."""
    pairs: list[tuple[str, str]] = []
    idx = _skip_ws(text, 0)
    if idx >= len(text) or text[idx] != "{":
        raise LeaseDecodeError("lease value is not a JSON object")
    idx = _skip_ws(text, idx + 1)
    if idx < len(text) and text[idx] == "}":
        _expect_end(text, idx + 1)
        return pairs
    while True:
        if idx >= len(text) or text[idx] != '"':
            raise LeaseDecodeError(f"lease value: expected a field name at offset {idx}")
        key, idx = json.decoder.scanstring(text, idx + 1)
        idx = _skip_ws(text, idx)
        if idx >= len(text) or text[idx] != ":":
            raise LeaseDecodeError(f"lease value: expected ':' at offset {idx}")
        idx = _skip_ws(text, idx + 1)
        _, end = _DECODER.raw_decode(text, idx)
        pairs.append((key, text[idx:end]))
        idx = _skip_ws(text, end)
        if idx < len(text) and text[idx] == ",":
            idx = _skip_ws(text, idx + 1)
            continue
        if idx < len(text) and text[idx] == "}":
            _expect_end(text, idx + 1)
            return pairs
        raise LeaseDecodeError(f"lease value: expected ',' or '}}' at offset {idx}")


def _skip_ws(text: str, idx: int) -> int:
    while idx < len(text) and text[idx] in " \t\r\n":
        idx += 1
    return idx


def _expect_end(text: str, idx: int) -> None:
    if _skip_ws(text, idx) != len(text):
        raise LeaseDecodeError("lease value has trailing data after the JSON object")


# ---------------------------------------------------------------------------------------------
# the lease


@dataclass(frozen=True)
class Lease:
    """One subnet lease (or reservation) as stored in etcd.

    ``backend_data``/``backend_v6_data`` hold compact raw JSON (or None when absent); ``extra``
    holds unknown top-level fields as (name, compact raw JSON) in document order.
    """

    subnet: IPv4Network | None
    subnet6: IPv6Network | None = None
    public_ip: ipaddress.IPv4Address = UNSET_V4
    public_ipv6: ipaddress.IPv6Address | None = None
    backend_type: str = ""
    backend_data: str | None = None
    backend_v6_data: str | None = None
    extra: tuple[tuple[str, str], ...] = ()
    key: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", subnet_key(self.subnet, self.subnet6))

    @cached_property
    def backend(self) -> GoObject:
        """BackendData decoded (empty when absent or not an object)."""
        return _decode_object(self.backend_data)

    @cached_property
    def backend_v6(self) -> GoObject:
        return _decode_object(self.backend_v6_data)

    def describe(self) -> str:
        parts = [str(n) for n in (self.subnet, self.subnet6) if n is not None]
        return "+".join(parts)


@dataclass(frozen=True)
class LeaseAttrs:
    """What a node publishes about itself: everything in a lease value except unknown fields."""

    public_ip: ipaddress.IPv4Address = UNSET_V4
    public_ipv6: ipaddress.IPv6Address | None = None
    backend_type: str = ""
    backend_data: str | None = None
    backend_v6_data: str | None = None

    @classmethod
    def of(cls, lease: Lease) -> LeaseAttrs:
        return cls(lease.public_ip, lease.public_ipv6, lease.backend_type, lease.backend_data,
                   lease.backend_v6_data)

    def lease(self, subnet: IPv4Network | None, subnet6: IPv6Network | None,
              extra: tuple[tuple[str, str], ...] = ()) -> Lease:
        return Lease(subnet, subnet6, self.public_ip, self.public_ipv6, self.backend_type,
                     self.backend_data, self.backend_v6_data, extra)


_GO_OBJECTS = json.JSONDecoder(object_hook=GoObject)  # made once: json.loads(raw, object_hook=...) makes one a call


def _decode_object(raw: str | None) -> GoObject:
    """BackendData as upstream reads it: field names match in any case (``VtepMac`` is ``VtepMAC``)."""
    if raw is None:
        return GoObject()
    if raw.find("{", 1) == -1:  # no object inside (as every backend writes it): no hook to call back
        flat = json.loads(raw)
        return GoObject(flat) if isinstance(flat, dict) else GoObject()
    value = _GO_OBJECTS.decode(raw)
    return value if isinstance(value, GoObject) else GoObject()


def encode_value(lease: Lease) -> bytes:
    """Go's json.Marshal(LeaseAttrs) for this lease, plus preserved unknown fields."""
    parts = [
        f'"PublicIP":{_go_string(str(lease.public_ip))}',
        '"PublicIPv6":' + (_go_string(lease.public_ipv6.compressed) if lease.public_ipv6 else "null"),
    ]
    if lease.backend_type:
        parts.append(f'"BackendType":{_go_string(lease.backend_type)}')
    if lease.backend_data is not None:
        parts.append(f'"BackendData":{lease.backend_data}')
    if lease.backend_v6_data is not None:
        parts.append(f'"BackendV6Data":{lease.backend_v6_data}')
    parts.extend(f"{_go_string(name)}:{raw}" for name, raw in lease.extra)
    return ("{" + ",".join(parts) + "}").encode("utf-8")


def backend_json(data: dict[str, Any]) -> str:
    """Compact JSON for a BackendData object we build ourselves (keys in given order)."""
    return compact_json(json.dumps(data, separators=(",", ":"), ensure_ascii=False))


def decode_lease(key: str, value: bytes | str) -> Lease:
    """Decode an etcd key (below the subnets dir) and value into a Lease.

    Field names match case-insensitively as in Go; null means unset. Raises LeaseDecodeError.
    """
    subnet, subnet6 = parse_subnet_key(key)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise LeaseDecodeError(f"value of {key!r} is not UTF-8") from None
    match = _GO_WRITTEN.fullmatch(value)
    if match is not None and (lease := _go_written(key, subnet, subnet6, match)) is not None:
        return lease
    return _decode_general(key, subnet, subnet6, value)


def _go_written(key: str, subnet: IPv4Network | None, subnet6: IPv6Network | None,
                match: re.Match[str]) -> Lease | None:
    """The lease a _GO_WRITTEN match spells; None for an address the general path must refuse."""
    v4, v6, backend_type, data, data6 = match.groups()
    public_ip = _ip(v4)  # digits and dots: IPv4 or nothing
    if public_ip is None:
        return None
    public_ipv6 = None
    if v6 is not None:
        public_ipv6 = _ip(v6)
        if public_ipv6 is None or public_ipv6.version != 6:
            return None
    return Lease(subnet, subnet6, public_ip, public_ipv6, backend_type or "",  # type: ignore[arg-type]
                 None if data is None or data == "null" else data,
                 None if data6 is None or data6 == "null" else data6, (), key)


def _decode_general(key: str, subnet: IPv4Network | None, subnet6: IPv6Network | None, value: str) -> Lease:
    """Any JSON object, field by field as Go reads it (see decode_lease)."""
    try:
        pairs = _split_object(value)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise LeaseDecodeError(f"value of {key!r} is not valid JSON: {exc}") from None
    except LeaseDecodeError as exc:
        raise LeaseDecodeError(f"value of {key!r}: {exc}") from None

    known: dict[str, str] = {}
    extra: list[tuple[str, str]] = []
    for name, raw in pairs:
        canonical = name if name in _KNOWN_FIELDS else _KNOWN_LOWER.get(name.lower())
        if canonical is None:
            extra.append((name, compact_json(raw)))
        else:
            known[canonical] = raw

    public_ip = UNSET_V4
    if (raw := known.get("PublicIP")) is not None and raw != "null":
        public_ip = _parse_ip(key, "PublicIP", raw, 4)  # type: ignore[assignment]
    public_ipv6 = None
    if (raw := known.get("PublicIPv6")) is not None and raw != "null":
        public_ipv6 = _parse_ip(key, "PublicIPv6", raw, 6)
    backend_type = ""
    if (raw := known.get("BackendType")) is not None and raw != "null":
        backend_type = json.loads(raw)
        if not isinstance(backend_type, str):
            raise LeaseDecodeError(f"value of {key!r}: BackendType is not a string")
    return Lease(
        subnet=subnet,
        subnet6=subnet6,
        public_ip=public_ip,
        public_ipv6=public_ipv6,  # type: ignore[arg-type]
        backend_type=backend_type,
        backend_data=_raw_or_none(known.get("BackendData")),
        backend_v6_data=_raw_or_none(known.get("BackendV6Data")),
        extra=tuple(extra),
        key=key,
    )


def _raw_or_none(raw: str | None) -> str | None:
    if raw is None or raw == "null":
        return None
    return compact_json(raw)


def _parse_ip(key: str, name: str, raw: str, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    text = json.loads(raw)
    if not isinstance(text, str):
        raise LeaseDecodeError(f"value of {key!r}: {name} is not a string")
    addr = _ip(text)
    if addr is None:
        raise LeaseDecodeError(f"value of {key!r}: {name} {text!r} is not an IP address")
    if addr.version != version:
        raise LeaseDecodeError(f"value of {key!r}: {name} {text!r} is not IPv{version}")
    return addr


@lru_cache(maxsize=1024)
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
