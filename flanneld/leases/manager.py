"""Lease manager: acquire, renew and watch subnet leases in etcd (uses the registry).

Differences from upstream, each one of its documented weak points:

* losing the allocation race retries with a fresh listing instead of exiting;
* a reservation (key without an etcd lease) is never stolen, and stays a reservation when its
  owner uses it;
* each family's subnet is unique: the create transaction guards the IPv4 key *and* every
  dual-stack key sharing that IPv4 subnet, and, when IPv6 is enabled, that no lease appeared since
  our listing;
* one etcd lease per node: renewal is a keepalive of the same etcd lease, a restart re-attaches
  to the etcd lease already holding our key, and a lease we stop using is revoked;
* the watcher never drops the peers it knows on a bad value or a transient error, and re-lists
  and diffs after a compaction.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from flanneld.etcd.client import Compacted, Compare, KeyValue, Registry, RegistryError, WatchBatch, prefix_range_end
from flanneld.leases.allocator import OutOfSubnets, Taken, pick_subnet
from flanneld.model.config import IPNetwork, NetworkConfig
from flanneld.model.lease import (
    Lease,
    LeaseAttrs,
    LeaseDecodeError,
    decode_lease,
    encode_value,
    leases_prefix,
    parse_subnet_key,
    subnet_key,
)
from flanneld.model.subnetenv import SubnetEnv

log = logging.getLogger(__name__)

SUBNET_TTL = 24 * 3600
MAX_ATTEMPTS = 50
# A broken watch is retried at most this far apart: once etcd is back, peers are seen again within
# about this long (plus gRPC's own reconnect backoff, capped at 1 s by the registry).
WATCH_RETRY_MAX = 1.0


class LeaseError(Exception):
    """A lease could not be acquired or kept; the message is for the operator."""


@dataclass(frozen=True, slots=True)
class Listed:
    """A decoded lease with the etcd metadata of its key."""

    lease: Lease
    kv: KeyValue

    @property
    def reserved(self) -> bool:
        return self.kv.lease_id == 0


@dataclass(frozen=True)
class Listing:
    revision: int
    leases: dict[str, Listed]  # by key below <prefix>/subnets/
    junk: list[tuple[str, str]]  # (full key, reason)


def decode_listing(prefix: str, revision: int, kvs: Iterable[KeyValue]) -> Listing:
    """Decode a listing of <prefix>/subnets/; malformed entries go to `junk`, never raise."""
    head = leases_prefix(prefix)
    leases: dict[str, Listed] = {}
    junk: list[tuple[str, str]] = []
    for kv in kvs:
        try:
            if not kv.key.startswith(head):
                raise LeaseDecodeError(f"{kv.key!r} is not under {head}")
            lease = decode_lease(kv.key[len(head):], kv.value)
        except LeaseDecodeError as exc:
            junk.append((kv.key, str(exc)))
            continue
        leases[lease.key] = Listed(lease, kv)
    return Listing(revision, leases, junk)


def list_leases(registry: Registry, prefix: str) -> Listing:
    revision, kvs = registry.list_prefix(leases_prefix(prefix))
    return decode_listing(prefix, revision, kvs)


@dataclass
class OwnLease:
    lease: Lease
    etcd_lease: int  # 0: a reservation, never expires
    expires_at: float | None  # time.monotonic() deadline; None for reservations

    @property
    def reserved(self) -> bool:
        return self.etcd_lease == 0


def _is_ours(lease: Lease, attrs: LeaseAttrs, config: NetworkConfig) -> bool:
    if config.enable_ipv4:
        return int(attrs.public_ip) != 0 and lease.public_ip == attrs.public_ip
    return attrs.public_ipv6 is not None and lease.public_ipv6 == attrs.public_ipv6


def fits_config(lease_subnet: IPNetwork | None, lease_subnet6: IPNetwork | None, config: NetworkConfig) -> bool:
    """Both halves of a lease match the families the config enables (upstream compat check)."""
    v4_ok = config.ipv4.fits(lease_subnet) if config.ipv4 else lease_subnet is None
    v6_ok = config.ipv6.fits(lease_subnet6) if config.ipv6 else lease_subnet6 is None
    return v4_ok and v6_ok


def create_guards(prefix: str, lease: Lease, listed_at: int, *, listing_unchanged: bool = False) -> list[Compare]:
    """The guards of a transaction that creates `lease`'s key, given a listing read at `listed_at`.

    Acquisition and ``flannelctl subnets reserve`` both create keys through them, so neither
    can hand out a subnet some key holds: the key itself is absent; for IPv4, its subnet's own
    key and every dual-stack key with that IPv4 half (``<v4>&…``) are absent — a narrow guard,
    so that a restart storm's renewals do not fail each other's creates; for IPv6, whose subnet
    can sit behind any IPv4 half, nothing under the prefix changed since the listing. A caller
    whose decision read the whole listing (reserve: one subnet per public IP) asks for that last
    guard whatever the families (`listing_unchanged`).
    """
    head = leases_prefix(prefix)
    guards = [Compare(head + lease.key, "version", "==", 0)]
    if lease.subnet is not None:
        v4_key = head + subnet_key(lease.subnet, None)
        guards.append(Compare(v4_key, "version", "==", 0))
        guards.append(Compare(v4_key + "&", "version", "==", 0, range_end=prefix_range_end(v4_key + "&")))
    if lease.subnet6 is not None or listing_unchanged:
        guards.append(Compare(head, "mod", "<", listed_at + 1, range_end=prefix_range_end(head)))
    return guards


class LeaseManager:
    """Acquires and keeps this node's lease."""

    def __init__(
        self,
        registry: Registry,
        config: NetworkConfig,
        prefix: str,
        *,
        ttl: int = SUBNET_TTL,
        renew_margin: float = 3600,
        previous: SubnetEnv | None = None,
        rng: random.Random | None = None,
        recognizes: Callable[[Lease], bool] | None = None,
    ) -> None:
        if renew_margin >= ttl:
            raise LeaseError(f"renew margin ({renew_margin:.0f}s) must be shorter than the lease TTL ({ttl}s)")
        self.registry = registry
        self.config = config
        self.prefix = prefix
        self.ttl = ttl
        self.renew_margin = renew_margin
        self.rng = rng or random.SystemRandom()
        self.previous = (
            (previous.lease_subnet, previous.lease_subnet6) if previous is not None else (None, None)
        )
        self.own: OwnLease | None = None
        # find_own's listing, reused by the first acquisition attempt and handed to the watcher:
        # a start lists the leases once, not three times (a restart storm of N nodes is N listings)
        self._listing: tuple[int, list[KeyValue]] | None = None
        self._spare_etcd_lease = 0  # granted for a create that lost its race; reused, never leaked
        # Whether a lease was published by this node even though its public IP is not ours (the
        # backend's own evidence, e.g. our VTEP MAC): a node whose address changed keeps its subnet.
        self.recognizes = recognizes
        # renew up to a tenth of the margin (at most a minute) early, differently on every node:
        # nodes started together (a rolling upgrade, a power event) do not all renew together
        self.renew_jitter = self.rng.uniform(0, min(60.0, renew_margin / 10))

    def full_key(self, key: str) -> str:
        return leases_prefix(self.prefix) + key

    # -- acquisition -------------------------------------------------------------------------

    def find_own(self, attrs: LeaseAttrs) -> Lease | None:
        """Our existing lease (by public IP) if it fits the config: lets a restart reuse its MAC.

        A serializable read: a member's (or a proxy's cached) view is good enough for a hint.
        """
        head = leases_prefix(self.prefix)
        self._listing = self.registry.list_prefix(head, serializable=True)
        mine = self._own_candidate(self._scan(attrs, listing=self._listing)[2])
        return mine.lease if mine is not None else None

    def take_listing(self) -> tuple[int, list[KeyValue]] | None:
        """The listing find_own made (once; None after), for the watcher's first resync; None too
        when acquiring our lease wrote to etcd (a new node, a changed lease).

        A restart that finds its lease unchanged (a restart storm: every node) lists once. A node
        that wrote lists again after its write, so that being ready still means every lease that
        existed before ours is programmed (peers joining after it arrive by the watch either way).
        """
        listing, self._listing = self._listing, None
        return listing

    def _scan(self, attrs: LeaseAttrs, serializable: bool = False,
              listing: tuple[int, list[KeyValue]] | None = None) -> tuple[int, list[KeyValue], list[Listed]]:
        """List the leases: (revision, the listing, our own entries).

        Ours are the leases with our public IP and, if none has it, the lease of our previous
        subnet when the backend recognizes it as published by this node (its address changed).
        Only those values are decoded, and no other key is parsed: a node restarting among
        thousands of leases (every node, in a restart storm) finds its own by a byte search.
        """
        head = leases_prefix(self.prefix)
        revision, kvs = listing or self.registry.list_prefix(head, serializable=serializable)
        marker = str(attrs.public_ip) if self.config.enable_ipv4 else str(attrs.public_ipv6)
        needle = f'"{marker}"'.encode()
        previous = subnet_key(*self.previous) if any(self.previous) else None
        mine: list[Listed] = []
        recognized: list[Listed] = []
        for kv in kvs:
            short = kv.key[len(head):]
            if needle in kv.value or (short == previous and self.recognizes is not None):
                with contextlib.suppress(LeaseDecodeError):
                    lease = decode_lease(short, kv.value)
                    if _is_ours(lease, attrs, self.config):
                        mine.append(Listed(lease, kv))
                    elif short == previous and self.recognizes is not None and self.recognizes(lease):
                        recognized.append(Listed(lease, kv))
        if not mine and recognized:
            old = recognized[0].lease
            log.warning("our previous lease %s names public address %s, but it carries this node's backend "
                        "identity: our address changed, keeping the subnet", old.describe(),
                        old.public_ip if self.config.enable_ipv4 else old.public_ipv6)
            mine = recognized
        return revision, kvs, mine

    def _taken(self, kvs: list[KeyValue]) -> Taken[str]:
        """Every subnet some key of the listing claims (keys that are not subnet keys claim none)."""
        head = len(leases_prefix(self.prefix))
        claims: list[tuple[IPNetwork, str]] = []
        for kv in kvs:
            with contextlib.suppress(LeaseDecodeError):
                claims += [(n, kv.key) for n in parse_subnet_key(kv.key[head:]) if n is not None]
        return Taken(claims)

    def _own_candidate(self, mine: list[Listed]) -> Listed | None:
        fitting = [x for x in mine if fits_config(x.lease.subnet, x.lease.subnet6, self.config)]
        # an operator's reservation wins over a leftover lease; then the newest write
        fitting.sort(key=lambda x: (x.reserved, x.kv.mod_revision), reverse=True)
        return fitting[0] if fitting else None

    def acquire(self, attrs: LeaseAttrs) -> OwnLease:
        """Get a lease for this node: reuse ours, else the previous subnet, else a random one."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            # The first try reads serializably (cheap for etcd in a restart storm; a proxy answers
            # from its cache), or takes find_own's listing, which was read so. Every write is
            # guarded by a transaction the leader checks, so a stale view can only lose the race,
            # never hand out a taken subnet; later tries read linearizably.
            # (scanned again: the backend recognizes its own identity only once its devices exist)
            outcome = self._try_acquire(attrs, serializable=attempt == 1,
                                        listing=self._listing if attempt == 1 else None)
            if outcome is not None:
                self._settle(outcome)
                return outcome
            # lost a race: another node took the subnet between our listing and our create
            time.sleep(self.rng.uniform(0, 0.02 * min(attempt, 10)))
        raise LeaseError(f"could not acquire a subnet lease after {MAX_ATTEMPTS} attempts (heavy contention)")

    def _try_acquire(self, attrs: LeaseAttrs, serializable: bool = False,
                     listing: tuple[int, list[KeyValue]] | None = None) -> OwnLease | None:
        revision, kvs, mine_all = self._scan(attrs, serializable, listing)
        mine = self._own_candidate(mine_all)
        if mine is not None:
            return self._reuse(mine, attrs)
        for x in mine_all:
            if not x.reserved:
                # ours by IP, but from an older config (e.g. another SubnetLen): give it back
                log.info("deleting our lease %s: it does not fit the current network config", x.lease.describe())
                self._listing = None  # we write: the watcher lists afresh (see take_listing)
                self.registry.txn([Compare(x.kv.key, "mod", "==", x.kv.mod_revision)], deletes=[x.kv.key])
            else:
                log.warning("reservation %s for our public IP does not fit the network config; ignoring it",
                            x.lease.describe())

        taken = self._taken(kvs)
        subnet, subnet6 = self.previous
        if (subnet or subnet6) and fits_config(subnet, subnet6, self.config) and all(
            n is None or not taken.overlaps(n) for n in (subnet, subnet6)
        ):
            shown = "+".join(str(n) for n in (subnet, subnet6) if n)
            log.info("trying the previous subnet %s from the subnet file", shown)
        else:
            try:
                picked = {fc.version: pick_subnet(fc, taken, self.rng) for fc in self.config.families()}
                subnet, subnet6 = picked.get(4), picked.get(6)
            except OutOfSubnets as exc:
                raise LeaseError(str(exc)) from None
        lease = attrs.lease(subnet, subnet6)  # type: ignore[arg-type]
        return self._create(lease, revision)

    def _etcd_lease_for_new_key(self) -> int:
        if self.own is not None and not self.own.reserved and self.registry.keepalive(self.own.etcd_lease) > 0:
            return self.own.etcd_lease
        if self._spare_etcd_lease and self.registry.keepalive(self._spare_etcd_lease) > 0:
            return self._spare_etcd_lease
        self._spare_etcd_lease = self.registry.grant(self.ttl)
        return self._spare_etcd_lease

    def _create(self, lease: Lease, listed_at: int) -> OwnLease | None:
        self._listing = None  # we write: the watcher lists afresh (see take_listing)
        key = self.full_key(lease.key)
        etcd_lease = self._etcd_lease_for_new_key()
        if not self.registry.txn(create_guards(self.prefix, lease, listed_at),
                                 puts=[(key, encode_value(lease), etcd_lease)]):
            log.info("lost the race for %s, retrying", lease.describe())
            return None
        log.info("allocated subnet lease %s", lease.describe())
        return OwnLease(lease, etcd_lease, time.monotonic() + self.ttl)

    def _reuse(self, mine: Listed, attrs: LeaseAttrs) -> OwnLease | None:
        lease = attrs.lease(mine.lease.subnet, mine.lease.subnet6, mine.lease.extra)
        etcd_lease = mine.kv.lease_id
        expires: float | None = None
        if etcd_lease:
            left = self.registry.keepalive(etcd_lease)
            if left <= 0:
                return None  # expired under us: the key is gone, list again
            expires = time.monotonic() + left
        unchanged = encode_value(lease) == mine.kv.value
        if not unchanged:
            self._listing = None  # we write: the watcher lists afresh (see take_listing)
        if not unchanged and not self.registry.txn(
            [Compare(mine.kv.key, "mod", "==", mine.kv.mod_revision)],
            puts=[(mine.kv.key, encode_value(lease), etcd_lease)],
        ):
            return None
        kind = "reservation" if not etcd_lease else "lease"
        log.info("reusing our %s %s", kind, lease.describe())
        # no read-back: had the key changed since the (serializable) listing, the watch, which
        # starts from that listing's revision, brings the change and the loop restores or
        # re-acquires our lease
        return OwnLease(lease, etcd_lease, expires)

    def _settle(self, new: OwnLease) -> None:
        """Adopt `new`; revoke any etcd lease we no longer use so at most one exists."""
        unused = {self._spare_etcd_lease, self.own.etcd_lease if self.own else 0} - {0, new.etcd_lease}
        for lease_id in unused:
            try:
                self.registry.revoke(lease_id)
            except RegistryError as exc:
                log.warning("could not revoke unused etcd lease %x: %s", lease_id, exc)
        self._spare_etcd_lease = 0
        self.own = new
        self.previous = (new.lease.subnet, new.lease.subnet6)

    # -- keeping it --------------------------------------------------------------------------

    def seconds_until_renewal(self) -> float | None:
        """None for reservations (nothing to renew)."""
        if self.own is None or self.own.expires_at is None:
            return None
        return max(0.0, self.own.expires_at - self.renew_margin - self.renew_jitter - time.monotonic())

    def renew(self) -> bool:
        """Keep our etcd lease alive; False when it is gone (the key went with it)."""
        if self.own is None or self.own.reserved:
            return True
        left = self.registry.keepalive(self.own.etcd_lease)
        if left <= 0:
            log.warning("our etcd lease %x has expired; the subnet must be re-acquired", self.own.etcd_lease)
            return False
        self.own.expires_at = time.monotonic() + left
        log.info("renewed lease %s for %ds", self.own.lease.describe(), left)
        return True

    def republish(self, attrs: LeaseAttrs) -> bool:
        """Write new attributes (e.g. a new VTEP MAC) into our existing key; False if it is gone."""
        assert self.own is not None
        lease = attrs.lease(self.own.lease.subnet, self.own.lease.subnet6, self.own.lease.extra)
        key = self.full_key(lease.key)
        if not self.registry.txn([Compare(key, "version", ">", 0)],
                                 puts=[(key, encode_value(lease), self.own.etcd_lease)]):
            return False
        self.own.lease = lease
        log.info("republished lease %s", lease.describe())
        return True


# ---------------------------------------------------------------------------------------------
# watching


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

    def __init__(self, registry: Registry, prefix: str) -> None:
        self.registry = registry
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
        return self.registry.list_prefix(self.head, serializable=True)

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
                             lease if keep_decoded else None)
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
            events.append(LeaseEvent("added" if old is None else "changed", short, kv.value, kv.lease_id, lease))
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
        """Watch until stop(); emit every non-empty batch of events. Never raises RegistryError.

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
                watch = self.registry.watch_prefix(self.head, self.revision + 1)
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
                    raise RegistryError("etcd closed the watch stream")
            except Compacted as exc:
                log.warning("lease watch fell behind compaction (%s); re-listing", exc)
                self.relists += 1
                need_list = True
            except RegistryError as exc:
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
