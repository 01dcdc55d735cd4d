"""This node's lease: acquire, renew, republish; and the one builder of create guards.

Differences from upstream, each one of its documented weak points:

* losing the allocation race retries with a fresh listing instead of exiting;
* a reservation (key without an etcd lease) is never stolen, and stays a reservation when its
  owner uses it;
* each family's subnet is unique: the create transaction guards the IPv4 key *and* every
  dual-stack key sharing that IPv4 subnet, and, when IPv6 is enabled, that no lease appeared since
  our listing;
* one etcd lease per node: renewal is a keepalive of the same etcd lease, a restart re-attaches
  to the etcd lease already holding our key, and a lease we stop using is revoked.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from flanneld.etcd.client import Compare, EtcdClient, KeyValue, prefix_range_end, unchanged
from flanneld.etcd.errors import EtcdError
from flanneld.leases.allocator import OutOfSubnets, Taken, pick_subnet
from flanneld.leases.listing import Listed
from flanneld.leases.policy import fits_config
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


class LeaseError(Exception):
    """A lease could not be acquired or kept; the message is for the operator."""


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


def reserve(etcd_client: EtcdClient, prefix: str, lease: Lease, listed_at: int) -> bool:
    """Write `lease` as a reservation (a key without TTL, never expired or given away), guarded as
    every creation is and on the listing its checks read; False when something changed since."""
    key = leases_prefix(prefix) + lease.key
    return etcd_client.txn(create_guards(prefix, lease, listed_at, listing_unchanged=True),
                        puts=[(key, encode_value(lease), 0)])


def release(etcd_client: EtcdClient, listed: Listed) -> bool:
    """Delete a listed lease or reservation unless it changed since it was listed."""
    return etcd_client.txn([unchanged(listed.kv.key, listed.kv.mod_revision)], deletes=[listed.kv.key])


class LeaseManager:
    """Acquires and keeps this node's lease."""

    def __init__(
        self,
        etcd_client: EtcdClient,
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
        self.etcd_client = etcd_client
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
        self._listing = self.etcd_client.list_prefix(head, serializable=True)
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
        revision, kvs = listing or self.etcd_client.list_prefix(head, serializable=serializable)
        # IPv4 addresses have one spelling (Go writes them so, and the codec refuses others); an
        # IPv6 one has many (2001:DB8::11, 2001:db8:0::0011): an IPv6-only node decodes every value
        needle = f'"{attrs.public_ip}"'.encode() if self.config.enable_ipv4 else b""
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
                if release(self.etcd_client, x) and x.kv.lease_id:
                    # its etcd lease carries our new key instead: one etcd lease per node, none left
                    # to linger keyless until it expires
                    self._spare_etcd_lease = x.kv.lease_id
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
        if self.own is not None and not self.own.reserved and self.etcd_client.keepalive(self.own.etcd_lease) > 0:
            return self.own.etcd_lease
        if self._spare_etcd_lease and self.etcd_client.keepalive(self._spare_etcd_lease) > 0:
            return self._spare_etcd_lease
        self._spare_etcd_lease = self.etcd_client.grant(self.ttl)
        return self._spare_etcd_lease

    def _create(self, lease: Lease, listed_at: int) -> OwnLease | None:
        self._listing = None  # we write: the watcher lists afresh (see take_listing)
        key = self.full_key(lease.key)
        etcd_lease = self._etcd_lease_for_new_key()
        if not self.etcd_client.txn(create_guards(self.prefix, lease, listed_at),
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
            left = self.etcd_client.keepalive(etcd_lease)
            if left <= 0:
                return None  # expired under us: the key is gone, list again
            expires = time.monotonic() + left
        same = encode_value(lease) == mine.kv.value
        if not same:
            self._listing = None  # we write: the watcher lists afresh (see take_listing)
        if not same and not self.etcd_client.txn(
            [unchanged(mine.kv.key, mine.kv.mod_revision)],
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
                self.etcd_client.revoke(lease_id)
            except EtcdError as exc:
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
        left = self.etcd_client.keepalive(self.own.etcd_lease)
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
        if not self.etcd_client.txn([Compare(key, "version", ">", 0)],
                                 puts=[(key, encode_value(lease), self.own.etcd_lease)]):
            return False
        self.own.lease = lease
        log.info("republished lease %s", lease.describe())
        return True
