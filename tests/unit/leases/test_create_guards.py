"""The one builder of create guards (acquisition and `flannelctl subnets reserve`): evaluated as etcd
would against the keys that exist, it refuses every create that would hand out a subnet that a key
written since the caller's listing holds (what the listing showed, the caller's `Taken` refuses)."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from flanneld.leases.manager import create_guards
from flanneld.model.lease import Lease, leases_prefix, subnet_key

PREFIX = "/coreos.com/network"
HEAD = leases_prefix(PREFIX)


def holds(guard, keys: dict[str, int]) -> bool:
    """A guard as etcd evaluates it: `keys` maps each existing key to its mod revision."""
    end = guard.range_end.decode() if isinstance(guard.range_end, bytes) else guard.range_end
    hit = [mod for key, mod in keys.items() if (guard.key <= key < end if end else key == guard.key)]
    if guard.target == "version":  # "== 0": no such key
        return not hit
    return all(mod < guard.value for mod in hit)  # "mod <": nothing written since


def lease(v4: int | None, v6: int | None) -> Lease:
    return Lease(ipaddress.ip_network(f"198.18.{v4}.0/24") if v4 is not None else None,
                 ipaddress.ip_network(f"2001:db8:1800:{v6:x}::/64") if v6 is not None else None)


halves = st.tuples(st.one_of(st.none(), st.integers(0, 3)), st.one_of(st.none(), st.integers(0, 3))).filter(
    lambda h: h != (None, None))


@settings(max_examples=400, deadline=None)
@given(halves, st.lists(st.tuples(halves, st.booleans()), max_size=4), st.booleans())
def test_a_create_succeeds_only_when_no_key_holds_either_subnet(wanted, existing, reserve):
    listed_at = 100
    # each existing key: written before the listing (seen by the caller) or after it (not seen)
    seen_of: dict[tuple, bool] = {}
    for h, seen in existing:
        seen_of.setdefault(h, seen)
    keys = {HEAD + subnet_key(lease(*h).subnet, lease(*h).subnet6): 50 if seen else 150 for h, seen in seen_of.items()}
    new = lease(*wanted)
    allowed = all(holds(g, keys) for g in create_guards(PREFIX, new, listed_at, listing_unchanged=reserve))

    def clashes(h: tuple) -> bool:
        return (h[0] is not None and h[0] == wanted[0]) or (h[1] is not None and h[1] == wanted[1])

    unseen = [h for h, seen in seen_of.items() if not seen]
    if any(clashes(h) for h in unseen):
        assert not allowed, (wanted, existing)
    elif not any(clashes(h) for h in seen_of) and (not unseen or (new.subnet6 is None and not reserve)):
        assert allowed, (wanted, existing)
    if reserve and unseen:  # a reservation decided on the whole listing refuses any change since
        assert not allowed
