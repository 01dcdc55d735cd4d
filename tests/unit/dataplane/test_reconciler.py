"""The reconciler against the in-memory kernel: full, incremental and drift paths, in milliseconds."""

from __future__ import annotations

import base64
import dataclasses
import ipaddress

from flanneld.dataplane import devices
from flanneld.dataplane import nlcodec as nl
from flanneld.dataplane.reconciler import Reconciler
from flanneld.model.wgkeys import Key
from flanneld.plan.backend import PeerPlan, merge
from flanneld.plan.state import Address, DesiredState, Fdb, Neigh, Route, VxlanLink, WgPeer, WireguardLink
from tests.unit.fakes import FakeKernel, FakeWireguard

LINK = VxlanLink("flannel.1", 1, "198.51.100.11", "eth0", 0, False, False, 1450, "0e:aa:00:00:00:01")
NET = "198.18.0.0/16"


def peer(n: int, mac: str | None = None) -> PeerPlan:
    mac = mac or f"0e:00:00:00:00:{n:02x}"
    gw = f"198.18.{n}.0"
    return PeerPlan([Neigh("flannel.1", gw, mac)], [Fdb("flannel.1", mac, f"198.51.100.{10 + n}")],
                    [Route(f"198.18.{n}.0/24", gw, "flannel.1", onlink=True)])


def desired(*peers: PeerPlan, links=(LINK,)) -> DesiredState:
    base = DesiredState(links=links, addresses=frozenset({Address("flannel.1", "198.18.1.0/32")} if links else ()),
                        owned_networks=(NET,))
    return merge(base, peers)


def setup(*peers: PeerPlan):
    kernel = FakeKernel()
    kernel.add_plain("eth0", 2)
    rec = Reconciler(kernel, "eth0", 2)  # type: ignore[arg-type]
    report = rec.reconcile(desired(*peers))
    return kernel, rec, report


def routes(kernel: FakeKernel) -> set[str]:
    return {f"{nl.ip_text(key[1])}/{key[2]}" for key in kernel.bulk.routes}


def test_full_reconcile_creates_programs_and_is_then_idempotent():
    kernel, rec, report = setup(peer(2), peer(3))
    dev = kernel.link("flannel.1")
    assert dev is not None and dev.mac == "0e:aa:00:00:00:01" and dev.up and dev.mtu == 1450
    assert report.created == ["flannel.1"] and report.devices["flannel.1"].mac == "0e:aa:00:00:00:01"
    assert kernel.addrs[dev.index] == {("198.18.1.0", 32)}
    assert routes(kernel) == {"198.18.2.0/24", "198.18.3.0/24"} and len(kernel.bulk.fdbs) == 2
    again = rec.reconcile(desired(peer(2), peer(3)))
    assert not again.changed and again.written == again.deleted == 0


def test_stale_entries_in_owned_space_go_and_others_stay():
    kernel, rec, _ = setup(peer(2), peer(3))
    foreign = nl.route(1, False, ipaddress.ip_address("203.0.113.0").packed, 24, None, 2, False)
    kernel.bulk.write([(foreign, "someone else's route")])
    report = rec.reconcile(desired(peer(2)))  # peer 3 left while we were down
    assert routes(kernel) == {"198.18.2.0/24", "203.0.113.0/24"}
    assert report.deleted == 3 and len(kernel.bulk.neighs) == 1 and len(kernel.bulk.fdbs) == 1


def test_incremental_change_touches_only_the_peer_and_keeps_shared_keys():
    kernel, rec, _ = setup(peer(2))
    before = kernel.bulk.writes
    report = rec.change(peer(4), PeerPlan())
    assert kernel.bulk.writes - before == 3 and report.written == 3 and "198.18.4.0/24" in routes(kernel)
    moved = peer(4, mac="0e:00:00:00:00:44")  # the same peer with a new MAC
    rec.change(moved, peer(4))
    assert {nl.mac_text(mac) for _ix, mac in kernel.bulk.fdbs} == {"0e:00:00:00:00:02", "0e:00:00:00:00:44"}
    rec.change(PeerPlan(), moved)
    assert routes(kernel) == {"198.18.2.0/24"} and len(kernel.bulk.neighs) == 1


