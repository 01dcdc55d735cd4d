"""Lease key/value codecs against byte strings written by upstream Flannel."""

import collections
import ipaddress
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flanneld.model import lease as lease_module
from flanneld.model.gofields import GoObject
from flanneld.model.lease import (
    Lease,
    LeaseAttrs,
    LeaseDecodeError,
    backend_json,
    decode_lease,
    encode_value,
    parse_subnet_key,
    subnet_key,
)

# (key, value) exactly as upstream v0.2x nodes write them
UPSTREAM = [
    ("10.5.52.0-24",
     b'{"PublicIP":"198.51.100.1","PublicIPv6":null,"BackendType":"vxlan",'
     b'"BackendData":{"VNI":1,"VtepMAC":"96:c1:44:57:f9:c6"}}'),
    ("10.5.53.0-24&fd00:12:13::-64",
     b'{"PublicIP":"198.51.100.2","PublicIPv6":"2001:db8:51::2","BackendType":"vxlan",'
     b'"BackendData":{"VNI":1,"VtepMAC":"ae:7b:5e:31:0c:11"},"BackendV6Data":{"VNI":1,"VtepMAC":"c2:f0:1a:9d:3e:77"}}'),
    ("0.0.0.0-0&fd00:12:14::-64",
     b'{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8:51::3","BackendType":"vxlan",'
     b'"BackendV6Data":{"VNI":1,"VtepMAC":"0a:58:0a:f4:00:01"}}'),
    ("10.5.54.0-24", b'{"PublicIP":"198.51.100.4","PublicIPv6":null,"BackendType":"host-gw"}'),
    ("10.5.55.0-24", b'{"PublicIP":"198.51.100.5","PublicIPv6":null}'),
    # written by a newer version: fields we do not know must survive a rewrite
    ("10.5.56.0-24",
     b'{"PublicIP":"198.51.100.6","PublicIPv6":null,"BackendType":"vxlan",'
     b'"BackendData":{"VNI":1,"VtepMAC":"96:c1:44:57:f9:c7","Future":{"x":[1,2.50,"a\\u003cb"]}},'
     b'"NodeLabels":{"zone":"eu-1"},"Weight":1e3}'),
]


@pytest.mark.parametrize(("key", "value"), UPSTREAM)
def test_upstream_values_round_trip_byte_for_byte(key, value):
    lease = decode_lease(key, value)
    assert lease.key == key
    assert encode_value(lease) == value
    # what a node republishes keeps every unknown field
    again = LeaseAttrs.of(lease).lease(lease.subnet, lease.subnet6, lease.extra)
    assert encode_value(again) == value


def test_decoded_fields():
    lease = decode_lease(*UPSTREAM[1])
    assert lease.subnet == ipaddress.ip_network("10.5.53.0/24")
    assert lease.subnet6 == ipaddress.ip_network("fd00:12:13::/64")
    assert str(lease.public_ip) == "198.51.100.2"
    assert str(lease.public_ipv6) == "2001:db8:51::2"
    assert lease.backend == {"VNI": 1, "VtepMAC": "ae:7b:5e:31:0c:11"}
    assert lease.backend_v6["VtepMAC"] == "c2:f0:1a:9d:3e:77"
    v6only = decode_lease(*UPSTREAM[2])
    assert v6only.subnet is None and v6only.subnet6 == ipaddress.ip_network("fd00:12:14::/64")
    assert decode_lease(*UPSTREAM[5]).extra == (("NodeLabels", '{"zone":"eu-1"}'), ("Weight", "1e3"))


def test_encoding_our_own_lease():
    attrs = LeaseAttrs(ipaddress.IPv4Address("198.51.100.9"), None, "vxlan",
                       backend_json({"VNI": 1, "VtepMAC": "96:c1:44:57:f9:c6"}))
    lease = attrs.lease(ipaddress.ip_network("10.5.52.0/24"), None)
    assert lease.key == "10.5.52.0-24"
    assert encode_value(lease) == (b'{"PublicIP":"198.51.100.9","PublicIPv6":null,"BackendType":"vxlan",'
                                   b'"BackendData":{"VNI":1,"VtepMAC":"96:c1:44:57:f9:c6"}}')


