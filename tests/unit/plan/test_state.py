"""Desired-vs-actual diff: in-place replacement by key, deletion of what is no longer wanted."""

from flanneld.plan.state import Fdb, Neigh, Route, diff


def test_changed_value_is_replaced_not_deleted():
    want = [Neigh("flannel.1", "198.18.2.0", "0e:00:00:00:00:02")]
    have = [Neigh("flannel.1", "198.18.2.0", "0e:00:00:00:00:01"),
            Neigh("flannel.1", "198.18.3.0", "0e:00:00:00:00:03")]
    d = diff(want, have)
    assert d.put == want
    assert d.delete == [have[1]]


def test_fdb_keyed_by_mac_and_route_by_destination_and_metric():
    d = diff([Fdb("flannel.1", "0e:00:00:00:00:02", "198.51.100.12")],
             [Fdb("flannel.1", "0e:00:00:00:00:01", "198.51.100.12")])
    assert len(d.put) == 1 and len(d.delete) == 1  # a new MAC is a new entry: the old one is stale
    r = Route("198.18.2.0/24", "198.18.2.0", "flannel.1", onlink=True)
    assert not diff([r], [r])
    blackhole = Route("198.18.1.0/24", blackhole=True, metric=4000)
    kernel_made = Route("198.18.1.0/24", None, "cni0")
    assert diff([blackhole], [kernel_made]).delete == [kernel_made]
    assert diff([blackhole], [blackhole, Route("198.18.1.0/24", blackhole=True, metric=0)]).delete[0].metric == 0
