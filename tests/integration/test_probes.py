"""The Pinger counts every probe it sent: the tail still unanswered when it stops, and a gap."""

from __future__ import annotations

import time

import pytest

from flanneld.lab.flannel import NETWORK
from flanneld.lab.netns import sh
from flanneld.lab.probes import BothWays, Pinger

DROP_ECHOES = """table inet cut {
    chain out {
        type filter hook output priority 0;
        icmp type echo-request drop
    }
}
"""


def cut(pod) -> None:
    sh(["nft", "-f", "-"], ns=pod.name, input=DROP_ECHOES)


def mend(pod) -> None:
    sh(["nft", "delete", "table", "inet", "cut"], ns=pod.name)


@pytest.fixture
def pods(make_cluster):
    cluster = make_cluster(2, NETWORK)
    cluster.start_all()
    return cluster.pod(cluster.nodes[0]), cluster.pod(cluster.nodes[1])


def test_every_probe_of_a_healthy_path_is_answered_both_ways(pods):
    probes = BothWays(*pods)
    start = time.monotonic()
    time.sleep(1)
    end = time.monotonic()
    tally = probes.stop()
    assert tally.lost == 0 and tally.duplicates == 0 and 100 < tally.sent < 260, tally[:2]
    tally.assert_through(start + 0.1, end - 0.1)


def cut_after_a_while(a, b) -> tuple[Pinger, float]:
    """A pinger from a to b, answered for 0.3 s, then cut: it, and when the cut began."""
    pinger = Pinger(a, b.addr)
    time.sleep(0.3)
    cut(a)
    return pinger, time.monotonic()


def test_a_pinger_stopped_mid_outage_counts_the_unanswered_tail(pods):
    pinger, since = cut_after_a_while(*pods)
    time.sleep(0.5)
    tally = pinger.stop()  # still cut: ping's replies-seen view reported this as nothing lost
    assert 30 <= tally.lost <= 80 and all(t >= since - 0.02 for t in tally.lost_at), tally[:2]
    assert tally.sent - tally.lost >= 20  # what went before the cut was answered


def test_a_gap_in_the_middle_is_counted_and_placed(pods):
    pinger, start = cut_after_a_while(*pods)
    time.sleep(0.3)
    mend(pods[0])
    end = time.monotonic()
    time.sleep(0.3)
    tally = pinger.stop()
    assert 15 <= tally.lost <= 45 and all(start - 0.02 <= t <= end + 0.02 for t in tally.lost_at), tally[:2]
    with pytest.raises(AssertionError, match=r"probes lost, sent at"):
        tally.assert_through(start, end)
    with pytest.raises(AssertionError, match="probing stopped"):
        tally.assert_through(start, time.monotonic() + 1)  # a window the probing did not outlast
