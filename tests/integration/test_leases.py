"""Lease manager and watcher against a real etcd 3.4."""

from __future__ import annotations

import ipaddress
import json
import random
import threading
import time

import pytest

from flanneld import lab
from flanneld.etcd.client import EtcdClient
from flanneld.etcd.options import EtcdOptions
from flanneld.leases.listing import list_leases
from flanneld.leases.manager import LeaseError, LeaseManager
from flanneld.leases.watcher import LeaseWatcher
from flanneld.model.config import parse_config
from flanneld.model.lease import LeaseAttrs, backend_json, decode_lease, encode_value, leases_prefix
from flanneld.model.subnetenv import SubnetEnv

NET = {"Network": "198.18.0.0/16", "Backend": {"Type": "vxlan"}}


def config(**extra):
    return parse_config(json.dumps({**NET, **extra}))


def attrs(n: int, v6: bool = False) -> LeaseAttrs:
    return LeaseAttrs(ipaddress.IPv4Address(f"198.51.{100 + n // 250}.{n % 250 + 1}"),
                      ipaddress.IPv6Address(f"2001:db8:51::{n + 1:x}") if v6 else None, "vxlan",
                      backend_json({"VNI": 1, "VtepMAC": f"0e:00:00:00:{n // 256:02x}:{n % 256:02x}"}))


def put_lease(etcd_client, prefix, subnet, public_ip, lease_id=0, mac="0e:aa:00:00:00:01"):
    a = LeaseAttrs(ipaddress.IPv4Address(public_ip), None, "vxlan", backend_json({"VNI": 1, "VtepMAC": mac}))
    lease = a.lease(ipaddress.ip_network(subnet), None)
    etcd_client.put(leases_prefix(prefix) + lease.key, encode_value(lease), lease_id)
    return lease


def manager(etcd_client, cfg=None, **kw):
    return LeaseManager(etcd_client, cfg or config(), etcd_client.options.prefix,
                        rng=random.Random(kw.pop("seed", None)), **kw)


