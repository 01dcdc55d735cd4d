"""The VXLAN planner: per-peer entries in upstream form, DirectRouting, dual-stack, skips."""

import ipaddress
import json

import pytest

from flanneld.backends.vxlan import VxlanBackend, VxlanOptions
from flanneld.model.config import ConfigError, parse_config
from flanneld.model.lease import LeaseAttrs, backend_json
from flanneld.plan.backend import External, validate_backend
from flanneld.plan.state import Address, Fdb, Neigh, ObservedLink, Route
from tests.unit.underlay import EXT

A = ipaddress.ip_address
N = ipaddress.ip_network


def backend(extra=None, options=None, blackhole=False):
    cfg = parse_config(json.dumps({"Network": "198.18.0.0/16", **(extra or {})}))
    return VxlanBackend(cfg, EXT, VxlanOptions.parse(cfg.backend) if options is None else options, blackhole)


def peer(n, mac="0e:00:00:00:00:01", public="198.51.100.12", v6=False, btype="vxlan", subnet=None):
    data = backend_json({"VNI": 1, "VtepMAC": mac})
    attrs = LeaseAttrs(A(public), A(f"2001:db8:51::{n:x}") if v6 else None, btype, data, data if v6 else None)
    return attrs.lease(N(subnet or f"198.18.{n}.0/24"), N(f"2001:db8:1800:{n:x}::/64") if v6 else None)


def test_upstream_entries_per_peer():
    be = backend()
    own = peer(1, mac="0e:aa:00:00:00:01", public="198.51.100.11")
    be.adopt(own)  # devices are (re)created with the MAC our lease publishes
    plan = be.plan(own, [own, peer(2)])
    d = plan.desired
    assert d.links[0].name == "flannel.1" and d.links[0].mtu == 1450 and d.links[0].mac == "0e:aa:00:00:00:01"
    assert d.addresses == {Address("flannel.1", "198.18.1.0/32")}
    assert d.neighs == {Neigh("flannel.1", "198.18.2.0", "0e:00:00:00:00:01")}
    assert d.fdbs == {Fdb("flannel.1", "0e:00:00:00:00:01", "198.51.100.12")}
    assert d.routes == {Route("198.18.2.0/24", "198.18.2.0", "flannel.1", onlink=True)}
    assert d.owned_networks == ("198.18.0.0/16",)
    assert plan.skipped == ()


def test_peer_backend_data_in_another_case_is_programmed():
    """Upstream (Go's JSON decoding) reads "VtepMac" as VtepMAC; skipping such a peer would split the overlay."""
    be = backend()
    odd = LeaseAttrs(A("198.51.100.12"), None, "vxlan", '{"vni":1,"VtepMac":"0E:00:00:00:00:02"}').lease(
        N("198.18.2.0/24"), None)
    plan = be.plan(peer(1, public="198.51.100.11"), [odd])
    assert plan.skipped == ()
    assert plan.desired.fdbs == {Fdb("flannel.1", "0e:00:00:00:00:02", "198.51.100.12")}


def test_lease_attrs_publish_vtep_mac_and_mtu():
    be = backend()
    attrs = be.lease_attrs({"flannel.1": ObservedLink("flannel.1", 5, "vxlan", 1450, "0e:aa:00:00:00:01", True)})
    assert attrs.backend_type == "vxlan" and attrs.backend_data == '{"VNI":1,"VtepMAC":"0e:aa:00:00:00:01"}'
    assert str(attrs.public_ip) == "198.51.100.11" and attrs.public_ipv6 is None
    assert be.mtu() == 1450
    assert backend(options=VxlanOptions(mtu=9000)).mtu() == 8950


