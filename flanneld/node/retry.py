"""Retrying a start-up or recovery step until it succeeds or the daemon stops: what start-up and
the overlay do with etcd, lease and kernel failures that may pass (etcd down, a lost race)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from flanneld.dataplane.netlink import KernelError
from flanneld.etcd.errors import EtcdError
from flanneld.leases.manager import LeaseError

log = logging.getLogger("flanneld")


def retry(what: str, fn: Callable[[], object], stop: threading.Event, delay: float = 1.0,
          max_delay: float = 10.0, also: tuple[type[Exception], ...] = ()) -> object:
    """Call fn until it succeeds or `stop` is set (then None); log each distinct failure once.

    etcd, lease and kernel failures are retried; `also` names more (a backend's start-up hook).
    """
    last = ""
    while not stop.is_set():
        try:
            return fn()
        except (EtcdError, LeaseError, KernelError, *also) as exc:
            if str(exc) != last:
                log.warning("%s: %s (retrying)", what, exc)
                last = str(exc)
            stop.wait(delay)
            delay = min(delay * 2, max_delay)
    return None
