"""When the daemon retries a full reconcile that left failed writes, and when it calls its loop stuck."""

from __future__ import annotations

import errno

from flanneld.dataplane.netlink import WriteFailure
from flanneld.node.daemon import RETRY_AFTER_FAILURE, retry_delay

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
    daemon.etcd_client = object()  # type: ignore[assignment]  (connected: health is judged)
    daemon.ready = True
    daemon.loop_heartbeat = time.monotonic() - 80
    assert daemon.health() == (True, "")  # within 3 x 30 s
    daemon.loop_heartbeat = time.monotonic() - 100
    healthy, why = daemon.health()
    assert not healthy and why.startswith("event loop has not run for 10")
