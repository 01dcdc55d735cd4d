"""The daemon's threads, named for the kernel as well as for Python.

Python names a thread for itself only; the kernel keeps calling every thread of the daemon
"flanneld" (or "python3"). Naming each one (``prctl(PR_SET_NAME)``, the name ``top -H``,
``ps -L`` and ``/proc/<pid>/task/<tid>/comm`` show) lets an operator see which thread burns CPU
and lets a benchmark measure one thread's CPU exactly (its ``schedstat``), the prober's say.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any

PR_SET_NAME = 15
COMM_MAX = 15  # the kernel's limit on a thread's name, without the terminating NUL

_libc = ctypes.CDLL(None)  # the interpreter's own symbols, libc's among them (no library search)


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` in the kernel (cut to the kernel's 15 bytes)."""
    _libc.prctl(PR_SET_NAME, name.encode()[:COMM_MAX], 0, 0, 0)


def named_thread(target: Callable[..., Any], name: str, args: tuple[Any, ...] = ()) -> threading.Thread:
    """A daemon thread (not started) that runs `target(*args)` under `name`, for Python and the kernel."""
    def run() -> None:
        name_os_thread(name)
        target(*args)

    return threading.Thread(target=run, name=name, daemon=True)
