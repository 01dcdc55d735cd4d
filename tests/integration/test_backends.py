"""host-gw, IPv6-only, alloc and extension on namespaces with real etcd and real packets."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from flanneld.lab.netns import CTL_IP, ROUTER_IP, ipbatch
from flanneld.lab.probes import eventually, ping, tcp_exchange
from flanneld.lab.readers import link, routes
from flanneld.model.lease import leases_prefix

HOST_GW = {"Network": "198.18.0.0/16", "Backend": {"Type": "host-gw"}}
V6_NET = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "2001:db8:1800::/56"}
DUAL = {"Network": "198.18.0.0/16", "EnableIPv6": True, "IPv6Network": "2001:db8:1800::/56"}


def all_pairs(pods):
    return [(a, b) for a in pods for b in pods if a is not b]


def test_host_gw_three_nodes_plain_ip_and_a_node_off_the_segment_is_skipped(make_cluster, tmp_path):
    from scapy.all import ICMP, IP, UDP, rdpcap

    cluster = make_cluster(3, HOST_GW)
    cluster.start_all()
    pods = [cluster.pod(node) for node in cluster.nodes]
    pcap = tmp_path / "underlay.pcap"
    capture = subprocess.Popen(["ip", "netns", "exec", cluster.lab.ul, "tcpdump", "-i", "br0", "-nn", "-U", "-w",
                                str(pcap), "icmp or udp port 8472"], stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    for src, dst in all_pairs(pods):
        result = ping(src, dst.addr)
        assert result.returncode == 0, f"{src.name} -> {dst.addr}: {result.stdout}{result.stderr}"
        assert tcp_exchange(src, dst) == "pct revo lennalf"
    time.sleep(0.3)
    capture.terminate()
    capture.wait(10)
    packets = rdpcap(str(pcap))
    pod_ips = {p.addr for p in pods}
    icmp = [p for p in packets if p.haslayer(ICMP)]
    assert icmp and all(p[IP].src in pod_ips and p[IP].dst in pod_ips for p in icmp)  # pod addresses, no tunnel
    assert not [p for p in packets if p.haslayer(UDP) and 8472 in (p[UDP].sport, p[UDP].dport)]
    node1 = cluster.nodes[0]
    assert link(node1) is None and cluster.env(node1).mtu == 1500
    peer = cluster.nodes[1]
    assert routes(node1)[cluster.subnet(peer)]["gateway"] == peer.ip
    assert cluster.etcd_client.get(cluster.lease_key(node1)).value == \
        f'{{"PublicIP":"{node1.ip}","PublicIPv6":null,"BackendType":"host-gw"}}'.encode()

    remote = cluster.lab.add_remote_node(4)
    cluster.nodes.append(remote)
    cluster.start(remote)
    key = cluster.lease_key(remote).rsplit("/", 1)[1]
    for node in cluster.nodes[:3]:
        eventually(lambda n=node: f"not programming all of lease {key}" in n.log(), timeout=3, what="warning")
        line = next(x for x in node.log().splitlines() if f"lease {key}" in x and "not programming" in x)
        assert f"its public address {remote.ip} is not on our L2 segment" in line
        assert node.log().count(f"not programming all of lease {key}") == 1
    for src, dst in all_pairs(pods):
        assert ping(src, dst.addr).returncode == 0


def test_host_gw_routes_a_peer_reached_by_an_on_link_route_and_sees_the_interface_change(make_cluster):
    """A /32 address and on-link routes, as many cloud hosts are set up: upstream routes a peer
    that such a route reaches (the kernel takes the gateway as on-link); we skipped it, and what
    the interface reaches was read once, at start. Now it is read again whenever an address or
    on-link route of the interface comes or goes."""
    cluster = make_cluster(2, HOST_GW)
    node1, node2 = cluster.nodes
    eth = node1.ifname
    # node1 on a /32: the router and etcd on-link by host routes, node2 (.12) not on-link at all
    ipbatch([f"addr del {node1.ip}/24 dev {eth}", f"addr add {node1.ip}/32 dev {eth}",
             f"route add {ROUTER_IP}/32 dev {eth}", f"route add {CTL_IP}/32 dev {eth}",
             f"route add default via {ROUTER_IP}"], ns=node1.ns)
    cluster.start_all(converge=False)
    eventually(lambda: cluster.subnet(node1) in routes(node2), timeout=5, what="node2 routes to node1")
    pod1, pod2 = cluster.pod(node1), cluster.pod(node2)
    peer = cluster.subnet(node2)
    key = cluster.lease_key(node2).rsplit("/", 1)[1]
    assert peer not in routes(node1) and f"its public address {node2.ip} is not on our L2 segment" in node1.log()

    segment = f"{node1.ip.rsplit('.', 1)[0]}.0/24"
    node1.sh("ip", "route", "add", segment, "dev", eth)  # node2's segment, on-link
    eventually(lambda: routes(node1).get(peer, {}).get("gateway") == node2.ip, timeout=3, what="the peer routed")
    for src, dst in ((pod1, pod2), (pod2, pod1)):
        assert ping(src, dst.addr).returncode == 0, f"{src.name} -> {dst.addr}"
    assert "now reaches" in node1.log()

    node1.sh("ip", "route", "del", segment, "dev", eth)
    eventually(lambda: peer not in routes(node1), timeout=3, what="the route withdrawn with the on-link route")
    assert node1.log().count(f"not programming all of lease {key}") == 2  # skipped, routed, skipped again

    node1.sh("ip", "addr", "add", f"{segment.rsplit('.', 1)[0]}.99/24", "dev", eth)  # renumbered: a /24 again
    eventually(lambda: routes(node1).get(peer, {}).get("gateway") == node2.ip, timeout=3, what="routed again")
    assert ping(pod1, pod2.addr).returncode == 0
    assert "Traceback" not in node1.log()


@pytest.mark.parametrize(("backend", "net"), [("vxlan", V6_NET), ("host-gw", V6_NET), ("host-gw", DUAL)],
                         ids=["ipv6-only-vxlan", "ipv6-only-host-gw", "dual-stack-host-gw"])
def test_ipv6_only_and_dual_stack(make_cluster, backend, net):
    cluster = make_cluster(3, {**net, "Backend": {"Type": backend}})
    cluster.start_all()
    pods = [cluster.pod(node) for node in cluster.nodes]
    for src, dst in all_pairs(pods):
        result = ping(src, dst.ip6.split("/")[0])
        assert result.returncode == 0, f"{src.name} -> {dst.ip6}: {result.stdout}{result.stderr}"
        assert tcp_exchange(src, dst, ipv6=True) == "pct revo lennalf"
        if net is DUAL:
            assert ping(src, dst.addr).returncode == 0 and tcp_exchange(src, dst) == "pct revo lennalf"
    node1 = cluster.nodes[0]
    env = cluster.env(node1)
    assert env.ipv6_subnet is not None and (env.subnet is None) == (net is V6_NET)
    if net is V6_NET:
        lease = cluster.lease(node1)
        assert int(lease.public_ip) == 0 and str(lease.public_ipv6) == node1.ip6
        saved = node1.sh("ip6tables-save", "-t", "filter").stdout
        assert '-A FLANNEL-FWD -s 2001:db8:1800::/56 -m comment --comment "flanneld forward" -j ACCEPT' in saved
    before = cluster.subnet6(node1)
    assert cluster.stop(node1) == 0
    cluster.start(node1)
    assert cluster.subnet6(node1) == before  # the restart keeps its IPv6 subnet (found by its public IPv6)
    assert ping(pods[1], pods[0].ip6.split("/")[0]).returncode == 0


def test_alloc_leases_a_subnet_and_touches_no_data_path(make_cluster):
    cluster = make_cluster(2, {"Network": "198.18.0.0/16", "Backend": {"Type": "alloc"}})
    cluster.start_all(converge=False)
    node1, node2 = cluster.nodes
    assert cluster.subnet(node1) != cluster.subnet(node2)
    assert cluster.etcd_client.get(cluster.lease_key(node1)).value == \
        f'{{"PublicIP":"{node1.ip}","PublicIPv6":null}}'.encode()
    time.sleep(0.5)
    assert routes(node1) == {} and link(node1) is None and cluster.env(node1).mtu == 1500


def test_extension_hooks_run_with_upstreams_environment_and_failures_are_survived(make_cluster, tmp_path):
    out = tmp_path / "hooks"
    out.mkdir()
    backend = {
        "Type": "extension",
        "PreStartupCommand": "echo vtep-of-this-node",
        "PostStartupCommand": f"sh -c 'echo $NETWORK $SUBNET $PUBLIC_IP > {out}/post-$PUBLIC_IP'",
        "SubnetAddCommand": f"sh -c 'echo add $SUBNET $PUBLIC_IP $(cat) >> {out}/events-{{me}}'",
        "SubnetRemoveCommand": f"sh -c 'echo remove $SUBNET $PUBLIC_IP $(cat) >> {out}/events-{{me}}'",
        "CommandTimeout": 2,
    }
    cluster = make_cluster(2, None)
    node1, node2 = cluster.nodes
    # one config for everyone: the file name says whose hook ran ({me} is the node's own address)
    network = {"Network": "198.18.0.0/16", "SubnetMax": "198.18.199.0"}  # the made-up peers below sit above it
    text = json.dumps({**network, "Backend": backend}).replace("{me}", "$MY_IP")
    cluster.set_config(text)
    for node in (node1, node2):
        cluster.start(node, env={"MY_IP": node.ip})
    s1, s2 = cluster.subnet(node1), cluster.subnet(node2)
    assert (out / f"post-{node1.ip}").read_text().split() == ["198.18.0.0/16", s1, node1.ip]
    assert json.loads(cluster.etcd_client.get(cluster.lease_key(node1)).value)["BackendData"] == "vtep-of-this-node"
    eventually(lambda: (out / f"events-{node1.ip}").exists(), timeout=3, what="add hook on node1")
    assert (out / f"events-{node1.ip}").read_text().splitlines() == [f"add {s2} {node2.ip} vtep-of-this-node"]
    assert cluster.stop(node2) == 0
    cluster.etcd_client.delete(cluster.lease_key(node2))
    eventually(lambda: "remove" in (out / f"events-{node1.ip}").read_text(), timeout=3, what="remove hook")
    assert (out / f"events-{node1.ip}").read_text().splitlines()[-1] == f"remove {s2} {node2.ip} vtep-of-this-node"

    # a failing and a hanging hook are logged and survived; later hooks still run
    backend.update(SubnetAddCommand="sh -c 'echo it broke >&2; exit 7'", SubnetRemoveCommand="sleep 30",
                   CommandTimeout=0.5)
    cluster.set_config(json.dumps({**network, "Backend": backend}))
    assert cluster.stop(node1) == 0
    cluster.start(node1)
    head = leases_prefix(cluster.prefix)
    fake = {"PublicIP": "198.51.100.120", "PublicIPv6": None, "BackendType": "extension", "BackendData": "x"}
    cluster.etcd_client.put(head + "198.18.207.0-24", json.dumps(fake).encode())
    eventually(lambda: "failed with exit status 7: it broke" in node1.log(), timeout=3, what="failure logged")
    cluster.etcd_client.delete(head + "198.18.207.0-24")
    eventually(lambda: "timed out after 0.5s" in node1.log(), timeout=3, what="timeout logged")
    cluster.etcd_client.put(head + "198.18.208.0-24", json.dumps(fake).encode())
    eventually(lambda: node1.log().count("failed with exit status 7") == 2, timeout=3, what="hooks still run")
    assert node1.procs[-1].poll() is None and node1.http("/healthz")[0] == 200
    assert "Traceback" not in node1.log()


def test_a_failing_pre_startup_command_holds_start_up_until_it_succeeds(make_cluster, tmp_path):
    """Its output is our BackendData: publishing an empty one would feed every peer's SubnetAddCommand
    empty input. The daemon says why once, publishes nothing, stays unready and tries again."""
    ready = tmp_path / "vtep-ready"
    backend = {"Type": "extension", "CommandTimeout": 2,
               "PreStartupCommand": f"sh -c 'cat {ready} 2>/dev/null || {{ echo no >&2; echo vtep yet >&2; exit 3; }}'"}
    cluster = make_cluster(1, {"Network": "198.18.0.0/16", "SubnetMax": "198.18.199.0", "Backend": backend})
    node = cluster.nodes[0]
    cluster.start(node, wait=False)
    said = "failed with exit status 3: no; vtep yet (retrying)"  # stderr's lines on one log line
    eventually(lambda: said in node.log(), timeout=10, what="the refusal")
    time.sleep(3)  # retried meanwhile
    assert node.log().count("failed with exit status 3") == 1
    assert node.http("/readyz")[0] == 503
    assert cluster.etcd_client.list_prefix(leases_prefix(cluster.prefix))[1] == []
    ready.write_text("vtep-42\n")
    node.wait_ready()
    assert json.loads(cluster.etcd_client.get(cluster.lease_key(node)).value)["BackendData"] == "vtep-42"
    assert "Traceback" not in node.log()


def test_an_unsupported_backend_is_refused_in_one_line_and_the_daemon_waits(make_cluster):
    cluster = make_cluster(1, {"Network": "198.18.0.0/16", "Backend": {"Type": "udp"}})
    node = cluster.nodes[0]
    cluster.start(node, wait=False)
    eventually(lambda: "upstream deprecated the udp backend" in node.log(), timeout=10, what="refusal")
    line = next(x for x in node.log().splitlines() if "udp" in x)
    assert "this build supports: alloc, extension, host-gw, vxlan" in line
    assert node.http("/readyz")[0] == 503
    cluster.set_config(HOST_GW)
    node.wait_ready()

