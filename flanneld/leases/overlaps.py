"""Which of overlapping leases is programmed: one rule, asked by the daemon, doctor and flannelctl.

Two leases whose subnets overlap (a lease of another size inside a live node's subnet: a node
started with another SubnetLen, a hand-made reservation) cannot both be programmed: with VXLAN
both claim the same VTEP address, so the second neighbour entry replaces the first and every
node loses the live node's pods. So one wins: our own lease over any peer's, a lease that fits
the network config over a misfit, and between equals the older by etcd create revision (the key
breaks a tie of one transaction). A lease is programmed when no lease that outranks it *and is
programmed* overlaps it; the rest wait, and are programmed again as soon as the overlap ends.

Kept incrementally (every lease event costs a dictionary look-up per prefix length present, as
leases normally share one SubnetLen) so thousands of peers cost nothing extra; only the group of
leases that overlap each other is decided again when one of them changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from flanneld.model.config import IPNetwork, NetworkConfig
from flanneld.model.family import family_of
from flanneld.model.lease import Lease, parse_subnet_key

OWN, FITS, MISFIT = 0, 1, 2  # the first part of a rank: lower wins


@dataclass(frozen=True, slots=True, order=True)
class Rank:
    """How a lease ranks among leases overlapping it: lower wins (the key breaks a tie)."""

    kind: int  # OWN | FITS | MISFIT
    revision: int  # etcd create revision of its key

    def packed(self) -> int:
        """One small int (28 bytes, where the pair costs 100): revision, then kind in 2 bits."""
        return self.revision << 2 | self.kind


def rank(lease: Lease, create_revision: int, config: NetworkConfig | None, own: bool = False) -> Rank:
    """`lease`'s rank; with no (valid) config to fit, only age ranks leases."""
    if own:
        return Rank(OWN, 0)
    if config is None:
        return Rank(FITS, create_revision)
    networks = [n for n in (lease.subnet, lease.subnet6) if n is not None]
    fams = [config.of(family_of(n.version)) for n in networks]
    fits = all(f is not None and not f.misfit(n) for f, n in zip(fams, networks, strict=True))
    return Rank(FITS if fits else MISFIT, create_revision)


