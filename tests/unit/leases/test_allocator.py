"""Subnet choice: range, overlap with any taken subnet, exhaustion, determinism."""

import collections
import ipaddress
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flanneld.leases.allocator import MAX_CANDIDATES, OutOfSubnets, Taken, free_subnets, pick_subnet
from flanneld.model.config import parse_config

N = ipaddress.ip_network


def family(**extra):
    import json
    return parse_config(json.dumps({"Network": "10.5.0.0/16", **extra})).ipv4


def test_candidates_start_at_subnet_min_and_skip_taken():
    fam = family()
    got = free_subnets(fam, Taken.of([N("10.5.1.0/24"), N("10.5.3.0/24")]), limit=3)
    assert got == [N("10.5.2.0/24"), N("10.5.4.0/24"), N("10.5.5.0/24")]
    assert len(free_subnets(fam, Taken.of([]))) == MAX_CANDIDATES


def test_larger_and_smaller_taken_subnets_block_overlaps():
    fam = family(SubnetMax="10.5.8.0")
    got = free_subnets(fam, Taken.of([N("10.5.2.0/23"), N("10.5.5.128/25"), N("10.5.0.0/30")]))
    assert got == [N("10.5.1.0/24"), N("10.5.4.0/24"), N("10.5.6.0/24"), N("10.5.7.0/24"), N("10.5.8.0/24")]


def test_other_family_ignored():
    assert free_subnets(family(SubnetMax="10.5.1.0"), Taken.of([N("fd00::/64")])) == [N("10.5.1.0/24")]


def test_exhaustion_is_a_clear_error():
    fam = family(SubnetMin="10.5.1.0", SubnetMax="10.5.2.0")
    with pytest.raises(OutOfSubnets, match=r"out of subnets: every /24 in 10.5.1.0 .. 10.5.2.0 of 10.5.0.0/16"):
        pick_subnet(fam, Taken.of([N("10.5.1.0/24"), N("10.5.2.0/24")]), random.Random(1))


def test_pick_is_random_among_free_but_seedable():
    fam = family()
    picks = {pick_subnet(fam, Taken.of([]), random.Random(seed)) for seed in range(20)}
    assert len(picks) > 5
    assert pick_subnet(fam, Taken.of([]), random.Random(7)) == pick_subnet(fam, Taken.of([]), random.Random(7))


@st.composite
def crowded_range(draw) -> tuple[int, int, list[ipaddress.IPv4Network]]:
    """A range of 1 to 8 /24s and claims of /20../28 around it: often full, often not."""
    low = draw(st.integers(1, 240))
    high = low + draw(st.integers(0, 7))
    claims = draw(st.lists(st.tuples(st.integers(low - 1, high + 1), st.integers(20, 28), st.integers(0, 255)),
                           max_size=12))
    return low, high, [N((f"10.5.{octet}.{host}", plen), strict=False) for octet, plen, host in claims]


def test_a_picked_subnet_fits_and_overlaps_nothing_and_out_of_subnets_means_none_was_free() -> None:
    outcomes: collections.Counter[str] = collections.Counter()

    @settings(max_examples=300, deadline=None, database=None)
    @given(crowded_range(), st.integers(0, 2**32))
    def sound(spec, seed: int) -> None:
        low, high, taken = spec
        fam = family(SubnetMin=f"10.5.{low}.0", SubnetMax=f"10.5.{high}.0")
        free = [c for c in (N(f"10.5.{o}.0/24") for o in range(low, high + 1)) if not any(c.overlaps(t) for t in taken)]
        try:
            got = pick_subnet(fam, Taken.of(taken), random.Random(seed))
        except OutOfSubnets:
            assert not free
            outcomes["exhausted"] += 1
            return
        assert fam.fits(got) and got in free
        outcomes["picked"] += 1

    sound()
    assert min(outcomes["picked"], outcomes["exhausted"]) > 0.25 * sum(outcomes.values()), outcomes


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(20, 28)), max_size=30), st.integers(0, 255),
       st.integers(16, 30))
def test_taken_answers_as_a_scan_of_every_claim_would(held_spec, octet, plen):
    """One Taken serves the allocator, acquisition and `subnets reserve`: its O(log n) answer and
    the holder it names are those of a plain scan over the claims, in their order."""
    claims = [(N((f"10.5.{o}.0", p), strict=False), i) for i, (o, p) in enumerate(held_spec)]
    claims.append((N("fd00::/64"), "v6"))  # another family never overlaps
    taken = Taken(claims)
    query = N((f"10.5.{octet}.0", plen), strict=False)
    overlapping = [holder for net, holder in claims if net.version == 4 and net.overlaps(query)]
    assert taken.overlaps(query) == bool(overlapping)
    assert taken.holder(query) == (overlapping[0] if overlapping else None)
