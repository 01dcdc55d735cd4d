"""/metrics scraped with prometheus-client's own parser, doctor agreeing with it, JSON logs."""

from __future__ import annotations

import json
import time

import pytest

from flanneld import lab
from flanneld.lab.flannel import NETWORK
from flanneld.lab.probes import eventually
from flanneld.lab.readers import routes
from flanneld.node.metrics import parse


def scrape(node: lab.Node) -> dict:
    code, text = node.http("/metrics")
    assert code == 200
    return parse(text)


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_with_a_joining_peer_and_a_drift_repair(make_cluster):
    cluster = make_cluster(3, NETWORK)
    node1, node2, node3 = cluster.nodes
    cluster.start(node1)
    cluster.start(node2)
    eventually(lambda: cluster.subnet(node2) in routes(node1), timeout=3, what="node2 programmed on node1")
    before = scrape(node1)
    assert value(before, "flanneld_peers") == 1 and value(before, "flanneld_ready") == 1
    assert value(before, "process_resident_memory_bytes") > 10e6 and value(before, "process_open_fds") > 0
    assert value(before, "process_cpu_seconds_total") > 0
    assert value(before, "flanneld_info", version=__import__("flanneld").__version__) == 1

    cluster.start(node3)  # a peer joins
    eventually(lambda: cluster.subnet(node3) in routes(node1), timeout=3, what="node3 programmed on node1")
    joined = scrape(node1)
    assert value(joined, "flanneld_peers") == 2
    assert value(joined, "flanneld_peer_leases", backend="vxlan") == 2
    assert value(joined, "flanneld_lease_events_total", kind="added") > value(before, "flanneld_lease_events_total",
                                                                             kind="added")
    count = "flanneld_lease_event_programmed_seconds_count"
    assert value(joined, count) > value(before, count)  # the event → kernel latency was observed
    assert value(joined, "flanneld_lease_event_programmed_seconds_bucket", le="0.1") == value(joined, count)
    assert value(joined, "flanneld_etcd_watch_revision") > value(before, "flanneld_etcd_watch_revision")
    assert value(joined, "flanneld_etcd_watch_last_response_age_seconds") < 60

    node1.sh("ip", "route", "del", cluster.subnet(node3))  # drift
    eventually(lambda: cluster.subnet(node3) in routes(node1), timeout=2, what="route repaired")
    repaired = eventually(lambda: value(scrape(node1), "flanneld_drift_repairs_total") >= 1, timeout=2,
                          what="repair counted")
    assert repaired < 2
    after = scrape(node1)
    assert value(after, "flanneld_reconciles_total", kind="full", trigger="drift") >= 1
    assert value(after, "flanneld_full_reconcile_duration_seconds_count") > value(
        joined, "flanneld_full_reconcile_duration_seconds_count")
    eventually(lambda: value(scrape(node1), "flanneld_firewall_checks_total") >= 1, timeout=3, what="firewall checked")

    # flannelctl doctor -o json and /metrics agree on what both report
    env = {"FLANNELCTL_ETCD_ENDPOINTS": cluster.endpoint, "FLANNELCTL_ETCD_PREFIX": cluster.prefix}
    doc = json.loads(node1.sh("env", *[f"{k}={v}" for k, v in env.items()], lab.tool("flannelctl"), "doctor",
                              f"--subnet-file={node1.subnet_file}", "-o", "json", check=False).stdout)
    assert doc["peers"] == {"leases": value(after, "flanneld_peers"),
                            "skipped": value(after, "flanneld_skipped_leases")}