def test_own_writes_are_not_drift_but_a_deleted_route_is():
    kernel, rec, _ = setup(peer(2))
    notes = kernel.bulk.notifications
    assert notes and not any(rec.is_drift(kind, payload) for kind, payload in notes)
    kernel.bulk.notifications = []
    kernel.bulk.delete_route("198.18.2.0/24")
    assert [rec.is_drift(kind, payload) for kind, payload in kernel.bulk.notifications] == [True]
    report = rec.reconcile(desired(peer(2)))
    assert report.written == 1 and "198.18.2.0/24" in routes(kernel)


def test_an_incompatible_device_is_recreated_with_its_mac():
    kernel, rec, _ = setup(peer(2))
    old = kernel.link("flannel.1")
    other = VxlanLink("flannel.1", 7, "198.51.100.11", "eth0", 0, False, False, 1450, None)
    report = rec.reconcile(desired(peer(2), links=(other,)))
    new = kernel.link("flannel.1")
    assert report.created == ["flannel.1"] and new.index != old.index and new.mac == old.mac
    assert new.data["IFLA_VXLAN_ID"] == 7 and "198.18.2.0/24" in routes(kernel)  # tables replayed on the new device


def test_failed_writes_are_reported_per_entry():
    kernel, rec, _ = setup(peer(2))
    kernel.bulk.refuse.add(ipaddress.ip_address("198.18.5.0").packed)
    report = rec.change(peer(5), PeerPlan())
    assert {type(f.item).__name__ for f in report.failures} == {"Neigh", "Route"}
    assert "198.18.5.0/24" not in routes(kernel)


def test_a_refused_write_is_told_once_and_again_only_after_it_went_away(caplog):
    kernel, rec, _ = setup(peer(2))
    kernel.bulk.refuse.add(ipaddress.ip_address("198.18.5.0").packed)
    with caplog.at_level("WARNING", logger="flanneld.dataplane.reconciler"):
        for _ in range(5):  # the retries a daemon makes of the same refusal
            assert rec.reconcile(desired(peer(2), peer(5))).failures
        told = [r.getMessage() for r in caplog.records if "could not write" in r.getMessage()]
        assert len(told) == 2  # the neighbour and the route, each once
        kernel.bulk.refuse.clear()
        assert not rec.reconcile(desired(peer(2), peer(5))).failures
        caplog.clear()
        kernel.bulk.refuse.add(ipaddress.ip_address("198.18.5.0").packed)
        rec.reconcile(desired(peer(2)))  # the entry is no longer wanted ...
        rec.reconcile(desired(peer(2), peer(5)))  # ... and is back, refused again: told again
        assert len([r for r in caplog.records if "could not write" in r.getMessage()]) == 2


def test_a_backend_without_devices_routes_over_the_underlay():
    kernel = FakeKernel()
    kernel.add_plain("eth0", 2)
    rec = Reconciler(kernel, "eth0", 2)  # type: ignore[arg-type]
    via = PeerPlan(routes=[Route("198.18.2.0/24", "198.51.100.12", "eth0")])
    report = rec.reconcile(desired(via, links=()))
    assert report.created == [] and report.devices == {} and routes(kernel) == {"198.18.2.0/24"}
    payload = next(iter(kernel.bulk.routes.values()))
    assert nl.parse_route(memoryview(payload)).oif == 2
    assert not any(rec.is_drift(k, p) for k, p in kernel.bulk.notifications)


# -- a device kind with its own peer table (WireGuard), through a fake handler -----------------------

WG_LINK = WireguardLink("flannel-wg", 1420, 51820, Key(bytes(32)), "pub", (4,))


def wg_peer(n: int, endpoint_host: int | None = None) -> PeerPlan:
    key = base64.b64encode(bytes([n]) * 32).decode()
    return PeerPlan(wg_peers=[WgPeer("flannel-wg", key, f"198.51.100.{endpoint_host or 10 + n}:51820",
                                     (f"198.18.{n}.0/24",))])


WG_BASE = DesiredState(links=(WG_LINK,), routes=frozenset({Route(NET, dev="flannel-wg")}), owned_networks=(NET,))


