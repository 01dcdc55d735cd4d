"""All leases under a prefix, decoded: what flannelctl shows and the daemon's start scans.

A malformed entry is reported as junk with its reason, never raised: one bad key never hides
the others.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flanneld.etcd.client import EtcdClient, KeyValue
from flanneld.model.lease import Lease, LeaseDecodeError, decode_lease, leases_prefix


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


def list_leases(etcd_client: EtcdClient, prefix: str) -> Listing:
    revision, kvs = etcd_client.list_prefix(leases_prefix(prefix))
    return decode_listing(prefix, revision, kvs)
