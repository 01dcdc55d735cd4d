"""The cluster's rules (leases.policy): reservation and config-change checks."""

from __future__ import annotations

import ipaddress

import pytest

from flanneld.leases import policy
from flanneld.model.config import parse_config
from tests.unit.listings import LISTING, V4


@pytest.mark.parametrize(("subnet", "public", "why"), [
    ("198.18.2.0/24", "198.51.100.50", "198.18.2.0/24 is taken: 198.18.2.0-24 is leased by 198.51.100.12"),
    ("198.18.5.0/24", "198.51.100.50", "198.18.5.0/24 is taken: 198.18.5.0-24 is reserved for 198.51.100.15"),
    ("198.18.6.0/25", "198.51.100.50", "198.18.6.0/25 is a /25 but the config leases /24 subnets (SubnetLen)"),
    ("198.18.250.0/24", "198.51.100.50", "outside the allocation range 198.18.1.0..198.18.200.0"),
    ("198.18.6.0/24", "198.51.100.12", "198.51.100.12 already holds 198.18.2.0-24 (a lease)"),
    ("2001:db8:1800:6::/64", "2001:db8:51::6", "the network config does not enable IPv6"),
    ("198.18.6.0/24", "198.51.100.50", ""),
])
def test_reservation_problems(subnet, public, why):
    got = policy.reservation_problem(ipaddress.ip_network(subnet), ipaddress.ip_address(public), V4, LISTING)
    assert (why in got) if why else got == ""


def test_config_changes_a_running_cluster_cannot_take():
    leases = [li.lease for li in LISTING.leases.values()]
    assert policy.config_change_problems(V4, parse_config('{"Network": "198.18.0.0/16", "SubnetLen": 26}'), leases) == [
        "IPv4 SubnetLen changes from 24 to 26: existing leases no longer fit and every node would renumber its pods"]
    moved = policy.config_change_problems(V4, parse_config('{"Network": "198.19.0.0/16"}'), leases)
    assert moved == ["3 existing lease(s) would not fit the new config: 198.18.9.0-24, 198.18.2.0-24, 198.18.5.0-24"]
    host_gw = parse_config('{"Network": "198.18.0.0/16", "Backend": {"Type": "host-gw"}}')
    assert policy.config_change_problems(V4, host_gw, leases)[0].startswith("backend type changes from 'vxlan'")
    assert policy.config_change_problems(V4, parse_config('{"Network": "198.18.0.0/16", "SubnetMax": "198.18.250.0"}'),
                                    leases) == []
    assert policy.config_change_problems(V4, host_gw, []) == []  # nothing leased yet: anything goes