def test_older_and_differently_cased_values_decode():
    old = decode_lease("10.5.60.0-24",
                       b'{"PublicIP":"10.0.0.4","BackendType":"vxlan","BackendData":{"VtepMAC":"aa:bb:cc:dd:ee:ff"}}')
    assert old.public_ipv6 is None and old.backend["VtepMAC"] == "aa:bb:cc:dd:ee:ff"
    cased = decode_lease("10.5.61.0-24", b'{ "publicip" : "10.0.0.5" , "backendtype":"vxlan" }\n')
    assert str(cased.public_ip) == "10.0.0.5" and cased.backend_type == "vxlan"
    assert encode_value(cased) == b'{"PublicIP":"10.0.0.5","PublicIPv6":null,"BackendType":"vxlan"}'


def test_backend_data_fields_match_in_any_case_as_go_does():
    lease = decode_lease("10.5.62.0-24", b'{"PublicIP":"10.0.0.6","BackendType":"vxlan","BackendData":'
                                         b'{"vni":7,"VtepMac":"aa:bb:cc:dd:ee:01","Nested":{"deep":1}},'
                                         b'"backendv6data":{"VTEPMAC":"aa:bb:cc:dd:ee:02"}}')
    assert lease.backend.get("VNI") == 7 and lease.backend.get("VtepMAC") == "aa:bb:cc:dd:ee:01"
    assert lease.backend_v6.get("VtepMAC") == "aa:bb:cc:dd:ee:02"
    assert lease.backend.get("Nested").get("Deep") == 1  # every level
    exact = decode_lease("10.5.63.0-24",
                         b'{"BackendData":{"vtepmac":"aa:aa:aa:aa:aa:aa","VtepMAC":"bb:bb:bb:bb:bb:bb"}}')
    assert exact.backend.get("VtepMAC") == "bb:bb:bb:bb:bb:bb"
    later = decode_lease("10.5.64.0-24",
                         b'{"BackendData":{"VtepMAC":"bb:bb:bb:bb:bb:bb","vtepmac":"aa:aa:aa:aa:aa:aa"}}')
    assert later.backend.get("VtepMAC") == "aa:aa:aa:aa:aa:aa"  # as Go: the last key naming the field wins


@pytest.mark.parametrize(
    ("subnet", "subnet6", "key"),
    [("10.5.52.0/24", None, "10.5.52.0-24"),
     ("10.5.52.0/24", "fd00:12:13::/64", "10.5.52.0-24&fd00:12:13::-64"),
     (None, "2001:db8:1800:5::/64", "0.0.0.0-0&2001:db8:1800:5::-64")],
)
def test_key_codec(subnet, subnet6, key):
    net = ipaddress.ip_network(subnet) if subnet else None
    net6 = ipaddress.ip_network(subnet6) if subnet6 else None
    assert subnet_key(net, net6) == key
    assert parse_subnet_key(key) == (net, net6)


@pytest.mark.parametrize("key", ["config", "10.5.52.1-24", "10.5.52.0-33", "300.5.52.0-24", "10.5.52.0",
                                 "10.5.52.0-24&", "10.5.52.0-24&FD00::-64", "10.5.52.0-24&fd00::1-64",
                                 "10.5.52.0-24&zz::-64", "x10.5.52.0-24", "10.5.52.0-24/extra"])
def test_junk_keys_rejected(key):
    with pytest.raises(LeaseDecodeError):
        parse_subnet_key(key)


@pytest.mark.parametrize("value", [b"", b"not json", b"[]", b'{"PublicIP":1}', b'{"PublicIP":"nope"}',
                                   b'{"PublicIP":"fd00::1"}', b'{"PublicIPv6":"10.0.0.1"}', b'{"BackendType":3}',
                                   b'{"PublicIP":"10.0.0.1"} trailing', b"\xff", b'{"a":1,}', b'{"a" 1}'])
def test_bad_values_rejected(value):
    with pytest.raises(LeaseDecodeError):
        decode_lease("10.5.52.0-24", value)


ips = st.integers(1, 2**32 - 1).map(ipaddress.IPv4Address)
macs = st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))


@settings(max_examples=200, deadline=None)
@given(ips, st.one_of(st.none(), st.integers(1, 2**128 - 1).map(ipaddress.IPv6Address)), macs,
       st.integers(0, 255), st.text(max_size=10))
