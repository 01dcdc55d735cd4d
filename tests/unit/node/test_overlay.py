"""The daemon's event handling (flanneld.node.overlay) on the in-memory kernel and etcd client, without root."""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flanneld.dataplane import nlcodec as nl
from flanneld.dataplane.reconciler import Reconciler
from flanneld.etcd.client import KeyValue, WatchBatch, WatchEvent
from flanneld.leases.manager import LeaseManager
from flanneld.leases.watcher import LeaseEvent, LeaseWatcher
from flanneld.model.config import parse_config
from flanneld.model.lease import leases_prefix
from flanneld.node.metrics import Metrics, parse
from flanneld.node.overlay import Overlay, OverlaySettings
from flanneld.plan.backend import External, NodeSettings, create_backend, published_addresses
from flanneld.plan.state import ObservedLink
from tests.unit.fakes import FakeEtcdClient, FakeKernel

A = ipaddress.ip_address
PREFIX = "/test/network"
HEAD = leases_prefix(PREFIX)
# our own lease comes from 198.18.100.0 up: the peers below never collide with it
CONFIG = parse_config('{"Network": "198.18.0.0/16", "SubnetMin": "198.18.100.0", "Backend": {"Type": "vxlan"}}')
EXT = External("eth0", 2, 1500, A("198.51.100.11"), A("198.51.100.11"), onlink=(ipaddress.ip_network(
    "198.51.100.0/24"),))


def value(n: int, mac: str | None = None, case: str = "VtepMAC") -> bytes:
    return json.dumps({"PublicIP": f"198.51.100.{10 + n}", "PublicIPv6": None, "BackendType": "vxlan",
                       "BackendData": {"VNI": 1, case: mac or f"0e:00:00:00:00:{n:02x}"}},
                      separators=(",", ":")).encode()


def event(kind: str, n: int, raw: bytes | None = None) -> LeaseEvent:
    return LeaseEvent(kind, f"198.18.{n}.0-24", raw or value(n))


def started(tmp_path, config=CONFIG, **lease_options):  # type: ignore[no-untyped-def]
    """An overlay as the daemon's start leaves it: devices, our lease, a full reconcile."""
    kernel, etcd_client = FakeKernel(), FakeEtcdClient()
    kernel.add_plain("eth0", 2)
    kernel.add_address(2, "198.51.100.11", 24)  # the address EXT runs over
    backend = create_backend(config, EXT, NodeSettings())
    reconciler = Reconciler(kernel, "eth0", 2)  # type: ignore[arg-type]
    leases = LeaseManager(etcd_client, config, PREFIX, **lease_options)  # type: ignore[arg-type]
    devices = reconciler.ensure_links(backend.links())
    own = leases.acquire(backend.lease_attrs(devices))
    overlay = Overlay(config, backend, reconciler, leases,
                      OverlaySettings(PREFIX, str(tmp_path / "subnet.env"), False, True, True), Metrics("test"),
                      threading.Event(), devices)
    overlay.adopt_lease(own.lease)
    overlay.full_reconcile("start")
    return overlay, kernel, etcd_client


@pytest.fixture
def node(tmp_path):
    return started(tmp_path)


def fdbs(kernel: FakeKernel) -> dict[str, str]:
    return {nl.mac_text(mac): nl.ip_text(nl.parse_neigh(memoryview(p)).dst) for (_ix, mac), p in
            kernel.bulk.fdbs.items()}


def routes(kernel: FakeKernel) -> set[str]:
    return {f"{nl.ip_text(key[1])}/{key[2]}" for key in kernel.bulk.routes}


def test_peers_come_change_and_go_incrementally(node):
    overlay, kernel, _ = node
    assert overlay.apply_lease_events([event("added", 2), event("added", 3)], incremental=True) == ""
    assert routes(kernel) == {"198.18.2.0/24", "198.18.3.0/24"} and len(overlay.peers) == 2
    overlay.apply_lease_events([event("changed", 2, value(2, "0e:00:00:00:00:99"))], incremental=True)
    assert fdbs(kernel) == {"0e:00:00:00:00:99": "198.51.100.12", "0e:00:00:00:00:03": "198.51.100.13"}
    overlay.apply_lease_events([event("removed", 3)], incremental=True)
    assert routes(kernel) == {"198.18.2.0/24"} and list(overlay.peers) == ["198.18.2.0-24"]
    samples = parse(overlay.metrics.render())
    assert samples[("flanneld_peers", ())] == 1
    assert samples[("flanneld_peer_leases", (("backend", "vxlan"),))] == 1


