"""The daemon's event loop: when it retries a full reconcile that left failed writes, when it calls
itself stuck, and (driven on the in-memory kernel and etcd client) which notifications call for a
full reconcile, when a failed one is tried again, when our lease is renewed."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterator

import pytest

from flanneld.dataplane import nlcodec as nl
from flanneld.dataplane.netlink import WriteFailure
from flanneld.lab.probes import eventually
from flanneld.node.daemon import RETRY_AFTER_FAILURE, Daemon, DaemonOptions, retry_delay
from flanneld.node.events import LeaseBatch, NetlinkBatch, Stop
from flanneld.node.metrics import parse
from tests.unit.node.test_overlay import event, routes, started

REFUSED = WriteFailure("fdb 01:00:5e:00:00:01", errno.EOPNOTSUPP, "Operation not supported")
INVALID = WriteFailure("route", errno.EINVAL, "Invalid argument")
PASSING = WriteFailure("neigh", errno.ENODEV, "No such device")


def test_no_failure_no_retry():
    assert retry_delay(None, [], 30) is None and retry_delay(8.0, [], 30) is None


def test_refusals_that_will_not_change_back_off_to_the_periodic_interval():
    waits, wait = [], None
    for _ in range(8):
        wait = retry_delay(wait, [REFUSED, INVALID], 30)
        waits.append(wait)
    assert waits == [RETRY_AFTER_FAILURE, 2, 4, 8, 16, 30, 30, 30]


def test_a_failure_that_may_pass_is_retried_after_a_second():
    assert retry_delay(16.0, [REFUSED, PASSING], 30) == RETRY_AFTER_FAILURE
    assert retry_delay(None, [PASSING], 30) == RETRY_AFTER_FAILURE


def test_healthz_names_a_loop_that_has_not_run_for_three_reconcile_intervals():
    """/healthz's rule for a stuck event loop (the loop wakes at least every reconcile interval)."""
    import time

    from flanneld.node.daemon import Daemon, DaemonOptions

    daemon = Daemon(DaemonOptions(reconcile_interval=30))
    daemon.ready = True
    daemon.loop_heartbeat = time.monotonic() - 80
    assert [c.ok for c in daemon.health()] == [True]  # within 3 x 30 s
    daemon.loop_heartbeat = time.monotonic() - 100
    (check,) = daemon.health()
    assert not check.ok and check.detail.startswith("event loop has not run for 10")


class Running:
    def __init__(self, tmp_path, reconcile_interval: float = 3600, **lease_options) -> None:  # type: ignore[no-untyped-def]
        self.overlay, self.kernel, self.etcd = started(tmp_path, **lease_options)
        self.daemon = Daemon(DaemonOptions(reconcile_interval=reconcile_interval, iptables_resync=3600))
        self.daemon.overlay = self.overlay
        self.daemon.metrics = self.overlay.metrics
        self.thread = threading.Thread(target=self.daemon._loop, daemon=True)
        self.thread.start()

    def full(self, trigger: str) -> float:
        return parse(self.daemon.metrics.render()).get(
            ("flanneld_reconciles_total", (("kind", "full"), ("trigger", trigger))), 0.0)

    def put(self, item) -> None:  # type: ignore[no-untyped-def]
        self.daemon.events.put(item)

    def stop(self) -> None:
        self.daemon.stop_event.set()
        self.put(Stop())
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.fixture
def loop(tmp_path) -> Iterator[Running]:
    running = Running(tmp_path)
    yield running
    running.stop()


def add_peer(loop: Running, n: int) -> str:
    loop.put(LeaseBatch([event("added", n)], time.monotonic()))
    subnet = f"198.18.{n}.0/24"
    eventually(lambda: subnet in routes(loop.kernel), timeout=2, what="the peer programmed")
    return subnet


def notification(request: bytes) -> tuple[int, bytes]:
    kind, _flags, _seq, payload = next(nl.messages(request))
    return kind, bytes(payload)


def test_lost_notifications_bring_a_full_reconcile_that_repairs_what_they_hid(loop) -> None:
    subnet = add_peer(loop, 2)
    loop.kernel.bulk.delete_route(subnet)  # a change whose notification the kernel dropped (ENOBUFS)
    loop.put(NetlinkBatch(None))
    eventually(lambda: subnet in routes(loop.kernel), timeout=2, what="the route put back")
    assert loop.full("drift") == 1


def test_the_echo_of_our_own_write_is_not_drift_and_a_foreign_change_is(loop) -> None:
    subnet = add_peer(loop, 2)
    ours = nl.route(1, False, bytes([198, 18, 2, 0]), 24, bytes([198, 18, 2, 0]), loop.overlay.reconciler.index[
        "flannel.1"], True)
    loop.put(NetlinkBatch([notification(ours)]))
    time.sleep(0.2)
    assert loop.full("drift") == 0 and subnet in routes(loop.kernel)
    loop.kernel.bulk.delete_route(subnet)  # `ip route del`, and the kernel's notification of it
    loop.put(NetlinkBatch([loop.kernel.bulk.notifications[-1]]))
    eventually(lambda: subnet in routes(loop.kernel), timeout=2, what="the deleted route repaired")
    assert loop.full("drift") == 1


