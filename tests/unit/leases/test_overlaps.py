"""The overlap rule: which of overlapping leases is programmed, kept incrementally, equal to deciding
everything from scratch."""

from __future__ import annotations

import collections
import ipaddress
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from flanneld.leases.overlaps import FITS, MISFIT, OWN, Overlaps, Rank, rank, unprogrammed
from flanneld.model.config import parse_config
from flanneld.model.lease import Lease, parse_subnet_key

N = ipaddress.ip_network
CONFIG = parse_config(json.dumps({"Network": "198.18.0.0/16", "IPv6Network": "2001:db8:1800::/56",
                                  "EnableIPv6": True}))
LIVE, ODD = "198.18.62.0-24", "198.18.62.0-25"


def test_a_misfit_inside_a_live_lease_loses_whichever_came_first():
    o = Overlaps()
    assert o.put(LIVE, Rank(FITS, 10)) == set()  # alone: programmed, nothing changed standing
    assert o.put(ODD, Rank(MISFIT, 20)) == {ODD}
    assert o.beaten_by(ODD) == LIVE
    assert o.why(ODD) == ("its subnet 198.18.62.0/25 overlaps lease 198.18.62.0-24 (198.18.62.0/24), which fits "
                          "the network config (this one does not) and is programmed instead")
    # the other order: the live lease put inside an older misfit takes over from it
    o = Overlaps()
    o.put(ODD, Rank(MISFIT, 5))
    assert o.put(LIVE, Rank(FITS, 10)) == {ODD}
    assert o.losers() == {ODD: LIVE}
    assert o.remove(LIVE) == {ODD}  # the overlap ends: programmed again
    assert o.losers() == {} and o.why(ODD) == ""


def test_between_equals_the_older_create_revision_wins_and_own_beats_all():
    big, small, ours = "198.18.4.0-23", "198.18.4.0-24", "198.18.5.0-24"
    o = Overlaps.of([(big, Rank(MISFIT, 5)), (small, Rank(MISFIT, 3))])
    assert o.losers() == {big: small} and "is older (created at etcd revision 3, this one at 5)" in o.why(big)
    assert o.put(small, Rank(MISFIT, 9)) == {big, small}  # re-created: the other is older now
    assert o.losers() == {small: big}
    assert o.put(ours, Rank(OWN, 0)) == {big, small}  # big loses to us, so small is free
    assert o.losers() == {big: ours} and "is this node's own" in o.why(big)


def test_a_loser_does_not_block_a_third_lease():
    """Greedy by rank: a lease beaten by one does not keep another it overlaps from being programmed."""
    o = Overlaps.of([("198.18.8.0-22", Rank(MISFIT, 1)), ("198.18.8.0-24", Rank(FITS, 2)),
                     ("198.18.10.0-24", Rank(FITS, 3))])
    assert o.losers() == {"198.18.8.0-22": "198.18.8.0-24"}
    assert o.remove("198.18.8.0-24") == {"198.18.8.0-22"} and o.losers() == {"198.18.8.0-22": "198.18.10.0-24"}
    assert o.remove("198.18.10.0-24") == {"198.18.8.0-22"} and o.losers() == {}


def test_ranks_of_real_leases_both_families_and_a_view_of_a_listing():
    fits = Lease(N("198.18.3.0/24"), N("2001:db8:1800:3::/64"), key="198.18.3.0-24&2001:db8:1800:3::-64")
    odd6 = Lease(None, N("2001:db8:1800:3::/80"), key="0.0.0.0-0&2001:db8:1800:3::-80")
    assert rank(fits, 7, CONFIG) == Rank(FITS, 7) and rank(odd6, 8, CONFIG) == Rank(MISFIT, 8)
    assert rank(odd6, 8, CONFIG, own=True) == Rank(OWN, 0) and rank(odd6, 8, None) == Rank(FITS, 8)
    listed = [(fits.key, fits, 7), (odd6.key, odd6, 8)]
    assert list(unprogrammed(listed, CONFIG)) == [odd6.key]  # overlapping in IPv6 only is overlapping
    assert list(unprogrammed(listed, CONFIG, own=odd6)) == [fits.key]


def test_an_unchanged_rank_is_no_change_and_an_unknown_removal_is_nothing():
    o = Overlaps.of([("198.18.1.0-24", Rank(FITS, 1))])
    assert o.put("198.18.1.0-24", Rank(FITS, 1)) == set() and o.remove("198.18.9.0-24") == set()


# -- the property: incremental standing == deciding from scratch ----------------------------------

def reference(ranks: dict[str, Rank]) -> dict[str, str]:
    """Greedy by rank over every lease, pairwise overlap by ipaddress: slow and obviously right."""
    def nets(key):
        return [n for n in parse_subnet_key(key) if n is not None]

    programmed: list[str] = []
    losers = {}
    for key in sorted(ranks, key=lambda k: (ranks[k], k)):
        over = [p for p in programmed if any(a.overlaps(b) for a in nets(key) for b in nets(p))]
        if over:
            losers[key] = min(over, key=lambda p: (ranks[p], p))
        else:
            programmed.append(key)
    return losers


keys = st.tuples(st.integers(0, 7), st.sampled_from([22, 23, 24, 25, 26])).map(
    lambda t: str(N(f"198.18.{t[0]}.0/{t[1]}", strict=False)).replace("/", "-"))
ops = st.lists(st.tuples(keys, st.one_of(st.none(), st.builds(Rank, st.sampled_from([OWN, FITS, MISFIT]),
                                                              st.integers(1, 4)))), min_size=1, max_size=14)


def test_incremental_standing_equals_a_decision_from_scratch():
    outcomes: collections.Counter[str] = collections.Counter()

    @settings(max_examples=400, deadline=None, database=None)
    @given(ops)
    def same(steps) -> None:
        o, ranks = Overlaps(), {}
        for key, new in steps:
            before = reference(ranks)
            if new is None:
                changed = o.remove(key)
                ranks.pop(key, None)
            else:
                ranks[key] = new
                changed = o.put(key, new)
            after = reference(ranks)
            assert o.losers() == after
            assert changed - {key} == {k for k in set(before) | set(after) if before.get(k) != after.get(k)} - {key}
            outcomes["overlap"] += bool(after)
            outcomes["standing changed"] += bool(changed - {key})
        outcomes["examples"] += 1

    same()
    assert outcomes["overlap"] > outcomes["examples"] and outcomes["standing changed"] > outcomes["examples"] / 4