def acquire_concurrently(etcd, prefix: str, cfg, attrs_of, count: int) -> dict[int, object]:
    """`count` nodes, each with its own etcd client, acquiring at the same moment; their leases by node."""
    barrier = threading.Barrier(count)
    results: dict[int, object] = {}

    def node(n: int) -> None:
        reg = EtcdClient(EtcdOptions(endpoints=(etcd.endpoint,), prefix=prefix))
        try:
            mgr = LeaseManager(reg, cfg, prefix, rng=random.Random(n))
            barrier.wait()
            results[n] = mgr.acquire(attrs_of(n)).lease
        except Exception as exc:  # recorded and asserted below
            results[n] = exc
        finally:
            reg.close()

    threads = [threading.Thread(target=node, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    errors = [r for r in results.values() if isinstance(r, Exception)]
    assert not errors, errors[:3]
    return results


def test_100_concurrent_acquirers_get_distinct_subnets(etcd, etcd_client, etcd_prefix):
    cfg = config()
    results = acquire_concurrently(etcd, etcd_prefix, cfg, attrs, 100)
    subnets = [lease.subnet for lease in results.values()]  # type: ignore[attr-defined]
    assert len(subnets) == 100 and len(set(subnets)) == 100
    listing = list_leases(etcd_client, etcd_prefix)
    assert len(listing.leases) == 100
    assert {x.lease.subnet for x in listing.leases.values()} == set(subnets)
    assert all(cfg.ipv4.fits(s) for s in subnets)


def test_50_concurrent_acquirers_in_an_ipv6_only_network(etcd, etcd_client, etcd_prefix):
    cfg = parse_config('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "2001:db8:1800::/56"}')

    def attrs6(n: int) -> LeaseAttrs:
        return LeaseAttrs(ipaddress.IPv4Address(0), ipaddress.IPv6Address(f"2001:db8:51::{0x100 + n:x}"), "vxlan")

    results = acquire_concurrently(etcd, etcd_prefix, cfg, attrs6, 50)
    subnets = [lease.subnet6 for lease in results.values()]  # type: ignore[union-attr]
    assert len(set(subnets)) == 50 and all(cfg.ipv6.fits(s) for s in subnets)
    assert all(lease.subnet is None for lease in results.values())  # type: ignore[union-attr]
    # each node finds its own lease again by its public IPv6 (upstream's IPv6-only mode reuses one lease for all)
    mgr = LeaseManager(etcd_client, cfg, etcd_prefix)
    again = mgr.acquire(attrs6(7))
    assert again.lease.subnet6 == results[7].subnet6  # type: ignore[union-attr]


def test_dual_stack_concurrent_acquirers_unique_per_family(etcd, etcd_client, etcd_prefix):
    cfg = config(EnableIPv6=True, IPv6Network="2001:db8:1800::/56")
    barrier = threading.Barrier(30)
    results: dict[int, object] = {}

    def node(n: int) -> None:
        reg = EtcdClient(EtcdOptions(endpoints=(etcd.endpoint,), prefix=etcd_prefix))
        try:
            mgr = LeaseManager(reg, cfg, etcd_prefix, rng=random.Random(1))  # same seed: maximal collisions
            barrier.wait()
            results[n] = mgr.acquire(attrs(n, v6=True)).lease
        except Exception as exc:
            results[n] = exc
        finally:
            reg.close()

    threads = [threading.Thread(target=node, args=(n,)) for n in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    leases = list(results.values())
    assert not [r for r in leases if isinstance(r, Exception)]
    assert len({x.subnet for x in leases}) == 30
    assert len({x.subnet6 for x in leases}) == 30
    assert all("&" in x.key for x in leases)


def test_preexisting_dual_stack_key_blocks_its_ipv4_subnet(etcd_client, etcd_prefix):
    cfg = config(SubnetMin="198.18.1.0", SubnetMax="198.18.2.0")
    # an upstream dual-stack node holds 198.18.1.0/24; a v4-only acquirer must not take it too
    etcd_client.put(leases_prefix(etcd_prefix) + "198.18.1.0-24&2001:db8:1800:1::-64",
                 b'{"PublicIP":"198.51.100.40","PublicIPv6":"2001:db8:51::40","BackendType":"vxlan"}')
    for seed in range(5):
        mgr = manager(etcd_client, cfg, seed=seed)
        got = mgr.acquire(attrs(seed))
        assert got.lease.subnet == ipaddress.ip_network("198.18.2.0/24")
        etcd_client.delete(leases_prefix(etcd_prefix) + got.lease.key)


def test_exhaustion_is_a_clear_error(etcd_client):
    cfg = config(SubnetMin="198.18.1.0", SubnetMax="198.18.3.0")
    for n in range(3):
        manager(etcd_client, cfg).acquire(attrs(n))
    with pytest.raises(LeaseError, match=r"out of subnets: every /24 in 198.18.1.0 .. 198.18.3.0"):
        manager(etcd_client, cfg).acquire(attrs(3))


def test_reuses_own_lease_by_public_ip_and_keeps_one_etcd_lease(etcd, etcd_client, etcd_prefix):
    before = etcd.lease_ids()
    first = manager(etcd_client).acquire(attrs(7))
    for _ in range(3):  # restarts: a new manager each time
        again = manager(etcd_client).acquire(attrs(7))
        assert again.lease.subnet == first.lease.subnet
        assert again.etcd_lease == first.etcd_lease
    mgr = manager(etcd_client, ttl=30, renew_margin=10)
    own = mgr.acquire(attrs(7))
    for _ in range(10):
        assert mgr.renew()
    assert own.etcd_lease == first.etcd_lease
    assert etcd.lease_ids() - before == {first.etcd_lease}
    kv = etcd_client.get(leases_prefix(etcd_prefix) + first.lease.key)
    assert kv.lease_id == first.etcd_lease
    assert etcd_client.time_to_live_many([first.etcd_lease])[first.etcd_lease] > 86000


def test_renewal_keeps_a_short_lease_alive(etcd_client, etcd_prefix):
    mgr = manager(etcd_client, ttl=2, renew_margin=1)
    own = mgr.acquire(attrs(3))
    key = leases_prefix(etcd_prefix) + own.lease.key
    for _ in range(4):  # 4 s > 2x the TTL: only renewals keep the key
        time.sleep(mgr.seconds_until_renewal())
        assert mgr.renew()
    assert etcd_client.get(key) is not None
    time.sleep(3.5)  # no renewal: etcd expires the lease and the key
    assert etcd_client.get(key) is None
    assert mgr.renew() is False


def test_previous_subnet_from_subnet_env_is_preferred(etcd_client):
    prev = SubnetEnv(subnet=ipaddress.IPv4Interface("198.18.77.1/24"))
    got = manager(etcd_client, previous=prev).acquire(attrs(1))
    assert got.lease.subnet == ipaddress.ip_network("198.18.77.0/24")


def test_previous_subnet_taken_by_someone_else_is_not_stolen(etcd_client, etcd_prefix):
    put_lease(etcd_client, etcd_prefix, "198.18.77.0/24", "198.51.100.99")
    prev = SubnetEnv(subnet=ipaddress.IPv4Interface("198.18.77.1/24"))
    got = manager(etcd_client, previous=prev).acquire(attrs(1))
    assert got.lease.subnet != ipaddress.ip_network("198.18.77.0/24")


def test_reservations_are_never_stolen_and_stay_reservations(etcd_client, etcd_prefix):
    cfg = config(SubnetMin="198.18.5.0", SubnetMax="198.18.6.0")
    mine = put_lease(etcd_client, etcd_prefix, "198.18.5.0/24", str(attrs(1).public_ip))
    put_lease(etcd_client, etcd_prefix, "198.18.6.0/24", "198.51.100.200")  # someone else's reservation
    for _restart in range(3):
        own = manager(etcd_client, cfg).acquire(attrs(1))
        assert own.lease.subnet == mine.subnet and own.reserved and own.etcd_lease == 0
        kv = etcd_client.get(leases_prefix(etcd_prefix) + mine.key)
        assert kv.lease_id == 0  # still a reservation (upstream turns it into a 24 h lease)
        assert decode_lease(mine.key, kv.value).backend["VtepMAC"] == "0e:00:00:00:00:01"
    with pytest.raises(LeaseError, match="out of subnets"):
        manager(etcd_client, cfg).acquire(attrs(2))
    assert etcd_client.get(leases_prefix(etcd_prefix) + "198.18.6.0-24").lease_id == 0


def test_stale_own_lease_from_an_older_config_is_replaced(etcd_client, etcd_prefix):
    old = put_lease(etcd_client, etcd_prefix, "198.18.0.0/25", str(attrs(4).public_ip), etcd_client.grant(600))
    own = manager(etcd_client).acquire(attrs(4))
    assert own.lease.subnet.prefixlen == 24
    assert etcd_client.get(leases_prefix(etcd_prefix) + old.key) is None


def test_own_key_deleted_reacquires_same_subnet(etcd_client, etcd_prefix):
    mgr = manager(etcd_client)
    own = mgr.acquire(attrs(5))
    etcd_client.delete(leases_prefix(etcd_prefix) + own.lease.key)
    again = mgr.acquire(attrs(5))
    assert again.lease.subnet == own.lease.subnet
    assert again.etcd_lease == own.etcd_lease


def test_junk_entries_are_ignored_and_not_allocated(etcd_client, etcd_prefix):
    head = leases_prefix(etcd_prefix)
    cfg = config(SubnetMin="198.18.1.0", SubnetMax="198.18.3.0")
    etcd_client.put(head + "garbage", b"hello")
    etcd_client.put(head + "198.18.1.0-24", b"{not json")
    put_lease(etcd_client, etcd_prefix, "198.18.2.0/24", "198.51.100.50")
    listing = list_leases(etcd_client, etcd_prefix)
    assert list(listing.leases) == ["198.18.2.0-24"]
    assert {k for k, _ in listing.junk} == {head + "garbage", head + "198.18.1.0-24"}
    own = manager(etcd_client, cfg).acquire(attrs(9))
    assert own.lease.subnet == ipaddress.ip_network("198.18.3.0/24")
    watcher = LeaseWatcher(etcd_client, etcd_prefix)
    events = watcher.resync()
    assert sorted(e.lease.key for e in events) == ["198.18.2.0-24", "198.18.3.0-24"]


class Collector:
    def __init__(self):
        self.events = []
        self.cond = threading.Condition()

    def __call__(self, batch):
        with self.cond:
            self.events.extend(batch)
            self.cond.notify_all()

    def wait_for(self, pred, timeout=10.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred(self.events):
                left = deadline - time.monotonic()
                assert left > 0, f"timed out; events so far: {[str(e) for e in self.events]}"
                self.cond.wait(left)


def start_watcher(watcher, sink):
    thread = threading.Thread(target=watcher.run, args=(sink,), daemon=True)
    thread.start()
    return thread


def test_watch_delivers_add_change_remove_and_skips_junk(etcd_client, etcd_prefix):
    head = leases_prefix(etcd_prefix)
    put_lease(etcd_client, etcd_prefix, "198.18.1.0/24", "198.51.100.11")
    watcher, sink = LeaseWatcher(etcd_client, etcd_prefix), Collector()
    thread = start_watcher(watcher, sink)
    try:
        sink.wait_for(lambda ev: len(ev) == 1)
        put_lease(etcd_client, etcd_prefix, "198.18.2.0/24", "198.51.100.12")
        etcd_client.put(head + "198.18.2.0-24", b"broken")  # junk update: last good value is kept
        etcd_client.put(head + "junk", b"x")
        put_lease(etcd_client, etcd_prefix, "198.18.1.0/24", "198.51.100.11", mac="0e:aa:00:00:00:02")
        etcd_client.delete(head + "198.18.1.0-24")
        sink.wait_for(lambda ev: len(ev) >= 4)
        time.sleep(0.2)
        kinds = [(e.kind, e.lease.key) for e in sink.events]
        assert kinds == [("added", "198.18.1.0-24"), ("added", "198.18.2.0-24"),
                         ("changed", "198.18.1.0-24"), ("removed", "198.18.1.0-24")]
        assert sink.events[-1].lease.backend["VtepMAC"] == "0e:aa:00:00:00:02"  # last known value
        assert decode_lease("198.18.2.0-24", watcher.known["198.18.2.0-24"][0]).public_ip == \
            ipaddress.IPv4Address("198.51.100.12")
    finally:
        watcher.stop()
        thread.join(5)
    assert not thread.is_alive()


def test_compaction_forces_relist_and_diff(etcd_client, etcd_prefix):
    head = leases_prefix(etcd_prefix)
    put_lease(etcd_client, etcd_prefix, "198.18.1.0/24", "198.51.100.11")
    put_lease(etcd_client, etcd_prefix, "198.18.2.0/24", "198.51.100.12")
    watcher = LeaseWatcher(etcd_client, etcd_prefix)
    assert len(watcher.resync()) == 2  # "disconnected" from here on
    etcd_client.delete(head + "198.18.1.0-24")
    put_lease(etcd_client, etcd_prefix, "198.18.2.0/24", "198.51.100.12", mac="0e:aa:00:00:00:09")
    put_lease(etcd_client, etcd_prefix, "198.18.3.0/24", "198.51.100.13")
    for i in range(5):  # churn, then compact away all of it
        etcd_client.put(f"{etcd_prefix}/other/{i}", b"x")
    etcd_client.compact(etcd_client.list_prefix(head)[0])
    sink = Collector()
    thread = start_watcher(watcher, sink)
    try:
        sink.wait_for(lambda ev: len(ev) >= 3)
        got = sorted((e.kind, e.lease.key) for e in sink.events)
        assert got == [("added", "198.18.3.0-24"), ("changed", "198.18.2.0-24"), ("removed", "198.18.1.0-24")]
        put_lease(etcd_client, etcd_prefix, "198.18.4.0/24", "198.51.100.14")  # and the watch continues
        sink.wait_for(lambda ev: len(ev) >= 4)
    finally:
        watcher.stop()
        thread.join(5)


class SilentAfterCompaction:
    """An etcd client whose watches at a compacted revision are accepted and then deliver
    nothing, as a gRPC proxy restarted after a compaction can do (etcd-io/etcd#10650)."""

    def __init__(self, etcd_client, compacted: int) -> None:
        self._client, self.compacted = etcd_client, compacted

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        return getattr(self._client, name)

    def watch_prefix(self, prefix: str, start_revision: int):  # type: ignore[no-untyped-def]
        if start_revision > self.compacted:
            return self._client.watch_prefix(prefix, start_revision)
        stop = threading.Event()

        class Silent:
            def __iter__(self):  # type: ignore[no-untyped-def]
                stop.wait()
                return iter(())

            def cancel(self) -> None:
                stop.set()
        return Silent()


def test_a_watch_is_never_resumed_where_history_is_gone_even_if_the_watch_would_not_say(etcd_client, etcd_prefix):
    head = leases_prefix(etcd_prefix)
    put_lease(etcd_client, etcd_prefix, "198.18.1.0/24", "198.51.100.11")
    watcher = LeaseWatcher(etcd_client, etcd_prefix)
    assert len(watcher.resync()) == 1
    etcd_client.delete(head + "198.18.1.0-24")
    put_lease(etcd_client, etcd_prefix, "198.18.3.0/24", "198.51.100.13")
    compacted = etcd_client.list_prefix(head)[0]
    etcd_client.compact(compacted)
    watcher.etcd_client = SilentAfterCompaction(etcd_client, compacted)
    sink = Collector()
    thread = start_watcher(watcher, sink)
    try:
        sink.wait_for(lambda ev: len(ev) >= 2)  # found by asking etcd first, not by the watch
        assert sorted((e.kind, e.lease.key) for e in sink.events) == [("added", "198.18.3.0-24"),
                                                                    ("removed", "198.18.1.0-24")]
    finally:
        watcher.stop()
        thread.join(5)


def test_watch_resumes_after_etcd_restart(session_lab, etcd_prefix):
    server = lab.EtcdServer("restart")
    server.start()
    reg = EtcdClient(EtcdOptions(endpoints=(server.endpoint,), prefix=etcd_prefix))
    try:
        put_lease(reg, etcd_prefix, "198.18.1.0/24", "198.51.100.11")
        watcher, sink = LeaseWatcher(reg, etcd_prefix), Collector()
        thread = start_watcher(watcher, sink)
        sink.wait_for(lambda ev: len(ev) == 1)
        server.restart()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                put_lease(reg, etcd_prefix, "198.18.2.0/24", "198.51.100.12")
                break
            except Exception:
                time.sleep(0.2)
        sink.wait_for(lambda ev: len(ev) >= 2, timeout=15)
        time.sleep(0.3)
        assert [(e.kind, e.lease.key) for e in sink.events] == [("added", "198.18.1.0-24"),
                                                                   ("added", "198.18.2.0-24")]
        assert watcher.connected
        watcher.stop()
        thread.join(5)
    finally:
        reg.close()
        server.destroy()