def wireguard_node(monkeypatch) -> tuple[FakeWireguard, FakeKernel]:  # type: ignore[no-untyped-def]
    """A kernel with eth0 whose wireguard devices are the in-memory FakeWireguard."""
    fake = FakeWireguard()
    monkeypatch.setitem(devices.KINDS, "wireguard", fake)
    kernel = FakeKernel()
    kernel.add_plain("eth0", 2)
    return fake, kernel


def test_wireguard_peer_table_is_diffed_and_written_one_peer_at_a_time(monkeypatch):
    fake, kernel = wireguard_node(monkeypatch)
    rec = Reconciler(kernel, "eth0", 2)  # type: ignore[arg-type]
    rec.reconcile(merge(WG_BASE, [wg_peer(2), wg_peer(3)]))
    (put, delete), = fake.writes
    assert sorted(put, key=lambda p: p.public_key) == wg_peer(2).wg_peers + wg_peer(3).wg_peers and delete == []
    assert rec.reconcile(merge(WG_BASE, [wg_peer(2), wg_peer(3)])).written == 0  # idempotent

    fake.writes.clear()
    report = rec.change(wg_peer(4), wg_peer(2))  # one came, one went: exactly those two
    assert fake.writes == [(wg_peer(4).wg_peers, wg_peer(2).wg_peers)] and report.written == report.deleted == 1
    report = rec.change(wg_peer(3, endpoint_host=99), wg_peer(3))  # a peer moved: updated in place
    assert fake.writes[-1] == (wg_peer(3, endpoint_host=99).wg_peers, [])

    # removed by hand: the next full reconcile puts back that one peer; a stale one is removed
    del fake.peers["flannel-wg"][wg_peer(4).wg_peers[0].public_key]
    stale = wg_peer(9).wg_peers[0]
    fake.peers["flannel-wg"][stale.public_key] = stale
    fake.writes.clear()
    report = rec.reconcile(merge(WG_BASE, [wg_peer(3, endpoint_host=99), wg_peer(4)]))
    assert fake.writes == [(wg_peer(4).wg_peers, [stale])] and report.written == report.deleted == 1


def test_an_endpoint_wireguard_learnt_from_handshakes_is_no_drift(monkeypatch):
    """A peer behind NAT is reached at its mapped address and port: full reconciles leave the
    learnt endpoint alone; the lease's is written when the peer is new or the lease's changes."""
    fake, kernel = wireguard_node(monkeypatch)
    rec = Reconciler(kernel, "eth0", 2)  # type: ignore[arg-type]
    rec.reconcile(merge(WG_BASE, [wg_peer(2)]))
    peer = wg_peer(2).wg_peers[0]
    learnt = dataclasses.replace(peer, endpoint="198.51.100.1:40001")  # the NAT's mapping, from a handshake
    fake.peers["flannel-wg"][peer.public_key] = learnt
    fake.writes.clear()
    assert rec.reconcile(merge(WG_BASE, [wg_peer(2)])).written == 0 and fake.writes == []
    assert fake.peers["flannel-wg"][peer.public_key] == learnt
    moved = wg_peer(2, endpoint_host=77)  # the lease now publishes another endpoint: that one is written
    rec.reconcile(merge(WG_BASE, [moved]))
    assert fake.writes == [(moved.wg_peers, [])]
    fake.peers["flannel-wg"][peer.public_key] = dataclasses.replace(moved.wg_peers[0], allowed_ips=("198.18.9.0/24",))
    fake.writes.clear()
    rec.reconcile(merge(WG_BASE, [moved]))  # anything else that differs is drift, repaired whole
    assert fake.writes == [(moved.wg_peers, [])]


def test_a_device_adopted_at_start_keeps_the_endpoints_it_learnt(monkeypatch):
    fake, kernel = wireguard_node(monkeypatch)
    Reconciler(kernel, "eth0", 2).reconcile(merge(WG_BASE, [wg_peer(2)]))  # type: ignore[arg-type]
    peer = wg_peer(2).wg_peers[0]
    fake.peers["flannel-wg"][peer.public_key] = dataclasses.replace(peer, endpoint="198.51.100.1:40001")
    fake.writes.clear()
    restarted = Reconciler(kernel, "eth0", 2)  # type: ignore[arg-type]  # a new daemon, the device kept
    restarted.reconcile(merge(WG_BASE, [wg_peer(2)]))
    assert fake.writes == []
