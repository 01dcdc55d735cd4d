"""Watching the leases: a view of every peer's lease kept in sync with etcd, reported as events.

The watcher never drops the peers it knows on a bad value or a transient error, and re-lists
and diffs after a compaction.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from flanneld.etcd.client import EtcdClient, KeyValue, WatchBatch
from flanneld.etcd.errors import Compacted, EtcdError
from flanneld.model.lease import (
    Lease,
    LeaseDecodeError,
    decode_lease,
    leases_prefix,
)

log = logging.getLogger(__name__)


# A broken watch is retried at most this far apart: once etcd is back, peers are seen again within
# about this long (plus gRPC's own reconnect backoff, capped at 1 s by the etcd client).
WATCH_RETRY_MAX = 1.0


@dataclass(frozen=True, slots=True)
class LeaseEvent:
    """A lease came, changed or went. Carries the raw value (for "removed": the last known one).

    The value was validated when the event was made, by decoding it. That decoded lease may ride
    along (`decoded`: watch batches, which are small, and the start's listing, planned as it is
    read) so the loop plans it without decoding it again; otherwise `lease` decodes on access.
    """

    kind: str  # "added" | "changed" | "removed"
    key: str  # below <prefix>/subnets/
    value: bytes
    etcd_lease: int = 0
    decoded: Lease | None = field(default=None, compare=False, repr=False)
    create_revision: int = 0  # of the key (not on "removed"): of overlapping leases the older is programmed

    @property
    def lease(self) -> Lease:
        return self.decoded if self.decoded is not None else decode_lease(self.key, self.value)


class LeaseWatcher:
    """Keeps a view of all leases in sync with etcd and reports changes as LeaseEvents.

    Snapshot at revision R, watch from R+1; after a broken stream resume from the last revision
    seen; after a compaction re-list and diff against what is known, synthesising adds, changes
    and removals. A malformed key or value is reported once and otherwise ignored: a lease we
    knew keeps its last good value.
    """

    def __init__(self, etcd_client: EtcdClient, prefix: str) -> None:
        self.etcd_client = etcd_client
        self.prefix = prefix
        self.head = leases_prefix(prefix)
        # per key: (raw value, etcd lease); a decoded Lease per peer would cost ~1 KB of RSS each
        self.known: dict[str, tuple[bytes, int]] = {}
        self.revision = 0
        self.connected = False
        self.last_error = ""
        # read by /metrics at scrape time; written only by the watcher's own thread
        self.reconnects = 0
        self.relists = 0
        self.last_response = time.monotonic()
        self._warned: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._watch = None
        self._lock = threading.Lock()
        self._jitter = random.Random()

    # -- pure-ish state transitions ----------------------------------------------------------

    def _warn_junk(self, key: str, mod_revision: int, reason: str) -> None:
        if (key, mod_revision) not in self._warned:
            self._warned.add((key, mod_revision))
            log.warning("ignoring malformed lease entry %s: %s", key, reason)

    def serializable_listing(self) -> tuple[int, list[KeyValue]]:
        """A serializable listing: a restart storm of N nodes costs the leader nothing and a gRPC
        proxy can answer from its cache. Nothing is missed: the watch starts right after the
        revision the listing reflects, however far behind the answering member was."""
        return self.etcd_client.list_prefix(self.head, serializable=True)

    def resync(self, listing: tuple[int, list[KeyValue]] | None = None) -> list[LeaseEvent]:
        """List everything (or take `listing`, one made moments ago), diff against what we know,
        adopt the listing. The events carry raw values only (they cross to the loop thread in one
        list: a re-list of thousands must not hold thousands of decoded leases at once)."""
        return list(self.adopt(listing or self.serializable_listing(), keep_decoded=False))

    def adopt(self, listing: tuple[int, list[KeyValue]], keep_decoded: bool = True) -> Iterator[LeaseEvent]:
        """The events that turn what we know into `listing`, one at a time; the view becomes the
        listing once they are all taken. With `keep_decoded` each event carries the lease it
        was validated as: a consumer that plans each as it comes (the start) decodes nothing
        twice and holds one decoded lease at a time."""
        revision, kvs = listing
        bad_keys = set()
        fresh: dict[str, tuple[bytes, int]] = {}
        for kv in kvs:
            key = kv.key[len(self.head):]
            old = self.known.get(key)
            if old is not None and old[0] == kv.value:
                fresh[key] = (kv.value, kv.lease_id)  # unchanged: validated when it came
                continue
            try:
                lease = decode_lease(key, kv.value)
            except LeaseDecodeError as exc:
                self._warn_junk(kv.key, kv.mod_revision, str(exc))
                bad_keys.add(key)
                continue
            fresh[key] = (kv.value, kv.lease_id)
            yield LeaseEvent("added" if old is None else "changed", key, kv.value, kv.lease_id,
                             lease if keep_decoded else None, kv.create_revision)
        for key, old in self.known.items():
            if key in fresh:
                continue
            if key in bad_keys:
                fresh[key] = old  # still there but unreadable now: keep the last good value
            else:
                yield self._removed(key, old)
        self.known = fresh
        self.revision = revision

    def apply(self, batch: WatchBatch) -> list[LeaseEvent]:
        """Fold one watch batch into the view."""
        events: list[LeaseEvent] = []
        for ev in batch.events:
            kv = ev.kv
            self.revision = max(self.revision, kv.mod_revision)
            if not kv.key.startswith(self.head):
                continue
            short = kv.key[len(self.head):]
            if ev.deleted:
                old = self.known.pop(short, None)
                if old is not None:
                    events.append(self._removed(short, old))
                continue
            old = self.known.get(short)
            if old is not None and old[0] == kv.value:
                self.known[short] = (kv.value, kv.lease_id)  # rewritten unchanged (a new etcd lease)
                continue
            try:
                lease = decode_lease(short, kv.value)
            except LeaseDecodeError as exc:
                self._warn_junk(kv.key, kv.mod_revision, str(exc))
                continue
            self.known[short] = (kv.value, kv.lease_id)
            events.append(LeaseEvent("added" if old is None else "changed", short, kv.value, kv.lease_id, lease,
                                     kv.create_revision))
        if not batch.events and not batch.created:
            # progress notification: everything up to the header revision has been delivered
            self.revision = max(self.revision, batch.revision)
        return events

    @staticmethod
    def _removed(key: str, last: tuple[bytes, int]) -> LeaseEvent:
        """A removal event carrying the last value we saw."""
        return LeaseEvent("removed", key, last[0], last[1])

    # -- the loop ----------------------------------------------------------------------------

    def run(self, emit: Callable[[list[LeaseEvent]], None]) -> None:
        """Watch until stop(); emit every non-empty batch of events. Never raises EtcdError.

        Starts with a listing unless resync() already ran, in which case it resumes from there.
        """
        backoff = 0.1
        need_list = self.revision == 0
        while not self._stop.is_set():
            try:
                if need_list:
                    events = self.resync()
                    need_list = False
                    if events:
                        emit(events)
                else:  # resuming: is the history still there? (a proxy may not say; see check_history)
                    self.etcd_client.check_history(self.head, self.revision)
                watch = self.etcd_client.watch_prefix(self.head, self.revision + 1)
                with self._lock:
                    if self._stop.is_set():
                        watch.cancel()
                        break
                    self._watch = watch
                for batch in watch:
                    self.last_response = time.monotonic()
                    if not self.connected:
                        self.connected = True
                        self.last_error = ""
                        log.info("watching leases from revision %d", self.revision + 1)
                    backoff = 0.1
                    events = self.apply(batch)
                    if events:
                        emit(events)
                if not self._stop.is_set():
                    raise EtcdError("etcd closed the watch stream")
            except Compacted as exc:
                log.warning("lease watch fell behind compaction (%s); re-listing", exc)
                self.relists += 1
                need_list = True
            except EtcdError as exc:
                if self._stop.is_set():
                    break
                if self.connected or self.last_error != str(exc):
                    log.warning("lease watch interrupted: %s; resuming from revision %d", exc, self.revision + 1)
                self.connected = False
                self.last_error = str(exc)
                self.reconnects += 1
                self._stop.wait(backoff * self._jitter.uniform(0.8, 1.2))  # nodes must not retry in step
                backoff = min(backoff * 2, WATCH_RETRY_MAX)
            finally:
                with self._lock:
                    self._watch = None

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._watch is not None:
                self._watch.cancel()