def test_json_logs_are_one_object_per_line_with_structured_fields(make_cluster):
    cluster = make_cluster(2, NETWORK)
    node1, node2 = cluster.nodes
    cluster.start(node1, "--log-format=json", "-v=2")
    cluster.start(node2)
    eventually(lambda: cluster.subnet(node2) in routes(node1), timeout=3, what="peer seen")
    node1.sh("ip", "route", "del", cluster.subnet(node2))
    eventually(lambda: "repaired drift" in node1.log(), timeout=3, what="drift logged")
    assert cluster.stop(node1) == 0
    records = [json.loads(line) for line in node1.log().splitlines()]  # every line parses
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    added = next(r for r in records if r["message"].startswith("lease added"))
    assert added["lease"] == cluster.subnet(node2) and added["peer"] == node2.ip and added["level"] == "INFO"
    drift = next(r for r in records if r["message"].startswith("repaired drift"))
    assert drift["trigger"] == "drift" and drift["level"] == "WARNING"
    assert not any("Traceback" in r["message"] for r in records)


QUIET = ("flanneld_drift_repairs_total", "flanneld_firewall_repairs_total")


@pytest.mark.parametrize("nftables", [False, True], ids=["iptables", "nftables"])
def test_a_quiet_minute_is_quiet(make_cluster, nftables):
    """The kernel's echoes of our own writes (netlink notifications, the tools' listings of our
    rules) must never look like drift. Over a quiet minute, dual-stack with masquerading (the most
    rules), in each firewall mode: no drift-triggered reconcile, no repair, no firewall reinstall,
    while the periodic reconciles and firewall checks keep comparing."""
    net = {**NETWORK, "EnableIPv6": True, "IPv6Network": "2001:db8:1800::/56", "EnableNFTables": nftables}
    cluster = make_cluster(2, net)
    cluster.start_all("--ip-masq", "--reconcile-interval=5")
    time.sleep(2)  # past the start's own writes and their echoes
    before = {node.ns: scrape(node) for node in cluster.nodes}
    time.sleep(60)
    for node in cluster.nodes:
        old, new = before[node.ns], scrape(node)
        for name in QUIET:
            assert value(new, name) == value(old, name), (node.ns, name)
        assert value(new, "flanneld_reconciles_total", kind="full", trigger="drift") == value(
            old, "flanneld_reconciles_total", kind="full", trigger="drift"), node.ns
        # ...while it kept looking: a periodic full reconcile every 5 s, a firewall check every second
        assert value(new, "flanneld_reconciles_total", kind="full", trigger="periodic") - value(
            old, "flanneld_reconciles_total", kind="full", trigger="periodic") >= 10, node.ns
        assert value(new, "flanneld_firewall_checks_total") - value(old, "flanneld_firewall_checks_total") >= 40
    assert "nftables" in cluster.nodes[0].log() if nftables else "iptables:" in cluster.nodes[0].log()


def test_bridged_traffic_bypassing_iptables_is_said_shown_and_counted(make_cluster):
    """Without br_netfilter's hook, pods on one node's bridge bypass iptables and Services break
    for them (upstream #2068): a warning at start and on each change, a metric, a doctor warning;
    the daemon runs all the same (#2254). The sysctl belongs to the node's network namespace."""
    cluster = make_cluster(1, NETWORK)
    node = cluster.nodes[0]
    node.sh("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0")
    cluster.start(node)
    assert value(scrape(node), "flanneld_bridge_nf_call_iptables", family="ipv4") == 0
    assert node.log().count("net.bridge.bridge-nf-call-iptables is 0") == 1
    env = {"FLANNELCTL_ETCD_ENDPOINTS": cluster.endpoint, "FLANNELCTL_ETCD_PREFIX": cluster.prefix}
    doctor = node.sh("env", *[f"{k}={v}" for k, v in env.items()], lab.tool("flannelctl"), "doctor",
                     f"--subnet-file={node.subnet_file}", check=False)
    assert doctor.returncode == 0 and "modprobe br_netfilter" in doctor.stdout, doctor.stdout
    node.sh("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1")
    eventually(lambda: value(scrape(node), "flanneld_bridge_nf_call_iptables", family="ipv4") == 1, timeout=3,
               what="the metric following the sysctl")
    node.sh("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0")
    eventually(lambda: node.log().count("net.bridge.bridge-nf-call-iptables is 0") == 2, timeout=3,
               what="a warning again when it turns off")