def test_a_failed_write_is_tried_again_until_the_kernel_takes_it(loop) -> None:
    loop.kernel.bulk.refuse.add(bytes([198, 18, 3, 0]))
    loop.put(LeaseBatch([event("added", 3)], time.monotonic()))
    eventually(lambda: loop.full("failed writes") >= 1, timeout=2, what="a full reconcile after the failure")
    eventually(lambda: loop.full("retry") >= 1, timeout=3, what="tried again")
    loop.kernel.bulk.refuse.clear()
    eventually(lambda: "198.18.3.0/24" in routes(loop.kernel), timeout=8, what="written once the kernel takes it")
    settled = loop.full("retry")
    time.sleep(2.5)
    assert loop.full("retry") == settled  # and no more retries once it is in place


def test_our_lease_is_renewed_at_each_deadline(tmp_path) -> None:
    running = Running(tmp_path, ttl=3, renew_margin=2.5)  # a renewal every ~0.5 s
    try:
        eventually(lambda: parse(running.daemon.metrics.render())[("flanneld_lease_renewals_total", ())] >= 3,
                   timeout=4, what="three renewals")
        assert running.etcd.requests["keepalive"] >= 3 and running.etcd.requests["grant"] == 1  # one lease, kept
    finally:
        running.stop()


def test_liveness_ignores_an_etcd_outage_and_readiness_names_it(tmp_path) -> None:
    """A liveness probe that restarted every node when etcd went away could not fix etcd."""
    from types import SimpleNamespace

    from flanneld.node.daemon import Daemon, DaemonOptions
    from flanneld.node.health import HealthServer

    daemon = Daemon(DaemonOptions())
    daemon.ready, daemon.phase = True, "ready"
    daemon.watcher = SimpleNamespace(connected=False, last_error="etcd watch broke: UNAVAILABLE",  # type: ignore
                                     revision=7)
    server = HealthServer("127.0.0.1", 0, daemon.health, daemon.readiness, lambda: "")
    try:
        assert server.route("/healthz")[:2] == (200, "flanneld is running\n")
        assert server.route("/readyz")[:2] == (503, "not ready: etcd lease watch is down: etcd watch broke: "
                                                    "UNAVAILABLE\n")
        assert server.route("/readyz", verbose=True)[:2] == (503, "[+]node ok\n[-]etcd-watch failed: etcd lease "
                                                                  "watch is down: etcd watch broke: UNAVAILABLE\n"
                                                                  "readyz check failed\n")
        daemon.watcher.connected = True  # type: ignore[union-attr]
        assert server.route("/readyz", verbose=True)[:2] == (200, "[+]node ok\n[+]etcd-watch ok (revision 7)\n"
                                                                  "readyz check passed\n")
        assert server.route("/healthz", verbose=True)[:2] == (200, "[+]event-loop ok\nhealthz check passed\n")
    finally:
        server.server.server_close()


def test_an_underlay_rebuilt_while_notifications_were_lost_is_found_by_asking_the_kernel(loop) -> None:
    import dataclasses

    kernel = loop.kernel
    eth0 = kernel.links_by_name.pop("eth0")  # deleted, and the notification lost (ENOBUFS)
    loop.put(NetlinkBatch(None))
    eventually(lambda: loop.daemon.underlay_gone, timeout=2, what="the interface seen gone")
    kernel.links_by_name["eth0"] = dataclasses.replace(eth0, index=12)  # created again, unheard of too
    kernel.add_address(12, "198.51.100.11", 24)  # with its address
    loop.put(NetlinkBatch(None))
    eventually(lambda: loop.full("underlay recreated") == 1, timeout=2, what="rebuilt on the new one")
    assert not loop.daemon.underlay_gone and loop.overlay.reconciler.underlay_index == 12


def test_the_address_we_run_over_leaving_holds_full_reconciles_until_it_is_back(loop) -> None:
    kernel = loop.kernel
    kernel.del_address(2, "198.51.100.11", 24)
    loop.put(NetlinkBatch(None))
    eventually(lambda: loop.daemon.address_lost == "198.51.100.11", timeout=2, what="the loss seen")
    assert ("underlay", False, "interface eth0 no longer holds 198.51.100.11") in loop.daemon.readiness()
    kernel.add_address(2, "198.51.100.11", 24)
    loop.put(NetlinkBatch(None))
    eventually(lambda: loop.full("underlay address back") == 1, timeout=2, what="rebuilt once it is back")
    assert loop.daemon.address_lost == "" and not [c for c in loop.daemon.readiness() if c.name == "underlay"]