def test_a_peer_spelling_vtepmac_otherwise_is_programmed(node):
    overlay, kernel, _ = node
    overlay.apply_lease_events([event("added", 4, value(4, case="VtepMac"))], incremental=True)
    assert "198.18.4.0/24" in routes(kernel) and not overlay.peers["198.18.4.0-24"].skipped


def test_skips_and_misfits_are_logged_once(node, caplog):
    overlay, kernel, _ = node
    caplog.set_level(logging.WARNING, "flanneld")
    bad = json.dumps({"PublicIP": "198.51.100.15", "BackendType": "vxlan"}).encode()
    wide = value(6)
    for _ in range(3):
        overlay.apply_lease_events([event("changed", 5, bad), LeaseEvent("changed", "198.18.32.0-20", wide)],
                                   incremental=True)
    assert caplog.text.count("not programming all of lease 198.18.5.0-24") == 1
    assert caplog.text.count("198.18.32.0-20 does not fit the network config") == 1
    assert "198.18.32.0/20" in routes(kernel) and "198.18.5.0/24" not in routes(kernel)
    assert parse(overlay.metrics.render())[("flanneld_skipped_peers", (("reason", "backend-data"),))] == 1


VARIANTS = {
    "good": lambda n: value(n),
    "no-mac": lambda n: json.dumps({"PublicIP": f"198.51.100.{10 + n}", "BackendType": "vxlan"}).encode(),
    "host-gw": lambda n: json.dumps({"PublicIP": f"198.51.100.{10 + n}", "BackendType": "host-gw"}).encode(),
    "untyped": lambda n: json.dumps({"PublicIP": f"198.51.100.{10 + n}"}).encode(),
}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "removed"]), st.integers(2, 9), st.sampled_from(sorted(VARIANTS))),
                max_size=25))
def test_peer_counts_kept_per_change_equal_a_recount(tmp_path_factory, steps):
    # /metrics' peer, skip and backend numbers are running totals: after any sequence of events
    # they must be what counting every plan afresh gives
    overlay, _, _ = started(tmp_path_factory.mktemp("counts"))
    for what, n, variant in steps:
        kind = "removed" if what == "removed" else ("changed" if f"198.18.{n}.0-24" in overlay.peers else "added")
        if kind == "removed" and f"198.18.{n}.0-24" not in overlay.peers:
            continue
        overlay.apply_lease_events([event(kind, n, VARIANTS[variant](n))], incremental=True)
    plans = overlay.peers.values()
    samples = parse(overlay.metrics.render())
    assert samples.get(("flanneld_peers", ()), 0) == len(plans)
    assert samples.get(("flanneld_skipped_leases", ()), 0) == sum(1 for p in plans if p.skipped)
    for reason in ("backend-data", "backend-type"):
        expected = sum(1 for p in plans if reason in p.skipped_kinds)
        assert samples.get(("flanneld_skipped_peers", (("reason", reason),)), 0) == expected
    by_backend = Counter(p.backend_type or "none" for p in plans)
    assert {labels[0][1]: v for (name, labels), v in samples.items() if name == "flanneld_peer_leases"} == by_backend


def test_failed_writes_ask_for_a_full_reconcile(node):
    overlay, kernel, _ = node
    kernel.bulk.refuse.add(A("198.18.7.0").packed)
    assert overlay.apply_lease_events([event("added", 7)], incremental=True) == "failed writes"
    kernel.bulk.refuse.clear()
    report = overlay.full_reconcile("retry")
    assert not report.failures and "198.18.7.0/24" in routes(kernel)


def test_our_lease_deleted_or_modified_is_repaired(node):
    overlay, _, etcd_client = node
    key = HEAD + overlay.own.key
    subnet = overlay.own.subnet
    hijacked = json.loads(etcd_client.get(key).value)
    hijacked["PublicIP"] = "198.51.100.99"
    etcd_client.put(key, json.dumps(hijacked).encode(), etcd_client.get(key).lease_id)
    assert overlay.apply_lease_events([LeaseEvent("changed", overlay.own.key, etcd_client.get(key).value)],
                                      incremental=True) == ""
    assert json.loads(etcd_client.get(key).value)["PublicIP"] == "198.51.100.11"
    etcd_client.delete(key)
    reason = overlay.apply_lease_events([LeaseEvent("removed", overlay.own.key, b"{}")], incremental=True)
    assert reason == "own lease re-acquired" and etcd_client.get(key) is not None and overlay.own.subnet == subnet