def test_direct_routing_for_peers_on_our_l2_only():
    be = backend(options=VxlanOptions(direct_routing=True))
    own = peer(1, public="198.51.100.11")
    d = be.plan(own, [peer(2), peer(3, mac="0e:00:00:00:00:03", public="203.0.113.9")]).desired
    assert Route("198.18.2.0/24", "198.51.100.12", "eth0") in d.routes
    assert Route("198.18.3.0/24", "198.18.3.0", "flannel.1", onlink=True) in d.routes
    assert {f.dst for f in d.fdbs} == {"203.0.113.9"}


def test_dual_stack_uses_two_devices_and_ipv6_overhead():
    be = backend({"EnableIPv6": True, "IPv6Network": "2001:db8:1800::/56"})
    own = peer(1, public="198.51.100.11", v6=True)
    d = be.plan(own, [peer(2, v6=True)]).desired
    assert [(link.name, link.mtu, link.local) for link in d.links] == [
        ("flannel.1", 1450, "198.51.100.11"), ("flannel-v6.1", 1430, "2001:db8:51::11")]
    assert be.mtu() == 1430
    assert Route("2001:db8:1800:2::/64", "2001:db8:1800:2::", "flannel-v6.1", onlink=True, metric=1024) in d.routes
    assert Fdb("flannel-v6.1", "0e:00:00:00:00:01", "2001:db8:51::2") in d.fdbs
    assert Address("flannel-v6.1", "2001:db8:1800:1::/128") in d.addresses


def test_blackhole_route_has_a_low_priority():
    d = backend(blackhole=True).plan(peer(1, public="198.51.100.11"), []).desired
    assert Route("198.18.1.0/24", blackhole=True, metric=4000) in d.routes


@pytest.mark.parametrize(("lease", "reason"), [
    (peer(2, btype="host-gw"), "backend type 'host-gw' is not vxlan"),
    (peer(2, mac="not-a-mac"), "no valid IPv4 VtepMAC"),
    (peer(2, mac="01:00:5e:00:00:01"), "VtepMAC 01:00:5e:00:00:01 is not a unicast MAC"),
    (peer(2, mac="ff:ff:ff:ff:ff:ff"), "VtepMAC ff:ff:ff:ff:ff:ff is not a unicast MAC"),
    (peer(2, mac="00:00:00:00:00:00"), "VtepMAC 00:00:00:00:00:00 is not a unicast MAC"),
    (peer(2, public="198.51.100.11"), "our own public address"),
    (peer(2, subnet="10.9.0.0/24"), "outside the network"),
    (peer(2, public="0.0.0.0"), "no IPv4 public address"),
])
def test_unusable_peers_are_skipped_with_a_reason(lease, reason):
    plan = backend().plan(peer(1, public="198.51.100.11"), [lease, peer(3, mac="0e:00:00:00:00:03")])
    assert [k for k, _ in plan.skipped] == [lease.key] and reason in plan.skipped[0][1]
    assert len(plan.desired.routes) == 1  # the good peer is still programmed


def test_backend_option_validation():
    validate_backend(parse_config('{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan","VNI":4096,"Port":4789}}').backend)
    for bad, msg in [({"VNI": -1}, "VNI must be an integer"), ({"Port": 70000}, "Port must be"),
                     ({"GBP": "yes"}, "GBP must be true or false"), ({"MTU": 500}, "too small"),
                     ({"Type": "udp"}, "backend type 'udp' is not supported")]:
        cfg = parse_config(json.dumps({"Network": "10.0.0.0/8", "Backend": {"Type": "vxlan", **bad}}))
        with pytest.raises(ConfigError, match=msg):
            validate_backend(cfg.backend)


def test_missing_interface_address_is_a_config_error():
    cfg = parse_config('{"EnableIPv6": true, "Network": "198.18.0.0/16", "IPv6Network": "2001:db8:1800::/56"}')
    no_v6 = External("eth0", 2, 1500, A("198.51.100.11"), A("198.51.100.11"))
    with pytest.raises(ConfigError, match="has no global IPv6 address"):
        VxlanBackend(cfg, no_v6, VxlanOptions())
