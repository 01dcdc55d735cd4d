"""The prober's pure half: what is aimed at, what answers mean, the words, the size ladder."""

from __future__ import annotations

import ipaddress

import pytest

from flanneld.model.config import parse_config
from flanneld.model.lease import LeaseAttrs
from flanneld.plan.probes import Answers, Target, cause, classify, ladder, payload_size, subnet_of, target_for


def lease(subnet: str | None, subnet6: str | None = None, public6: str | None = None):
    attrs = LeaseAttrs(ipaddress.IPv4Address("198.51.100.12"), ipaddress.IPv6Address(public6) if public6 else None,
                       "vxlan", None)
    return attrs.lease(ipaddress.IPv4Network(subnet) if subnet else None,
                       ipaddress.IPv6Network(subnet6) if subnet6 else None)


@pytest.mark.parametrize(("backend", "probed"), [("vxlan", "198.18.5.0"), ("wireguard", "198.18.5.0"),
                                                 ("host-gw", "198.18.5.1"), ("alloc", "")])
def test_what_is_probed_per_backend(backend, probed):
    config = parse_config(f'{{"Network": "198.18.0.0/16", "Backend": {{"Type": "{backend}"}}}}')
    target = target_for(lease("198.18.5.0/24"), config)
    assert target == Target("198.18.5.0-24", "198.51.100.12", probed, 4) and subnet_of(target) == "198.18.5.0/24"


def test_ipv6_only_and_dual_stack_leases():
    v6 = parse_config('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "2001:db8:1800::/56", '
                      '"Backend": {"Type": "vxlan"}}')
    target = target_for(lease(None, "2001:db8:1800:5::/64", "2001:db8:51::12"), v6)
    assert (target.overlay, target.public, target.version, subnet_of(target)) == \
        ("2001:db8:1800:5::", "2001:db8:51::12", 6, "2001:db8:1800:5::/64")
    dual = parse_config('{"Network": "198.18.0.0/16", "EnableIPv6": true, "IPv6Network": "2001:db8:1800::/56", '
                        '"Backend": {"Type": "vxlan"}}')
    target = target_for(lease("198.18.5.0/24", "2001:db8:1800:5::/64", "2001:db8:51::12"), dual)
    assert target.version == 4 and subnet_of(target) == "198.18.5.0/24"  # dual-stack: probed over IPv4


@pytest.mark.parametrize(("answers", "ever", "kind", "state"), [
    (Answers(True, True, None), False, "vxlan", "ok"),
    (Answers(True, False, None), False, "vxlan", "mtu"),
    (Answers(False, False, True), True, "vxlan", "unreachable"),
    (Answers(False, False, False), True, "vxlan", "underlay-unreachable"),
    (Answers(False, False, None), True, "vxlan", "unprobed"),  # not known yet: a second look asks the underlay
    (Answers(False, False, True), False, "host-gw", "unprobed"),  # no pod gateway there (yet)
    (Answers(False, False, True), True, "host-gw", "unreachable"),
])
def test_classify(answers, ever, kind, state):
    assert classify(answers, ever, kind) == state


def test_the_words_name_the_port_the_operator_configured():
    config = parse_config('{"Network": "198.18.0.0/16", "Backend": {"Type": "vxlan", "Port": 4789}}')
    target = Target("198.18.5.0-24", "198.51.100.12", "198.18.5.0", 4)
    assert "VXLAN on UDP 4789 gets no answer" in cause("unreachable", target, config, 1450, None)
    assert cause("mtu", target, config, 1450, 1400).startswith("packets of 1450 bytes are lost, 1400 pass")


def test_ladder_and_sizes():
    assert ladder(64, 1450, 12)[0] > 64 and ladder(64, 1450, 12)[-1] < 1450 and len(ladder(64, 1450, 12)) == 12
    assert ladder(1400, 1404, 12) == [1401, 1402, 1403] and ladder(1400, 1401, 12) == []
    assert payload_size(1450, 4) == 1422 and payload_size(1450, 6) == 1402
