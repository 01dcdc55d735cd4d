"""When the daemon retries a full reconcile that left failed writes."""

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
