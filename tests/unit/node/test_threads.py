"""The daemon's threads carry their names into the kernel (top -H, ps -L, /proc/<pid>/task/<tid>/comm)."""

from __future__ import annotations

import queue
import threading

from flanneld.node.threads import named_thread


def comm_of_thread_running(name: str) -> tuple[str, str]:
    seen: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()

    def report() -> None:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as fh:
            seen.put((threading.current_thread().name, fh.read().strip()))

    thread = named_thread(report, name)
    assert thread.daemon
    thread.start()
    thread.join(5)
    return seen.get(timeout=1)


def test_a_named_thread_has_its_name_in_python_and_in_the_kernel():
    assert comm_of_thread_running("prober") == ("prober", "prober")


def test_a_name_longer_than_the_kernel_keeps_is_cut_there():
    assert comm_of_thread_running("netlink-monitor-long") == ("netlink-monitor-long", "netlink-monitor")