def test_generated_leases_round_trip(public_ip, public_ipv6, mac, third_octet, btype):
    lease = LeaseAttrs(public_ip, public_ipv6, btype, backend_json({"VNI": 1, "VtepMAC": mac})).lease(
        ipaddress.ip_network(f"10.5.{third_octet}.0/24"), None)
    decoded = decode_lease(lease.key, encode_value(lease))
    assert decoded == lease
    assert isinstance(decoded, Lease)


@st.composite
def mutated_value(draw) -> bytes:
    """A lease's value as written, then changed in up to two places: some changes keep it valid
    (another digit, a name's case, whitespace), others break it (a byte gone, a byte added)."""
    lease = LeaseAttrs(draw(ips), draw(st.none() | st.integers(1, 2**128 - 1).map(ipaddress.IPv6Address)),
                       draw(st.sampled_from(["vxlan", "host-gw", "wireguard", ""])),
                       backend_json({"VNI": 1, "VtepMAC": draw(macs)}),
                       ).lease(ipaddress.ip_network("10.5.52.0/24"), None)
    value = bytearray(encode_value(lease))
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, len(value) - 1))
        how = draw(st.sampled_from(["digit", "case", "space", "delete", "insert"]))
        if how == "digit" and chr(value[i]).isdigit():
            value[i] = ord(draw(st.sampled_from("0123456789")))
        elif how == "case" and chr(value[i]).isalpha():
            value[i] = ord(chr(value[i]).swapcase())
        elif how == "space" and value[i] in b",:{":
            value.insert(i + 1, ord(draw(st.sampled_from(" \t\n"))))
        elif how == "delete":
            del value[i]
        elif how == "insert":
            value.insert(i, draw(st.integers(0, 255)))
    return bytes(value)


def test_mutated_values_decode_to_a_lease_that_round_trips_or_raise_decode_error() -> None:
    outcomes: collections.Counter[str] = collections.Counter()

    @settings(max_examples=400, deadline=None, database=None)
    @given(mutated_value() | st.binary(max_size=60))
    def round_trip(value: bytes) -> None:
        try:
            lease = decode_lease("10.5.52.0-24", value)
        except LeaseDecodeError:
            outcomes["refused"] += 1
            return
        # whatever decodes re-encodes to a value that decodes to the same lease
        assert decode_lease("10.5.52.0-24", encode_value(lease)) == lease
        outcomes["decoded"] += 1

    round_trip()
    assert outcomes["decoded"] > 0.5 * sum(outcomes.values()) and outcomes["refused"] > 40, outcomes


# -- the fast path for values as Go writes them must decode exactly as the general one ------------

def _general(key, value):
    subnet, subnet6 = parse_subnet_key(key)
    return lease_module._decode_general(key, subnet, subnet6, value.decode("utf-8"))


@pytest.mark.parametrize(("key", "value"), UPSTREAM[:5])
def test_values_as_go_writes_them_take_the_fast_path(monkeypatch, key, value):
    expected = _general(key, value)

    def refuse(*_args):
        raise AssertionError("took the general path")

    monkeypatch.setattr(lease_module, "_decode_general", refuse)
    assert decode_lease(key, value) == expected


scalars = st.one_of(st.text(max_size=6), st.integers(-3, 3), st.booleans(), st.none(), st.floats(0, 2))
flat = st.dictionaries(st.text(max_size=6), scalars, max_size=3).map(lambda d: json.dumps(d, separators=(",", ":")))
nested = st.dictionaries(st.text(max_size=3), st.dictionaries(st.text(max_size=3), scalars, max_size=2),
                         max_size=2).map(json.dumps)
plain_flat = st.just('{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}')
quoted = st.sampled_from(['"0.0.0.0"', '"01.2.3.4"', '"1.2.3"', '"2001:db8:51::3"', '"300.1.1.1"', "null", '"a"', "7"])


def mostly(usual, *others):
    """`usual` in about half the examples: values as Go writes them must be common, so each
    perturbation of them (one field at a time) is tried against a value that is otherwise canonical."""
    return st.one_of(usual, st.one_of(*others))


fields = st.tuples(
    mostly(st.just('"198.51.100.7"'), quoted),  # PublicIP
    mostly(st.sampled_from(["null", '"2001:db8:51::3"']), st.none(), quoted),  # PublicIPv6
    mostly(st.just('"vxlan"'), st.none(), st.sampled_from(['""', '"a b"', '"x<y"', "null", "1"])),  # BackendType
    mostly(plain_flat, st.none(), st.just("null"), flat, nested, st.just("[1]")),  # BackendData
    mostly(st.none(), st.just("null"), plain_flat, flat, nested),  # BackendV6Data
    mostly(st.just(False), st.just(True)),  # members in reverse order
    mostly(st.just(""), st.sampled_from([" ", ',"Extra":1', ',"publicip":"198.51.100.9"',
                                         ',"PublicIP":"198.51.100.9"'])),
)