def test_a_recreated_device_keeps_the_published_mac(node):
    overlay, kernel, etcd_client = node
    mac = overlay.devices["flannel.1"].mac
    kernel.delete_link(kernel.link("flannel.1").index)
    report = overlay.full_reconcile("drift")
    assert report.created == ["flannel.1"] and kernel.link("flannel.1").mac == mac
    assert mac in etcd_client.get(HEAD + overlay.own.key).value.decode()


def test_probe_addresses_follow_the_enabled_families():
    attrs = published_addresses(parse_config('{"EnableIPv4": false, "EnableIPv6": true, '
                                             '"IPv6Network": "2001:db8:1800::/56"}'),
                                External("eth0", 2, 1500, A("198.51.100.11"), A("198.51.100.11"),
                                         A("2001:db8:51::11"), A("2001:db8:51::11")))
    assert int(attrs.public_ip) == 0 and str(attrs.public_ipv6) == "2001:db8:51::11"


# -- the watcher's state transitions -----------------------------------------------------------


def kv(key: str, raw: bytes, rev: int) -> KeyValue:
    return KeyValue(HEAD + key, raw, rev, rev, 1, 0)


def test_watcher_lists_applies_and_diffs_after_compaction():
    etcd_client = FakeEtcdClient()
    etcd_client.put(HEAD + "198.18.2.0-24", value(2))
    etcd_client.put(HEAD + "junk", b"{")
    watcher = LeaseWatcher(etcd_client, PREFIX)  # type: ignore[arg-type]
    assert [(e.kind, e.key) for e in watcher.resync()] == [("added", "198.18.2.0-24")]
    rev = etcd_client.revision
    batch = WatchBatch(rev + 2, [WatchEvent(False, kv("198.18.3.0-24", value(3), rev + 1)),
                                 WatchEvent(False, kv("198.18.2.0-24", b"{broken", rev + 2))])
    assert [(e.kind, e.key) for e in watcher.apply(batch)] == [("added", "198.18.3.0-24")]
    assert watcher.revision == rev + 2 and watcher.known["198.18.2.0-24"][0] == value(2)  # last good value kept
    assert watcher.apply(WatchBatch(rev + 9, [])) == [] and watcher.revision == rev + 9  # progress notification
    removed = watcher.apply(WatchBatch(rev + 10, [WatchEvent(True, kv("198.18.3.0-24", b"", rev + 10))]))
    assert [(e.kind, e.value) for e in removed] == [("removed", value(3))]  # DELETE carries the last value
    # after a compaction: list again and synthesise what the missed events would have said
    etcd_client.put(HEAD + "198.18.2.0-24", value(2, "0e:00:00:00:00:22"))
    etcd_client.put(HEAD + "198.18.4.0-24", value(4))
    assert sorted((e.kind, e.key) for e in watcher.resync()) == [("added", "198.18.4.0-24"),
                                                                ("changed", "198.18.2.0-24")]
    etcd_client.delete(HEAD + "198.18.4.0-24")
    assert [(e.kind, e.key) for e in watcher.resync()] == [("removed", "198.18.4.0-24")]


def test_renewals_are_jittered_per_node_within_a_tenth_of_the_margin():
    import random

    jitters = {LeaseManager(FakeEtcdClient(), CONFIG, PREFIX, renew_margin=3600,  # type: ignore[arg-type]
                            rng=random.Random(seed)).renew_jitter for seed in range(20)}
    assert len(jitters) == 20 and all(0 <= j <= 60 for j in jitters)
    small = LeaseManager(FakeEtcdClient(), CONFIG, PREFIX, ttl=100, renew_margin=50)  # type: ignore[arg-type]
    assert small.renew_jitter <= 5


