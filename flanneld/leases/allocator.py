"""Choosing a free subnet, pure (randomness is injected so tests are deterministic).

Upstream scans SubnetMin..SubnetMax for up to 100 subnets that overlap no existing lease and
picks one at random; random choice keeps concurrent starters from all racing for the first free
subnet. We do the same per family, but test overlap against every key in etcd, reservations
included, and against the IPv4 *and* IPv6 halves of dual-stack keys separately, so one family's
subnet can never be handed out twice (upstream weak point 4).
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Iterable
from typing import Generic, TypeVar

from flanneld.model.config import FamilyConfig, IPNetwork

MAX_CANDIDATES = 100
H = TypeVar("H")


class OutOfSubnets(Exception):
    """No free subnet is left in SubnetMin..SubnetMax."""


class _Spans:
    """Held address intervals of one family, merged, for O(log n) overlap tests."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        spans = sorted((int(n.network_address), int(n.broadcast_address)) for n in networks)
        merged: list[list[int]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self._starts = [s for s, _ in merged]
        self._ends = [e for _, e in merged]

    def overlaps(self, start: int, end: int) -> bool:
        idx = bisect_right(self._starts, end) - 1
        return idx >= 0 and self._ends[idx] >= start

    def next_free(self, start: int, end: int) -> int:
        """First address >= start not inside the span that overlaps [start, end]."""
        idx = bisect_right(self._starts, end) - 1
        return self._ends[idx] + 1


class Taken(Generic[H]):
    """The subnets some key holds (a lease or a reservation), both families, each with its holder.

    The one answer to "is this subnet free?": acquisition (our previous subnet), the allocator
    (free candidates) and ``flannelctl subnets reserve`` (which also names the holder) ask it.
    """

    def __init__(self, claims: Iterable[tuple[IPNetwork, H]]) -> None:
        self._claims = list(claims)
        self._spans = {version: _Spans(n for n, _ in self._claims if n.version == version) for version in (4, 6)}

    @classmethod
    def of(cls, networks: Iterable[IPNetwork]) -> Taken[None]:
        return Taken((n, None) for n in networks)

    def overlaps(self, subnet: IPNetwork) -> bool:
        return self._spans[subnet.version].overlaps(int(subnet.network_address), int(subnet.broadcast_address))

    def holder(self, subnet: IPNetwork) -> H | None:
        """The first claim's holder (in the order given) whose subnet overlaps `subnet`."""
        return next((h for n, h in self._claims if n.version == subnet.version and n.overlaps(subnet)), None)


def free_subnets(family: FamilyConfig, taken: Taken, limit: int = MAX_CANDIDATES) -> list[IPNetwork]:
    """Up to `limit` subnets of the range, in order, that overlap nothing taken."""
    occupied = taken._spans[family.version]
    size = family.subnet_size()
    cursor, last = int(family.subnet_min), int(family.subnet_max)
    found: list[IPNetwork] = []
    while cursor <= last and len(found) < limit:
        end = cursor + size - 1
        if occupied.overlaps(cursor, end):
            # jump past the occupied span, re-aligned to the subnet grid
            free_from = occupied.next_free(cursor, end)
            cursor = max(cursor + size, (free_from + size - 1) // size * size)
            continue
        found.append(family.family.network(cursor, family.subnet_len))
        cursor += size
    return found


def pick_subnet(family: FamilyConfig, taken: Taken, rng: random.Random) -> IPNetwork:
    """A random free subnet. Raises OutOfSubnets with the range in the message."""
    candidates = free_subnets(family, taken)
    if not candidates:
        raise OutOfSubnets(
            f"out of subnets: every /{family.subnet_len} in {family.subnet_min} .. {family.subnet_max}"
            f" of {family.network} is leased or reserved"
        )
    return rng.choice(candidates)
