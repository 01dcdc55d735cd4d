"""The overlay self-test on a real kernel: every node probes every peer's data path and says
which peer fails and why (flanneld.node.prober); doctor and `flannelctl probes` show it."""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import time

import pytest

from flanneld import lab
from flanneld.lab.flannel import NETWORK
from flanneld.lab.probes import eventually
from tests.integration.test_ctl import Ctl

INTERVAL = 2  # --probe-interval: a blocked path must be reported within two


def table(node) -> dict[str, dict]:
    """The node's probe table by peer subnet."""
    status, body = node.http("/probes")
    assert status == 200, body
    return {row["subnet"]: row for row in json.loads(body)["peers"]}


def state_of(node, peer_subnet: str) -> str:
    """A peer's state in the node's table ("absent" before the prober answers)."""
    status, body = node.http("/probes")
    rows = {row["subnet"]: row for row in json.loads(body)["peers"]} if status == 200 else {}
    return rows.get(peer_subnet, {}).get("state", "absent")


def wait_state(node, peer_subnet: str, state: str, what: str, timeout: float = 2 * INTERVAL + 3) -> None:
    eventually(lambda: state_of(node, peer_subnet) == state, timeout=timeout, interval=0.2, what=what)


def probing_pair(make_cluster, config: dict):
    """Two nodes probing every INTERVAL; returns them and n2's subnet once n1 finds n2 ok."""
    cluster = make_cluster(2, config)
    cluster.start_all(f"--probe-interval={INTERVAL}")
    n1, n2 = cluster.nodes
    peer = cluster.subnet(n2)
    wait_state(n1, peer, "ok", "ok first")
    return cluster, n1, n2, peer


def block_vxlan(cluster, a, b, add: bool = True) -> None:
    """Drop UDP 8472 between nodes a and b on the underlay bridge (a bridge-family rule in the underlay namespace)."""
    ul = cluster.lab.ul
    if not add:
        lab.sh(["nft", "delete", "table", "bridge", "labblock"], ns=ul)
        return
    lab.sh(["nft", "-f", "-"], ns=ul, input=(
        "table bridge labblock { chain block { type filter hook forward priority 0; "
        f"ip saddr {a.ip} ip daddr {b.ip} udp dport 8472 drop; ip saddr {b.ip} ip daddr {a.ip} udp dport 8472 drop; "
        "}; }"))


def test_blocked_vxlan_between_two_nodes_is_reported_by_both_with_the_cause_and_clears(make_cluster):
    cluster = make_cluster(3, NETWORK)
    cluster.start_all(f"--probe-interval={INTERVAL}")
    n1, n2, n3 = cluster.nodes
    subnets = {n.ns: cluster.subnet(n) for n in cluster.nodes}
    pairs = [(a, b) for a in cluster.nodes for b in cluster.nodes if a is not b]
    eventually(lambda: all(state_of(a, subnets[b.ns]) == "ok" for a, b in pairs), timeout=2 * INTERVAL + 3,
               interval=0.2, what="every pair ok")
    block_vxlan(cluster, n1, n2)
    blocked = time.monotonic()
    try:
        eventually(lambda: state_of(n1, subnets[n2.ns]) == state_of(n2, subnets[n1.ns]) == "unreachable",
                   timeout=2 * INTERVAL + 3, interval=0.2, what="both ends report the blocked pair")
        took = time.monotonic() - blocked
        row = table(n1)[subnets[n2.ns]]
        assert row["cause"] == (f"underlay reaches {n2.ip} but VXLAN on UDP 8472 gets no answer — a firewall or "
                                "switch between the nodes?")
        for a, b in ((n1, n3), (n3, n1), (n2, n3), (n3, n2)):  # every other pair stays ok
            assert state_of(a, subnets[b.ns]) == "ok", (a.ns, b.ns)
        assert (f"peer {subnets[n2.ns]} ({n2.ip}): ok → unreachable: underlay reaches {n2.ip} but VXLAN on UDP 8472 "
                "gets no answer") in n1.log()
        # the node's own doctor names it first and fails; the cluster view shows the pair both ways
        ctl = Ctl(cluster.etcd, cluster.prefix)
        ctl.env["FLANNELCTL_ETCD_ENDPOINTS"] = cluster.endpoint
        doctor = ctl("doctor", "--subnet-file", n1.subnet_file, ns=n1.ns)
        assert doctor.returncode == 1
        assert f"peer {subnets[n2.ns]} ({n2.ip}): unreachable — underlay reaches" in doctor.stdout.splitlines()[0]
        view = ctl("probes")
        assert view.returncode == 1, view.stdout
        lines = view.stdout.splitlines()
        order = sorted(cluster.nodes, key=lambda n: ipaddress.ip_network(subnets[n.ns]))  # the matrix's order
        cut = {n1.ns, n2.ns}
        expected = {subnets[a.ns]: ["-" if a is b else "U" if {a.ns, b.ns} == cut else "." for b in order]
                    for a in order}
        assert {line.split()[1]: line.split()[-3:] for line in lines[1:4]} == expected, lines
        assert f"{subnets[n1.ns]} ({n1.ip}) -> {subnets[n2.ns]} ({n2.ip}): unreachable — " in view.stdout
        assert lines[-1] == "3 nodes, 3 asked, 2 failing pair(s)"
    finally:
        block_vxlan(cluster, n1, n2, add=False)
    eventually(lambda: state_of(n1, subnets[n2.ns]) == "ok" and state_of(n2, subnets[n1.ns]) == "ok",
               timeout=2 * INTERVAL + 3, interval=0.2, what="back to ok once the rule is gone")
    assert took <= 2 * INTERVAL + 2.5, took  # one look and one confirming look, at most
    assert f"peer {subnets[n2.ns]} ({n2.ip}): unreachable → ok" in n1.log()


