"""What other threads send the daemon's loop thread, which owns all of the node's mutable state.

The watcher thread sends lease batches, the netlink monitor thread raw notification batches
(the loop decides what is drift: it owns the reconciler's maps), the signal handler a stop.
"""

from __future__ import annotations

from dataclasses import dataclass

from flanneld.leases.watcher import LeaseEvent


@dataclass(frozen=True, slots=True)
class LeaseBatch:
    events: list[LeaseEvent]
    received: float  # time.monotonic() when the watcher got them from etcd: event → kernel latency


@dataclass(frozen=True, slots=True)
class NetlinkBatch:
    """Raw (message type, payload) notifications; None when the kernel dropped some (buffer overflow)."""

    messages: list[tuple[int, bytes]] | None


@dataclass(frozen=True, slots=True)
class Stop:
    pass


Event = LeaseBatch | NetlinkBatch | Stop
