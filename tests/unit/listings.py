"""Listings of decoded leases, as etcd would return them, for the unit tests of flannelctl, its policy and doctor."""

from __future__ import annotations

from flanneld.etcd.client import KeyValue
from flanneld.leases.listing import Listed, Listing
from flanneld.model.config import parse_config
from flanneld.model.lease import decode_lease


def listing(*entries: tuple[str, str, int]) -> Listing:
    """(key below subnets/, value JSON, etcd lease id — 0 for a reservation) per lease."""
    leases = {}
    for n, (key, value, lease_id) in enumerate(entries):
        kv = KeyValue(f"/coreos.com/network/subnets/{key}", value.encode(), 10 + n, 10 + n, 1, lease_id)
        leases[key] = Listed(decode_lease(key, value), kv)
    return Listing(30, leases, [])


# A small cluster, shared by the view and policy tests: two live leases and a reservation.
V4 = parse_config('{"Network": "198.18.0.0/16", "SubnetMin": "198.18.1.0", "SubnetMax": "198.18.200.0"}')
DUAL = parse_config('{"Network": "198.18.0.0/16", "EnableIPv6": true, "IPv6Network": "2001:db8:1800::/56"}')


def value(public: str, mac: str, extra: str = "") -> str:
    return (f'{{"PublicIP":"{public}","PublicIPv6":null,"BackendType":"vxlan",'
            f'"BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}{extra}}}')


LISTING = listing(
    ("198.18.9.0-24", value("198.51.100.19", "0e:00:00:00:00:09"), 0x9),
    ("198.18.2.0-24", value("198.51.100.12", "0e:00:00:00:00:02", ',"Future":{"a":1}'), 0x2),
    ("198.18.5.0-24", value("198.51.100.15", "0e:00:00:00:00:05"), 0),
)