def seldom(usual, rare, one_in: int = 8):
    """`rare` in about one example of `one_in` (st.one_of would draw each branch about as often)."""
    return st.integers(1, one_in).flatmap(lambda n: rare if n == 1 else usual)


octet = st.integers(0, 255).map(str)
plain_text = st.text(alphabet="abcXYZ019._-/:+=", max_size=8)  # characters Go writes as they are
plain_scalar = st.one_of(plain_text.map(json.dumps), st.integers(-10**6, 10**6).map(str), st.sampled_from(
    ["true", "false", "null"]))
plain_object = st.dictionaries(plain_text, plain_scalar, max_size=3).map(
    lambda d: "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in d.items()) + "}")
go_written = st.builds(
    lambda v4, v6, btype, data, data6: "".join([
        f'{{"PublicIP":"{v4}"', "" if v6 is None else f',"PublicIPv6":{v6}',
        "" if btype is None else f',"BackendType":"{btype}"', "" if data is None else f',"BackendData":{data}',
        "" if data6 is None else f',"BackendV6Data":{data6}', "}"]),
    seldom(st.tuples(octet, octet, octet, octet).map(".".join), st.sampled_from(["01.2.3.4", "1.2.3", "300.1.1.1"])),
    st.none() | st.just("null") | seldom(st.integers(1, 2**128 - 1).map(lambda n: f'"{ipaddress.IPv6Address(n)}"'),
                                         st.sampled_from(['"2001:DB8::1"', '"1.2.3.4"', '"::ffff:1.2.3.4"'])),
    st.none() | st.text(alphabet="abcvxlan0._-", max_size=10),
    st.none() | st.just("null") | plain_object,
    st.none() | st.just("null") | plain_object,
)


def canonical_fields(parts) -> str:
    *values, backwards, tail = parts
    names = ("PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data")
    members = [f'"{name}":{raw}' for name, raw in zip(names, values, strict=True) if raw is not None]
    if backwards:
        members.reverse()
    return "{" + ",".join(members) + tail + "}"


def test_fast_path_decodes_exactly_as_the_general_path() -> None:
    """Values in Go's own layout (most of them: the fast path's share is counted) and perturbations
    of it, each decoded both ways: the same lease, or the same error."""
    outcomes: collections.Counter[str] = collections.Counter()
    key = "10.5.52.0-24"
    subnet, subnet6 = parse_subnet_key(key)

    @settings(max_examples=600, deadline=None, database=None)
    @given(st.one_of(go_written, go_written, go_written, fields.map(canonical_fields)))
    def same(text: str) -> None:
        value = text.encode()
        match = lease_module._GO_WRITTEN.fullmatch(text)
        fast = match is not None and lease_module._go_written(key, subnet, subnet6, match) is not None
        try:
            expected = _general(key, value)
        except LeaseDecodeError as exc:
            assert not fast, text
            with pytest.raises(LeaseDecodeError) as got:
                decode_lease(key, value)
            assert str(got.value) == str(exc)
            outcomes["refused"] += 1
            return
        decoded = decode_lease(key, value)
        assert decoded == expected
        assert encode_value(decoded) == encode_value(expected)
        outcomes["fast" if fast else "general"] += 1

    same()
    assert outcomes["fast"] > 0.5 * sum(outcomes.values()) and outcomes["general"] > 30 and outcomes["refused"] > 30, \
        outcomes


@settings(max_examples=300, deadline=None)
@given(st.one_of(flat, nested, st.just("[1]"), st.just('"{x"'), st.just("7"), st.just('[{"a":1}]')))
def test_backend_data_reads_as_go_objects_at_every_level(raw):
    reference = json.loads(raw, object_hook=GoObject)
    expected = reference if isinstance(reference, GoObject) else GoObject()
    got = LeaseAttrs(backend_data=raw).lease(ipaddress.ip_network("10.5.52.0/24"), None).backend
    assert type(got) is GoObject
    assert got == expected
    assert all(type(v) is GoObject for v in got.values() if isinstance(v, dict))
