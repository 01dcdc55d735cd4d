"""Signals (stop, and SIGUSR1's stack dump) handled on an ordinary thread.

A Python signal handler runs in the main thread between two of its bytecodes, possibly while
that thread holds a lock: inside ``queue.Queue.get`` (its mutex, while it removes a timed-out
waiter) or ``threading.Event.wait``. A handler that takes the same lock, by putting on that
queue or setting that event, then waits on its own thread forever, and the daemon ignores
SIGTERM until systemd kills it. So the Python-level handler installed here does nothing: the
interpreter's C handler writes the signal's number to a wakeup pipe (``signal.set_wakeup_fd``)
and a thread of our own reads it and runs the callback, where taking any lock is safe.

The stack dump is Python code on that thread too, not :mod:`faulthandler`: faulthandler's handler
walks every thread's state from inside the C signal handler, without the interpreter's lock, and
a thread ending at that moment leaves it a freed pointer. A daemon whose /healthz server runs a
thread per request died of SIGSEGV on SIGUSR1 that way (CI, 2026-12-04). The price: a thread
stuck in C code *holding* the interpreter lock blocks the dump; every wait in this daemon releases it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable

from flanneld.node.threads import named_thread

log = logging.getLogger("flanneld")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _ignore(_signum: int, _frame: object) -> None:
    """Replaces the default action; the work happens on the reader thread."""


def call_on_signals(callback: Callable[[signal.Signals], None],
                    signals: Iterable[signal.Signals] = STOP_SIGNALS) -> None:
    """Run callback(signal) on a dedicated thread each time one of `signals` arrives.

    Call from the main thread (the only one allowed to set handlers), once per process: the
    wakeup fd is process-wide.
    """
    wanted = {int(s) for s in signals}
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(write_fd, False)  # the C handler must never block; a full pipe drops a byte
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for signum in wanted:
        signal.signal(signum, _ignore)

    def read() -> None:
        while True:
            for signum in os.read(read_fd, 64):
                if signum in wanted:
                    try:
                        callback(signal.Signals(signum))
                    except Exception:  # the next SIGTERM must still be heard
                        log.exception("handling %s failed", signal.Signals(signum).name)

    named_thread(read, "signals").start()


def format_stacks() -> str:
    """Every thread's stack, innermost call first, in faulthandler's layout (which operators
    and our tests know), under the thread's name."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    lines = []
    for ident, frame in sys._current_frames().items():
        lines.append(f"Thread {ident:#018x} ({names.get(ident, 'unnamed')}) (most recent call first):")
        lines.extend(f'  File "{f.filename}", line {f.lineno} in {f.name}'
                     for f in reversed(traceback.extract_stack(frame)))
    return "\n".join(lines)