def test_a_lowered_underlay_mtu_is_mtu_naming_the_size_that_passes(make_cluster):
    _cluster, n1, n2, peer = probing_pair(make_cluster, NETWORK)
    n2.sh("ip", "link", "set", n2.ifname, "mtu", "1400")  # n2 now drops n1's full-size encapsulated packets
    wait_state(n1, peer, "mtu", "mtu reported", timeout=2 * INTERVAL + 6)
    row = table(n1)[peer]
    # 1400 on the wire less VXLAN's 50 bytes (the veth takes a VLAN header's 4 more), found to ~10 bytes
    assert 1340 <= row["passing_size"] <= 1354, row
    assert row["cause"] == (f"packets of 1450 bytes are lost, {row['passing_size']} pass: the path MTU is below the "
                            "overlay MTU; set Backend.MTU")
    n2.sh("ip", "link", "set", n2.ifname, "mtu", "1500")
    wait_state(n1, peer, "ok", "ok again")


def test_a_peer_whose_daemon_is_stopped_stays_ok(make_cluster):
    """The data plane is the kernel's: a stopped daemon leaves it, and its peers' probes say so."""
    cluster, n1, n2, peer = probing_pair(make_cluster, NETWORK)
    changes_before = n1.log().count(f"peer {peer}")
    cluster.stop(n2)
    time.sleep(2 * INTERVAL + 1)
    assert state_of(n1, peer) == "ok" and n1.log().count(f"peer {peer}") == changes_before


@pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go is not installed")
def test_wireguard_peers_are_probed_through_the_tunnel(make_cluster):
    cluster = make_cluster(2, {**NETWORK, "Backend": {"Type": "wireguard"}})
    for node in cluster.nodes:
        node.private_run()
    cluster.start_all(f"--probe-interval={INTERVAL}", converge=False)
    n1, n2 = cluster.nodes
    for a, b in ((n1, n2), (n2, n1)):
        eventually(lambda a=a, b=b: state_of(a, cluster.subnet(b)) == "ok", timeout=2 * INTERVAL + 5, interval=0.2,
                   what=f"{a.ns} probes {b.ns} through WireGuard")
    row = table(n1)[cluster.subnet(n2)]
    assert row["probed"] == cluster.subnet(n2).split("/")[0] and row["rtt_ms"] is not None
    lab.sh(["nft", "-f", "-"], ns=cluster.lab.ul, input=(
        "table bridge labblock { chain block { type filter hook forward priority 0; udp dport 51820 drop; }; }"))
    wait_state(n1, cluster.subnet(n2), "unreachable", "WireGuard's port blocked is unreachable",
               timeout=2 * INTERVAL + 5)
    assert "WireGuard on UDP 51820 gets no answer" in table(n1)[cluster.subnet(n2)]["cause"]


def test_host_gw_peers_are_probed_at_their_pod_gateway_and_unprobed_without_one(make_cluster):
    cluster = make_cluster(2, {**NETWORK, "Backend": {"Type": "host-gw"}})
    cluster.start_all(f"--probe-interval={INTERVAL}")
    n1, n2 = cluster.nodes
    peer = cluster.subnet(n2)
    eventually(lambda: state_of(n1, peer) == "unprobed" and "no pod there?" in table(n1)[peer]["cause"],
               timeout=2 * INTERVAL + 5, interval=0.2, what="no pod gateway on n2 yet: unprobed")
    cluster.pod(n2)  # the CNI bridge with the subnet's gateway
    wait_state(n1, peer, "ok", "its gateway answers")
    assert table(n1)[peer]["probed"] == peer.split("/")[0][:-1] + "1"


def test_the_prober_off_sends_nothing(make_cluster):
    cluster = make_cluster(2, NETWORK)
    cluster.start_all("--probe-interval=0")
    n1 = cluster.nodes[0]
    capture = subprocess.Popen(n1.wrap(["tcpdump", "-n", "-i", "any", "-c", "1", "icmp"]), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(3)
        assert capture.poll() is None, capture.communicate()[0]  # not one ICMP packet seen
    finally:
        capture.kill()
        capture.wait()
    status, body = n1.http("/probes")
    assert status == 503 and "the prober is not running" in body
    assert "probing every peer" not in n1.log()


def test_an_ipv6_only_network_is_probed_over_ipv6(make_cluster):
    _cluster, n1, n2, peer = probing_pair(make_cluster, {"EnableIPv4": False, "EnableIPv6": True,
                                                          "IPv6Network": "2001:db8:1800::/56",
                                                          "Backend": {"Type": "vxlan"}})
    row = table(n1)[peer]
    assert row["probed"] == peer.split("/")[0] and row["public_ip"] == n2.ip6 and row["rtt_ms"] is not None
