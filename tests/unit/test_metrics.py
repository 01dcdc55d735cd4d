"""Prometheus text rendering."""

from flanneld.health import Metrics


def test_render():
    m = Metrics()
    m.describe("flanneld_peers", "gauge", "Peers")
    m.set("flanneld_peers", 3)
    m.inc("flanneld_lease_events_total", kind="added")
    m.inc("flanneld_lease_events_total", 2, kind="added")
    m.set("flanneld_info", 1, version='0.1"x')
    text = m.render()
    assert "# HELP flanneld_peers Peers\n# TYPE flanneld_peers gauge\nflanneld_peers 3\n" in text
    assert 'flanneld_lease_events_total{kind="added"} 3' in text
    assert 'flanneld_info{version="0.1\\"x"} 1' in text
