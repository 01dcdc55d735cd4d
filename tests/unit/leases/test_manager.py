"""This node's lease against an in-memory etcd: what acquisition finds as ours and what it leaves behind."""

from __future__ import annotations

import ipaddress
import random

from flanneld.leases.manager import LeaseManager
from flanneld.model.config import parse_config
from flanneld.model.lease import LeaseAttrs, leases_prefix
from tests.unit.fakes import FakeEtcdClient

PREFIX = "/coreos.com/network"
HEAD = leases_prefix(PREFIX)


def manager(etcd: FakeEtcdClient, config: str) -> LeaseManager:
    return LeaseManager(etcd, parse_config(config), PREFIX, rng=random.Random(1))  # type: ignore[arg-type]


def test_a_lease_that_no_longer_fits_leaves_no_second_etcd_lease_behind():
    """Ours by address but of an older SubnetLen: its key goes, and so must its etcd lease (one per node)."""
    etcd = FakeEtcdClient()
    old = etcd.grant(86400)
    etcd.put(HEAD + "198.18.5.0-24", b'{"PublicIP":"198.51.100.11","PublicIPv6":null,"BackendType":"vxlan"}', old)
    own = manager(etcd, '{"Network": "198.18.0.0/16", "SubnetLen": 26}').acquire(
        LeaseAttrs(ipaddress.ip_address("198.51.100.11"), backend_type="vxlan"))
    assert own.lease.subnet.prefixlen == 26 and HEAD + "198.18.5.0-24" not in etcd.data
    assert list(etcd.etcd_leases) == [own.etcd_lease]  # the only etcd lease left is the one holding our key


def test_an_ipv6_only_node_finds_its_reservation_in_any_spelling_of_its_address():
    etcd = FakeEtcdClient()
    key = "0.0.0.0-0&2001:db8:1800:5::-64"
    etcd.put(HEAD + key, b'{"PublicIP":"0.0.0.0","PublicIPv6":"2001:DB8:51:0::0011","BackendType":"vxlan"}')
    config = '{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "2001:db8:1800::/56"}'
    own = manager(etcd, config).acquire(LeaseAttrs(public_ipv6=ipaddress.ip_address("2001:db8:51::11"),
                                                   backend_type="vxlan"))
    assert str(own.lease.subnet6) == "2001:db8:1800:5::/64" and own.reserved


def race(etcd: FakeEtcdClient, key: str, value: bytes):  # type: ignore[no-untyped-def]
    """Another node writes `key` between our listing and our first transaction."""
    def write() -> None:
        etcd.before_txn = lambda: None
        etcd.put(HEAD + key, value, etcd.grant(86400))
    return write


def test_an_acquisition_losing_the_race_for_its_subnet_takes_another():
    """The other node's dual-stack key holds our IPv4 pick behind its `<v4>&<v6>` name: only the
    range guard on `<v4>&` sees it (the fake skipped range compares, so this was never tried)."""
    etcd = FakeEtcdClient()
    config = '{"Network": "198.18.0.0/16", "SubnetMin": "198.18.5.0", "SubnetMax": "198.18.6.0"}'
    first = manager(etcd, config)
    picked = str(first.acquire(LeaseAttrs(ipaddress.ip_address("198.51.100.11"))).lease.subnet)
    etcd.revoke(first.own.etcd_lease)  # gone again: the next node's pick (same seed) is that subnet
    other = f"{picked.replace('/', '-')}&2001:db8:1800:9::-64"
    etcd.before_txn = race(etcd, other, b'{"PublicIP":"198.51.100.12","PublicIPv6":"2001:db8:51::12"}')
    own = manager(etcd, config).acquire(LeaseAttrs(ipaddress.ip_address("198.51.100.11")))
    assert str(own.lease.subnet) != picked and etcd.requests["txn"] >= 2  # lost once, then took the other
    assert HEAD + other in etcd.data


def test_an_ipv6_acquisition_losing_the_race_lists_again():
    """IPv6 subnets can sit behind any IPv4 half: the guard is 'nothing changed since the listing'."""
    etcd = FakeEtcdClient()
    config = ('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "2001:db8:1800::/56", '
              '"IPv6SubnetMin": "2001:db8:1800:5::", "IPv6SubnetMax": "2001:db8:1800:6::"}')
    attrs = LeaseAttrs(public_ipv6=ipaddress.ip_address("2001:db8:51::11"))
    first = manager(etcd, config)
    picked = first.acquire(attrs).lease.subnet6
    etcd.revoke(first.own.etcd_lease)
    etcd.before_txn = race(etcd, f"10.9.0.0-24&{picked.network_address!s}-64",
                           b'{"PublicIP":"198.51.100.12","PublicIPv6":"2001:db8:51::12"}')
    own = manager(etcd, config).acquire(attrs)
    assert own.lease.subnet6 != picked and etcd.requests["txn"] >= 2
