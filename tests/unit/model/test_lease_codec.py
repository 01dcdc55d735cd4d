"""Lease key/value codecs against byte strings written by upstream Flannel."""

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


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_values_only_raise_decode_error(value):
    try:
        lease = decode_lease("10.5.52.0-24", value)
    except LeaseDecodeError:
        return
    # whatever decodes re-encodes to a value that decodes to the same lease
    assert decode_lease("10.5.52.0-24", encode_value(lease)) == lease


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


@settings(max_examples=600, deadline=None)
@given(fields)
def test_fast_path_decodes_exactly_as_the_general_path(parts):
    *values, backwards, tail = parts
    names = ("PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data")
    members = [f'"{name}":{raw}' for name, raw in zip(names, values, strict=True) if raw is not None]
    if backwards:
        members.reverse()
    value = ("{" + ",".join(members) + tail + "}").encode()
    key = "10.5.52.0-24"
    try:
        expected = _general(key, value)
    except LeaseDecodeError as exc:
        with pytest.raises(LeaseDecodeError) as got:
            decode_lease(key, value)
        assert str(got.value) == str(exc)
        return
    decoded = decode_lease(key, value)
    assert decoded == expected
    assert encode_value(decoded) == encode_value(expected)


@settings(max_examples=300, deadline=None)
@given(st.one_of(flat, nested, st.just("[1]"), st.just('"{x"'), st.just("7"), st.just('[{"a":1}]')))
def test_backend_data_reads_as_go_objects_at_every_level(raw):
    reference = json.loads(raw, object_hook=GoObject)
    expected = reference if isinstance(reference, GoObject) else GoObject()
    got = LeaseAttrs(backend_data=raw).lease(ipaddress.ip_network("10.5.52.0/24"), None).backend
    assert type(got) is GoObject
    assert got == expected
    assert all(type(v) is GoObject for v in got.values() if isinstance(v, dict))