def test_wireguard_leases_sharing_a_key_are_merged_by_a_full_reconcile(tmp_path, monkeypatch):
    """An upstream node that moved leaves its old lease (same public key) until it expires: the
    incremental path hands such changes to a full reconcile, which programs one merged peer."""
    from flanneld.dataplane import devices
    from tests.unit.fakes import FakeWireguard

    fake = FakeWireguard()
    monkeypatch.setitem(devices.KINDS, "wireguard", fake)
    monkeypatch.setenv("WIREGUARD_KEY_FILE", str(tmp_path / "wgkey"))
    config = parse_config('{"Network": "198.18.0.0/16", "SubnetMin": "198.18.100.0", "Backend": {"Type": "wireguard"}}')
    overlay, _kernel, _etcd_client = started(tmp_path, config)
    key = "hA3o0ZdPN1S3fPYGyIqhJDqLRcmCN0VwVtHyyWy6ykM="

    def wg(n: int, host: int) -> bytes:
        return json.dumps({"PublicIP": f"198.51.100.{host}", "PublicIPv6": None, "BackendType": "wireguard",
                           "BackendData": {"PublicKey": key, "Port": 51820}}, separators=(",", ":")).encode()

    assert overlay.apply_lease_events([event("added", 2, wg(2, 12))], incremental=True) == ""
    assert fake.peers["flannel-wg"][key].allowed_ips == ("198.18.2.0/24",)
    assert overlay.apply_lease_events([event("changed", 2, wg(2, 22))], incremental=True) == ""  # moved
    assert fake.peers["flannel-wg"][key].endpoint == "198.51.100.22:51820"
    why = overlay.apply_lease_events([event("added", 3, wg(3, 13))], incremental=True)
    assert why == "leases sharing a WireGuard key changed"
    overlay.full_reconcile(why)
    assert fake.peers["flannel-wg"][key].allowed_ips == ("198.18.2.0/24", "198.18.3.0/24")
    assert overlay.apply_lease_events([event("removed", 3, wg(3, 13))], incremental=True) == why
    overlay.full_reconcile(why)
    assert fake.peers["flannel-wg"][key].allowed_ips == ("198.18.2.0/24",)  # the other lease still wants it
    assert overlay.apply_lease_events([event("removed", 2, wg(2, 22))], incremental=True) == ""
    assert fake.peers["flannel-wg"] == {}


def test_a_start_lists_once_when_its_lease_is_unchanged_and_again_after_writing():
    """Restart storm: find_own's listing serves acquisition and the watcher. A node that wrote its
    lease lists again, so being ready still covers every lease that existed before ours."""
    etcd_client = FakeEtcdClient()
    backend = create_backend(CONFIG, EXT, NodeSettings())
    attrs = backend.lease_attrs({"flannel.1": ObservedLink("flannel.1", 5, "vxlan", 1450, "0e:aa:00:00:00:01", True)})
    first = LeaseManager(etcd_client, CONFIG, PREFIX)  # type: ignore[arg-type]
    assert first.find_own(published_addresses(CONFIG, EXT)) is None
    first.acquire(attrs)
    assert first.take_listing() is None  # it created its lease: the watcher lists afresh
    again = LeaseManager(etcd_client, CONFIG, PREFIX)  # type: ignore[arg-type]  # the restart
    etcd_client.requests.clear()
    assert again.find_own(published_addresses(CONFIG, EXT)) is not None
    again.acquire(attrs)
    assert etcd_client.requests == {"list": 1, "keepalive": 1}  # and no read-back of our own key
    _revision, kvs = again.take_listing()  # type: ignore[misc]
    assert [kv.key for kv in kvs] == [HEAD + first.own.lease.key]  # type: ignore[union-attr]
    assert again.take_listing() is None


def test_a_lease_copying_another_nodes_vtep_mac_is_skipped_until_the_first_goes(node, caplog):
    """Two leases with one VtepMAC want two FDB entries with one key: the entry flipped between them
    on every reconcile. The later one is skipped, named once, and programmed when the first leaves."""
    overlay, kernel, _ = node
    caplog.set_level(logging.WARNING, "flanneld")
    mac = "0e:00:00:00:00:02"
    overlay.apply_lease_events([event("added", 2)], incremental=True)
    overlay.apply_lease_events([event("added", 3, value(3, mac))], incremental=True)
    assert fdbs(kernel) == {mac: "198.51.100.12"} and "198.18.3.0/24" not in routes(kernel)
    for _ in range(3):
        overlay.full_reconcile("periodic")
        assert fdbs(kernel) == {mac: "198.51.100.12"}
    said = [r.getMessage() for r in caplog.records if "already the VTEP of lease 198.18.2.0-24" in r.getMessage()]
    assert len(said) == 1 and "198.18.3.0-24" in said[0]
    assert parse(overlay.metrics.render())[("flanneld_skipped_peers", (("reason", "backend-data"),))] == 1
    overlay.apply_lease_events([event("removed", 2)], incremental=True)
    assert fdbs(kernel) == {mac: "198.51.100.13"} and routes(kernel) == {"198.18.3.0/24"}
    assert not overlay.peers["198.18.3.0-24"].skipped


