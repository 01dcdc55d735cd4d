"""The daemon's Prometheus metrics, on the ecosystem's own client (prometheus-client).

One registry per daemon: the series flanneld has always exported (same names and meaning), the
standard process and platform collectors (RSS, CPU, open fds), and what operators of a network
daemon look at: lease-event → kernel-programmed latency and full-reconcile duration histograms,
watch health, peers by backend and skipped peers by reason, firewall checks and repairs.
Counters are declared without ``_total``: prometheus-client appends it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

# lease event → netlink ACK: most land in well under a millisecond; bursts and slow etcd reach seconds
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PROBE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
RECONCILE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, version: str) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        Info("flanneld", "Build information", registry=r).info({"version": version})
        self.ready = Gauge("flanneld_ready", "1 once subnet.env is written and rules are installed", registry=r)
        self.watch_connected = Gauge("flanneld_etcd_watch_connected", "1 while the lease watch stream is up",
                                     registry=r)
        self.peers = Gauge("flanneld_peers", "Peer leases currently programmed", registry=r)
        self.peers_by_backend = Gauge("flanneld_peer_leases", "Peer leases by their BackendType", ["backend"],
                                      registry=r)
        self.skipped = Gauge("flanneld_skipped_leases", "Peer leases that cannot be programmed (see log)",
                             registry=r)
        self.skipped_by_reason = Gauge("flanneld_skipped_peers", "Peers not (fully) programmed, by reason",
                                       ["reason"], registry=r)
        self.lease_events = Counter("flanneld_lease_events", "Lease events received, by kind", ["kind"], registry=r)
        self.reconciles = Counter("flanneld_reconciles", "Reconciles, by kind and trigger", ["kind", "trigger"],
                                  registry=r)
        self.reconcile_seconds = Counter("flanneld_reconcile_seconds", "Time spent reconciling", registry=r)
        self.full_reconcile = Histogram("flanneld_full_reconcile_duration_seconds", "Duration of full reconciles",
                                        buckets=RECONCILE_BUCKETS, registry=r)
        self.event_programmed = Histogram(
            "flanneld_lease_event_programmed_seconds",
            "From a lease event's arrival from etcd to the kernel's ACK of its entries",
            buckets=LATENCY_BUCKETS, registry=r)
        # the overlay self-test (flanneld.node.prober): aggregates only, no label per peer
        self.probe_peers = Gauge("flanneld_probe_peers", "Peers by the state of their data path as probed",
                                 ["state"], registry=r)
        self.probe_rtt = Histogram("flanneld_probe_rtt_seconds", "Round-trip time of the overlay probes",
                                   buckets=PROBE_BUCKETS, registry=r)
        self.probe_state_changes = Counter("flanneld_probe_state_changes", "Peers' probe state changes, by new state",
                                           ["to"], registry=r)
        self.probes_sent = Counter("flanneld_probes_sent", "Echo requests the prober sent", registry=r)
        self.netlink_writes = Counter("flanneld_netlink_writes", "Table entries written or deleted", registry=r)
        self.netlink_failures = Counter("flanneld_netlink_write_failures", "Table writes the kernel refused",
                                        registry=r)
        self.drift_repairs = Counter("flanneld_drift_repairs", "Full reconciles that found and repaired drift",
                                     registry=r)
        self.firewall_checks = Counter("flanneld_firewall_checks", "Firewall drift checks", registry=r)
        self.firewall_repairs = Counter("flanneld_firewall_repairs", "Firewall reinstalls after drift", registry=r)
        self.renewals = Counter("flanneld_lease_renewals", "Successful lease renewals", registry=r)
        self.bridge_nf = Gauge("flanneld_bridge_nf_call_iptables", "1 when bridged pod traffic goes through "
                               "iptables (br_netfilter loaded and on), 0 otherwise: Services need it", ["family"],
                               registry=r)
        self.subnet_moves = Counter("flanneld_subnet_moves", "Times our subnet had to move (another node took it "
                                    "while our lease was expired): the pods started before each move need recreating",
                                    registry=r)
        self.lease_expiry = Gauge("flanneld_lease_expiry_seconds", "Seconds until our lease expires (-1: reservation)",
                                  registry=r)

    def watch(self, watcher: WatchState) -> None:
        """Export the lease watcher's health, read at scrape time (the watcher's thread owns the numbers)."""
        self.registry.register(_WatchCollector(watcher))

    def render(self) -> str:
        return generate_latest(self.registry).decode()


class WatchState(Protocol):
    reconnects: int
    relists: int
    revision: int
    last_response: float  # time.monotonic() of the last events or progress notification


class _WatchCollector:
    def __init__(self, watcher: WatchState) -> None:
        self.watcher = watcher

    def collect(self) -> Iterator[Metric]:
        w = self.watcher
        yield CounterMetricFamily("flanneld_etcd_watch_reconnects", "Times the lease watch was re-opened after a "
                                  "break", value=w.reconnects)
        yield CounterMetricFamily("flanneld_etcd_watch_relists", "Full re-listings after the watch fell behind "
                                  "compaction", value=w.relists)
        yield GaugeMetricFamily("flanneld_etcd_watch_revision", "The etcd revision the lease view is at",
                                value=w.revision)
        yield GaugeMetricFamily("flanneld_etcd_watch_last_response_age_seconds", "Seconds since the watch last "
                                "delivered events or a progress notification",
                                value=round(time.monotonic() - w.last_response, 3))


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Exposition text → {(sample name, sorted labels): value}, with prometheus-client's own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