class Overlaps:
    """The leases a node knows, by key, and which of them lose to an overlapping one.

    Kept small (it holds every peer; a decoded lease costs ~1 KB): a key's subnets are parsed from
    the key when needed, and each key costs one packed rank and one index entry (~0.2 KB; with
    IPv4Network objects and a set per entry it was 0.7 KB, 3.5 MB at 5000 peers).
    """

    def __init__(self) -> None:
        self._ranks: dict[str, int] = {}  # key -> Rank.packed()
        # (IP version, prefix length) -> network address -> the key claiming it (a set when several do)
        self._index: dict[tuple[int, int], dict[int, str | set[str]]] = {}
        self._beaten: dict[str, str] = {}  # key -> the programmed key it overlaps and loses to

    @classmethod
    def of(cls, ranks: Iterable[tuple[str, Rank]]) -> Overlaps:
        out = cls()
        for key, r in ranks:
            out.put(key, r)
        return out

    def beaten_by(self, key: str) -> str | None:
        """The programmed lease that keeps `key` from being programmed, if any."""
        return self._beaten.get(key)

    def losers(self) -> dict[str, str]:
        return dict(self._beaten)

    def why(self, key: str) -> str:
        """Why `key` is not programmed, in words ('' when it is)."""
        winner = self._beaten.get(key)
        if winner is None:
            return ""
        mine, theirs = self._rank(key), self._rank(winner)
        if theirs.kind == OWN:
            reason = "is this node's own"
        elif theirs.kind != mine.kind:
            reason = "fits the network config (this one does not)"
        elif theirs.revision != mine.revision:
            reason = f"is older (created at etcd revision {theirs.revision}, this one at {mine.revision})"
        else:
            reason = "sorts first (both created at one etcd revision)"
        return (f"its subnet {_text(key)} overlaps lease {winner} ({_text(winner)}), which {reason} and is "
                f"programmed instead")

    def put(self, key: str, new: Rank) -> set[str]:
        """Add `key` (a subnet key) or change its rank. Returns the keys whose standing changed
        (`key` included when it did): programmed or not, or beaten by another lease than before."""
        packed = new.packed()
        old = self._ranks.get(key)
        if old == packed:
            return set()
        self._ranks[key] = packed
        if old is None:
            for net in _networks(key):
                bucket = self._index.setdefault((net.version, net.prefixlen), {})
                at = int(net.network_address)
                there = bucket.get(at)
                if there is None:
                    bucket[at] = key
                elif isinstance(there, str):
                    bucket[at] = {there, key}
                else:
                    there.add(key)
        return self._settle({key} | self._neighbours(key))

    def remove(self, key: str) -> set[str]:
        """Forget `key`. Returns the other keys whose standing changed."""
        if key not in self._ranks:
            return set()
        affected = self._neighbours(key)
        del self._ranks[key]
        for net in _networks(key):
            at, where = int(net.network_address), (net.version, net.prefixlen)
            bucket = self._index[where]
            there = bucket[at]
            if isinstance(there, str) or len(there) == 1:
                del bucket[at]
                if not bucket:
                    del self._index[where]
            else:
                there.discard(key)
                if len(there) == 1:
                    bucket[at] = next(iter(there))
        self._beaten.pop(key, None)
        return self._settle(affected) if affected else set()

    # -- inside ------------------------------------------------------------------------------

    def _rank(self, key: str) -> Rank:
        packed = self._ranks[key]
        return Rank(packed & 3, packed >> 2)

    def _order(self, key: str) -> tuple[int, int, str]:
        packed = self._ranks[key]
        return packed & 3, packed >> 2, key

    def _overlapping(self, net: IPNetwork) -> Iterator[str]:
        """Keys with a network that overlaps `net` (its own key included)."""
        top, plen, addr = net.max_prefixlen, net.prefixlen, int(net.network_address)
        for (version, qlen), bucket in self._index.items():
            if version != net.version:
                continue
            if qlen <= plen:  # a network of that length can only contain ours
                yield from _keys(bucket.get(addr >> (top - qlen) << (top - qlen)))
            elif (1 << (qlen - plen)) <= len(bucket):  # ours contains them: fewer to look up than to scan
                step = 1 << (top - qlen)
                for i in range(1 << (qlen - plen)):
                    yield from _keys(bucket.get(addr + i * step))
            else:
                shift = top - plen
                for start, keys in bucket.items():
                    if start >> shift == addr >> shift:
                        yield from _keys(keys)

    def _neighbours(self, key: str) -> set[str]:
        return {k for net in _networks(key) for k in self._overlapping(net) if k != key}

    def _settle(self, affected: set[str]) -> set[str]:
        """Decide the groups of overlapping leases that hold `affected` again, best rank first;
        returns the keys whose standing changed."""
        group: set[str] = set()
        todo = [k for k in affected if k in self._ranks]
        while todo:
            key = todo.pop()
            if key in group:
                continue
            group.add(key)
            todo += [k for k in self._neighbours(key) if k not in group]
        programmed: set[str] = set()
        changed: set[str] = set()
        for key in sorted(group, key=self._order):
            over = [k for k in self._neighbours(key) if k in programmed]
            winner = min(over, key=self._order) if over else None
            if winner is None:
                programmed.add(key)
                if self._beaten.pop(key, None) is not None:
                    changed.add(key)
            elif self._beaten.get(key) != winner:
                self._beaten[key] = winner
                changed.add(key)
        return changed


def unprogrammed(leases: Iterable[tuple[str, Lease, int]], config: NetworkConfig | None,
                 own: Lease | None = None) -> dict[str, str]:
    """Of (key, lease, create revision), the keys a node holding `own` (any node: None) does not
    program because of an overlap, each with why in words."""
    o = Overlaps.of((key, rank(lease, rev, config)) for key, lease, rev in leases if own is None or key != own.key)
    if own is not None:
        o.put(own.key, rank(own, 0, config, own=True))
    return {key: o.why(key) for key in sorted(o.losers())}


def _networks(key: str) -> list[IPNetwork]:
    return [n for n in parse_subnet_key(key) if n is not None]


def _text(key: str) -> str:
    return "+".join(map(str, _networks(key)))


def _keys(there: str | set[str] | None) -> Iterable[str]:
    if there is None:
        return ()
    return (there,) if isinstance(there, str) else there