def test_an_underlay_mtu_change_moves_the_overlay_mtu_unless_the_backend_fixes_it(tmp_path):
    overlay, _kernel, _ = started(tmp_path)
    overlay.write_subnet_env()
    assert overlay.underlay_mtu_changed(1400) == "underlay MTU changed" and overlay.backend.mtu() == 1350
    assert "FLANNEL_MTU=1350" in (tmp_path / "subnet.env").read_text()
    assert overlay.underlay_mtu_changed(1400) == ""  # the same again: nothing to do
    fixed = parse_config('{"Network": "198.18.0.0/16", "SubnetMin": "198.18.100.0", '
                         '"Backend": {"Type": "vxlan", "MTU": 1300}}')
    overlay, _kernel, _ = started(tmp_path / "fixed", fixed)
    assert overlay.underlay_mtu_changed(1400) == "" and overlay.backend.mtu() == 1250  # Backend.MTU rules


def neighs(kernel: FakeKernel) -> dict[str, str]:
    """VTEP address -> MAC of flannel.1's neighbour entries."""
    out = {}
    for p in kernel.bulk.neighs.values():
        msg = nl.parse_neigh(memoryview(p))
        out[nl.ip_text(msg.dst)] = nl.mac_text(msg.lladdr)
    return out


def misfit_event(kind: str, key: str, n: int, rev: int) -> LeaseEvent:
    return LeaseEvent(kind, key, value(n), create_revision=rev)


@pytest.mark.parametrize("misfit_first", [False, True])
def test_of_overlapping_leases_the_one_that_fits_is_programmed_and_the_other_waits(node, caplog, misfit_first):
    """A /25 inside a live /24 claims the same VTEP address 198.18.62.0: programmed too, its
    neighbour entry replaced the live node's and that node's pods were lost to everyone."""
    overlay, kernel, _ = node
    caplog.set_level(logging.WARNING, "flanneld")
    live, odd = misfit_event("added", "198.18.62.0-24", 2, 50), misfit_event("added", "198.18.62.0-25", 3, 40)
    for ev in ([odd, live] if misfit_first else [live, odd]):
        overlay.apply_lease_events([ev], incremental=True)
    for _ in range(2):
        assert neighs(kernel) == {"198.18.62.0": "0e:00:00:00:00:02"}
        assert routes(kernel) == {"198.18.62.0/24"} and fdbs(kernel) == {"0e:00:00:00:00:02": "198.51.100.12"}
        overlay.full_reconcile("periodic")
    said = [r.getMessage() for r in caplog.records if "not programming all of lease 198.18.62.0-25" in r.getMessage()]
    assert len(said) == 1 and "overlaps lease 198.18.62.0-24" in said[0] and "fits the network config" in said[0]
    if not misfit_first:  # (first, it was alone, and programmed)
        assert not any("programming it anyway" in r.getMessage() for r in caplog.records)
    assert parse(overlay.metrics.render())[("flanneld_skipped_peers", (("reason", "overlap"),))] == 1
    overlay.apply_lease_events([misfit_event("removed", "198.18.62.0-24", 2, 50)], incremental=True)
    assert neighs(kernel) == {"198.18.62.0": "0e:00:00:00:00:03"} and routes(kernel) == {"198.18.62.0/25"}
    assert parse(overlay.metrics.render())[("flanneld_skipped_peers", (("reason", "overlap"),))] == 0


def test_between_two_misfits_the_older_is_programmed_and_a_peer_inside_our_subnet_never(node, caplog):
    overlay, kernel, _ = node
    caplog.set_level(logging.WARNING, "flanneld")
    overlay.apply_lease_events([misfit_event("added", "198.18.8.0-23", 2, 90),
                                misfit_event("added", "198.18.8.0-25", 3, 70)], incremental=True)
    assert routes(kernel) == {"198.18.8.0/25"} and overlay.peers["198.18.8.0-23"].skipped
    assert "198.18.8.0-23 does not fit" not in caplog.text  # said once, as the reason it waits
    own = overlay.own.subnet
    inside = f"{own.network_address}-26"
    overlay.apply_lease_events([misfit_event("added", inside, 4, 10)], incremental=True)
    assert f"{own.network_address}/26" not in routes(kernel)
    assert "this node's own" in overlay.peers[inside].skipped[0]
