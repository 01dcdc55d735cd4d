"""Listings of decoded leases, as etcd would return them, for the unit tests of flannelctl and doctor."""

from __future__ import annotations

from flanneld.etcd.client import KeyValue
from flanneld.leases.listing import Listed, Listing
from flanneld.model.lease import decode_lease


def listing(*entries: tuple[str, str, int]) -> Listing:
    """(key below subnets/, value JSON, etcd lease id — 0 for a reservation) per lease."""
    leases = {}
    for n, (key, value, lease_id) in enumerate(entries):
        kv = KeyValue(f"/coreos.com/network/subnets/{key}", value.encode(), 10 + n, 10 + n, 1, lease_id)
        leases[key] = Listed(decode_lease(key, value), kv)
    return Listing(30, leases, [])
