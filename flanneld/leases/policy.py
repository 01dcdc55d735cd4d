"""The rules a cluster's leases live by, beyond a single node's: what flannelctl enforces before it
reserves a subnet or writes a new network config, and whether a lease fits a config at all.

Pure functions of a listing and configs: the daemon's acquisition and flannelctl ask the same
questions here (one :class:`~flanneld.leases.allocator.Taken` behind "is this subnet free?").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from flanneld.leases.allocator import Taken
from flanneld.leases.listing import Listed, Listing
from flanneld.model.config import IPNetwork, NetworkConfig
from flanneld.model.family import family_of
from flanneld.model.lease import Lease


def fits_config(lease_subnet: IPNetwork | None, lease_subnet6: IPNetwork | None, config: NetworkConfig) -> bool:
    """Both halves of a lease match the families the config enables (upstream compat check)."""
    v4_ok = config.ipv4.fits(lease_subnet) if config.ipv4 else lease_subnet is None
    v6_ok = config.ipv6.fits(lease_subnet6) if config.ipv6 else lease_subnet6 is None
    return v4_ok and v6_ok


def taken(listing: Listing) -> Taken[Listed]:
    """The subnets the listing's leases and reservations hold, each with its holder."""
    return Taken((n, listed) for listed in listing.leases.values()
                 for n in (listed.lease.subnet, listed.lease.subnet6) if n is not None)


def reservation_problem(subnet: IPNetwork, public_ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                        config: NetworkConfig, listing: Listing) -> str:
    """Why `subnet` cannot be reserved for `public_ip` ('' when it can)."""
    fam = config.of(family_of(subnet.version))
    if fam is None:
        return f"the network config does not enable IPv{subnet.version}"
    if subnet.prefixlen != fam.subnet_len:
        return f"{subnet} is a /{subnet.prefixlen} but the config leases /{fam.subnet_len} subnets (SubnetLen)"
    if not fam.fits(subnet):
        return (f"{subnet} is outside the allocation range {fam.subnet_min}..{fam.subnet_max} of "
                f"{fam.network}")
    if public_ip.version != subnet.version and subnet.version == 4:
        return f"an IPv4 reservation needs an IPv4 public IP, not {public_ip}"
    holder = taken(listing).holder(subnet)
    if holder is not None:
        lease = holder.lease
        who = family_of(4).public(lease) or lease.public_ipv6 or "no public IP"
        what = "reserved for" if holder.reserved else "leased by"
        return f"{subnet} is taken: {lease.key} is {what} {who}"
    for listed in listing.leases.values():
        lease = listed.lease
        if public_ip in (lease.public_ip, lease.public_ipv6):
            what = "a reservation" if listed.reserved else "a lease"
            return (f"{public_ip} already holds {lease.key} ({what}); a node uses one subnet per family — "
                    "release that first")
    return ""


def config_change_problems(old: NetworkConfig | None, new: NetworkConfig, leases: Sequence[Lease]) -> list[str]:
    """Changes a running cluster cannot take while leases exist (empty list: safe)."""
    if not leases:
        return []
    problems = []
    if old is not None and old.backend.type != new.backend.type:
        problems.append(f"backend type changes from {old.backend.type!r} to {new.backend.type!r}: every node "
                        "would have to be reconfigured at once")
    for version, before, after in ((4, old.ipv4 if old else None, new.ipv4), (6, old.ipv6 if old else None,
                                                                              new.ipv6)):
        if before is not None and after is not None and before.subnet_len != after.subnet_len:
            problems.append(f"IPv{version} SubnetLen changes from {before.subnet_len} to {after.subnet_len}: "
                            "existing leases no longer fit and every node would renumber its pods")
    misfits = [lease.key for lease in leases if not fits_config(lease.subnet, lease.subnet6, new)]
    if misfits and not any("SubnetLen" in p for p in problems):
        shown = ", ".join(misfits[:5]) + (f" and {len(misfits) - 5} more" if len(misfits) > 5 else "")
        problems.append(f"{len(misfits)} existing lease(s) would not fit the new config: {shown}")
    return problems
