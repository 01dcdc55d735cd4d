"""Stop signals delivered to an ordinary thread, and stack dumps on SIGUSR1.

A Python signal handler runs in the main thread between two of its bytecodes, possibly while
that thread holds a lock: inside ``queue.Queue.get`` (its mutex, while it removes a timed-out
waiter) or ``threading.Event.wait``. A handler that takes the same lock, by putting on that
queue or setting that event, then waits on its own thread forever, and the daemon ignores
SIGTERM until systemd kills it. So the Python-level handler installed here does nothing: the
interpreter's C handler writes the signal's number to a wakeup pipe (``signal.set_wakeup_fd``)
and a thread of our own reads it and runs the callback, where taking any lock is safe.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable

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

    threading.Thread(target=read, name="signals", daemon=True).start()


def dump_stacks_on(signum: signal.Signals = signal.SIGUSR1) -> None:
    """`kill -USR1` prints every thread's stack to stderr (the journal) and the daemon goes on."""
    faulthandler.register(signum, all_threads=True, chain=False)
