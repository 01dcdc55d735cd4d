"""/metrics on prometheus-client: the series keep their names, process metrics come for free."""

from flanneld.node.metrics import Metrics, parse


class Watch:
    reconnects, relists, revision, last_response = 2, 1, 77, 0.0


def test_series_names_and_exposition_parse_with_the_clients_own_parser():
    m = Metrics('0.1"x')
    m.peers.set(3)
    m.lease_events.labels(kind="added").inc()
    m.lease_events.labels(kind="added").inc(2)
    m.event_programmed.observe(0.0007)
    m.watch(Watch())
    text = m.render()
    samples = parse(text)
    assert samples[("flanneld_peers", ())] == 3
    assert samples[("flanneld_lease_events_total", (("kind", "added"),))] == 3
    assert samples[("flanneld_info", (("version", '0.1"x'),))] == 1
    assert samples[("flanneld_lease_event_programmed_seconds_bucket", (("le", "0.001"),))] == 1
    assert samples[("flanneld_lease_event_programmed_seconds_count", ())] == 1
    assert samples[("flanneld_etcd_watch_reconnects_total", ())] == 2
    assert samples[("flanneld_etcd_watch_revision", ())] == 77
    assert ("process_resident_memory_bytes", ()) in samples and ("process_open_fds", ()) in samples
    assert "# TYPE flanneld_peers gauge" in text and "# TYPE flanneld_lease_events_total counter" in text
