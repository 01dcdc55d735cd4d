"""The wireguard backend on namespaces with real etcd, real wireguard-go and real packets.

This kernel has no WireGuard module, so every node runs wireguard-go (``--wireguard-provider=auto``
falls back to it); each node has a private /run (its key file, wireguard-go's sockets), kept
across daemon restarts like a real node's.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pathlib
import shutil
import signal
import subprocess
import time

import pytest

from flanneld import lab
from flanneld.lab.probes import BothWays, eventually, ping, tcp_exchange
from flanneld.lab.readers import routes

pytestmark = pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go is not installed")

WG = {"Network": "198.18.0.0/16", "SubnetMax": "198.18.199.0", "Backend": {"Type": "wireguard"}}
PSK = "q1L+cxcb2uGRDovd8rjzgeiyCzVCBjAYfEbu5YVTtms="
DUAL = {"Network": "198.18.0.0/16", "SubnetMax": "198.18.199.0", "EnableIPv6": True,
        "IPv6Network": "2001:db8:1800::/56",
        "Backend": {"Type": "wireguard", "PSK": PSK, "PersistentKeepaliveInterval": 25}}


def wg_cluster(make_cluster, nodes: int, config: dict):
    cluster = make_cluster(nodes, config)
    cluster.config = config
    for node in cluster.nodes:
        node.private_run()
    return cluster


def start_all(cluster, *flags: str) -> None:
    """Start every daemon and wait until each node has every other as a WireGuard peer."""
    cluster.start_all(*flags, converge=False)
    separate = cluster.config["Backend"].get("Mode", "separate") == "separate"
    devices = ["flannel-wg"] + (["flannel-wg-v6"] if cluster.config.get("EnableIPv6") and separate else [])

    def meshed() -> bool:
        return all(len(wg_dump(n, d)["peers"]) == len(cluster.nodes) - 1 for n in cluster.nodes for d in devices)

    eventually(meshed, timeout=5.0, what="every node has every other as a WireGuard peer")


def wg_dump(node, device: str = "flannel-wg") -> dict:
    """`wg show DEV dump` as {"public_key", "listen_port", "peers": {key: {...}}} (private key dropped)."""
    lines = node.sh("wg", "show", device, "dump").stdout.splitlines()
    _private, public, port, _fwmark = lines[0].split("\t")
    peers = {}
    for line in lines[1:]:
        key, psk, endpoint, allowed, _hs, _rx, _tx, keepalive = line.split("\t")
        peers[key] = {"psk": psk != "(none)", "endpoint": endpoint, "allowed_ips": allowed.split(","),
                      "keepalive": keepalive}
    return {"public_key": public, "listen_port": int(port), "peers": peers}


def kill_wireguard_go(node) -> None:
    """SIGKILL the wireguard-go processes of this node only (all nodes share one PID namespace)."""
    for pid in lab.ip("netns", "pids", node.ns).stdout.split():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"wireguard-go" in fh.read():
                    os.kill(int(pid), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


def all_pairs(pods):
    return [(a, b) for a in pods for b in pods if a is not b]


def test_three_nodes_encrypted_and_nothing_in_clear_on_the_underlay(make_cluster, tmp_path):
    from scapy.all import IP, TCP, UDP, Raw, rdpcap

    cluster = wg_cluster(make_cluster, 3, WG)
    start_all(cluster)
    pods = [cluster.pod(node) for node in cluster.nodes]
    pcap = tmp_path / "underlay.pcap"
    capture = subprocess.Popen(["ip", "netns", "exec", cluster.lab.ul, "tcpdump", "-i", "br0", "-nn", "-U", "-w",
                                str(pcap)], stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    marker = "c0ffee15c0ffee15"
    for src, dst in all_pairs(pods):
        result = subprocess.run(["ip", "netns", "exec", src.name, "ping", "-c", "2", "-i", "0.2", "-W", "2",
                                 "-p", marker, dst.addr], capture_output=True, text=True)
        assert result.returncode == 0, f"{src.name} -> {dst.addr}: {result.stdout}{result.stderr}"
        assert tcp_exchange(src, dst) == "pct revo lennalf"
    time.sleep(0.3)
    capture.terminate()
    capture.wait(10)
    packets = [p for p in rdpcap(str(pcap)) if p.haslayer(IP)]
    node_ips = {n.ip for n in cluster.nodes}
    rest = [p for p in packets if not (p.haslayer(TCP) and lab.CTL_IP in (p[IP].src, p[IP].dst))]  # not etcd
    tunnel = [p for p in rest if p[IP].src in node_ips or p[IP].dst in node_ips]
    assert tunnel, "no WireGuard packets seen"
    assert all(ipaddress.ip_address(p[IP].dst).is_multicast for p in rest if p not in tunnel)  # the bridge's IGMP
    for p in tunnel:  # only UDP to the listen port, between node addresses
        assert p.haslayer(UDP) and 51820 in (p[UDP].sport, p[UDP].dport), p.summary()
        assert p[IP].src in node_ips and p[IP].dst in node_ips, p.summary()
    raw = b"".join(bytes(p[Raw].load) for p in tunnel if p.haslayer(Raw))
    assert bytes.fromhex(marker) not in raw  # the ping payload never crosses in clear
    assert not any(bytes(int(x) for x in pod.addr.split(".")) in raw for pod in pods)

    node1 = cluster.nodes[0]
    env = cluster.env(node1)
    assert env.mtu == 1500 - 80
    wg = wg_dump(node1)
    lease = cluster.lease(node1)
    assert lease.backend_type == "wireguard" and lease.backend == {"PublicKey": wg["public_key"], "Port": 51820}
    assert cluster.etcd_client.get(cluster.lease_key(node1)).value == (
        f'{{"PublicIP":"{node1.ip}","PublicIPv6":null,"BackendType":"wireguard",'
        f'"BackendData":{{"PublicKey":"{wg["public_key"]}","Port":51820}}}}').encode()
    assert wg["listen_port"] == 51820 and len(wg["peers"]) == 2
    for peer in cluster.nodes[1:]:
        entry = wg["peers"][wg_dump(peer)["public_key"]]
        assert entry["endpoint"] == f"{peer.ip}:51820" and entry["allowed_ips"] == [cluster.subnet(peer)]
        assert not entry["psk"] and entry["keepalive"] == "off"
    assert routes(node1)["198.18.0.0/16"]["dev"] == "flannel-wg"
    key_file = node1.sh("stat", "-c", "%a", "/run/flannel/wgkey").stdout.strip()
    assert key_file == "400"
    private = node1.sh("cat", "/run/flannel/wgkey").stdout.strip()
    assert private not in node1.log() and private not in node1.http("/metrics")[1]


def test_dual_stack_separate_mode_with_psk(make_cluster):
    cluster = wg_cluster(make_cluster, 2, DUAL)
    start_all(cluster)
    pods = [cluster.pod(node) for node in cluster.nodes]
    # With a keepalive, each side initiates a handshake as soon as it has the other as a peer; one
    # that arrives before the other side knows us is dropped, and WireGuard retries after 5 s.
    for dst in (pods[1].addr, pods[1].ip6.split("/")[0]):
        eventually(lambda d=dst: ping(pods[0], d).returncode == 0, timeout=8, what=f"handshake towards {dst}")
    for src, dst in all_pairs(pods):
        assert ping(src, dst.addr).returncode == 0
        assert ping(src, dst.ip6.split("/")[0]).returncode == 0
        assert tcp_exchange(src, dst, ipv6=True) == "pct revo lennalf"
    a, b = cluster.nodes
    v4, v6 = wg_dump(a), wg_dump(a, "flannel-wg-v6")
    assert v4["public_key"] == v6["public_key"] and (v4["listen_port"], v6["listen_port"]) == (51820, 51821)
    bkey = wg_dump(b)["public_key"]
    assert v4["peers"][bkey]["endpoint"] == f"{b.ip}:51820" and v4["peers"][bkey]["allowed_ips"] == \
        [cluster.subnet(b)]
    assert v6["peers"][bkey]["endpoint"] == f"[{b.ip6}]:51821" and v6["peers"][bkey]["allowed_ips"] == \
        [cluster.subnet6(b)]
    assert v4["peers"][bkey]["psk"] and v6["peers"][bkey]["psk"] and v4["peers"][bkey]["keepalive"] == "25"
    lease = cluster.lease(a)
    assert lease.backend == {"PublicKey": v4["public_key"], "Port": 51820}
    assert lease.backend_v6 == {"PublicKey": v4["public_key"], "Port": 51821}
    assert PSK not in a.log() and PSK not in a.http("/metrics")[1]
    assert routes(a, "-6")["2001:db8:1800::/56"]["dev"] == "flannel-wg-v6"


def test_auto_mode_one_device_for_both_families(make_cluster):
    config = {**DUAL, "Backend": {"Type": "wireguard", "Mode": "auto"}}
    cluster = wg_cluster(make_cluster, 2, config)
    start_all(cluster)
    a, b = cluster.nodes
    pa, pb = cluster.pod(a), cluster.pod(b)
    assert ping(pa, pb.addr).returncode == 0 and ping(pa, pb.ip6.split("/")[0]).returncode == 0
    assert tcp_exchange(pa, pb, ipv6=True) == "pct revo lennalf"
    assert a.sh("ip", "link", "show", "flannel-wg-v6", check=False).returncode != 0
    peer = wg_dump(a)["peers"][wg_dump(b)["public_key"]]
    # both of the peer's subnets on the one peer, reached over IPv4 (both public: IPv4 first)
    assert peer["allowed_ips"] == [cluster.subnet(b), cluster.subnet6(b)] and peer["endpoint"] == f"{b.ip}:51820"
    assert routes(a, "-6")["2001:db8:1800::/56"]["dev"] == "flannel-wg"
    assert cluster.lease(a).backend_v6 == {"PublicKey": wg_dump(a)["public_key"], "Port": 51820}


def test_hitless_restart_peer_removal_and_repair(make_cluster):
    cluster = wg_cluster(make_cluster, 3, WG)
    start_all(cluster, "--reconcile-interval=1")
    a, b, c = cluster.nodes
    pa, pb = cluster.pod(a), cluster.pod(b)
    before = wg_dump(a)["public_key"]
    probes = BothWays(pa, pb)
    start = time.monotonic()
    assert cluster.stop(a) == 0
    time.sleep(0.5)
    cluster.start(a, "--reconcile-interval=1")
    time.sleep(1.0)  # a full reconcile or two of the restarted daemon
    end = time.monotonic()
    time.sleep(0.3)
    probes.stop().assert_through(start, end)
    assert wg_dump(a)["public_key"] == before
    assert a.log().count("started wireguard-go") == 1  # the restarted daemon adopted the running device

    # a peer leaving: its WireGuard peer is gone from every node within 1 s
    ckey = wg_dump(c)["public_key"]
    cluster.stop(c)
    removed_at = time.monotonic()
    cluster.etcd_client.delete(cluster.lease_key(c))
    for node in (a, b):
        eventually(lambda n=node: ckey not in wg_dump(n)["peers"], timeout=1.0, what="peer removed")
    assert time.monotonic() - removed_at < 1.0

    # a peer removed by hand comes back at the next reconcile (every second here)
    bkey = wg_dump(b)["public_key"]
    a.sh("wg", "set", "flannel-wg", "peer", bkey, "remove")
    assert bkey not in wg_dump(a)["peers"]
    eventually(lambda: bkey in wg_dump(a)["peers"], timeout=2.0, what="peer restored")
    assert ping(pa, pb.addr).returncode == 0
    # a stale peer added by hand is removed
    stale = "hA3o0ZdPN1S3fPYGyIqhJDqLRcmCN0VwVtHyyWy6ykM="
    a.sh("wg", "set", "flannel-wg", "peer", stale, "allowed-ips", "198.18.250.0/24")
    eventually(lambda: stale not in wg_dump(a)["peers"], timeout=2.0, what="stale peer removed")


def test_wireguard_go_killed_while_running_and_while_stopped(make_cluster):
    cluster = wg_cluster(make_cluster, 2, WG)
    start_all(cluster)
    a, b = cluster.nodes
    pa, pb = cluster.pod(a), cluster.pod(b)
    key = wg_dump(a)["public_key"]
    bkey = wg_dump(b)["public_key"]
    kill_wireguard_go(a)
    eventually(lambda: a.sh("ip", "link", "show", "flannel-wg", check=False).returncode != 0, timeout=3,
               what="device gone with its process")
    eventually(lambda: a.sh("ip", "link", "show", "flannel-wg", check=False).returncode == 0 and
               list(wg_dump(a)["peers"]) == [bkey], timeout=5, what="device recreated with its peer")
    assert "repaired drift" in a.log() and wg_dump(b)["public_key"] == bkey  # b's process untouched
    assert wg_dump(a)["public_key"] == key
    eventually(lambda: ping(pa, pb.addr).returncode == 0, timeout=5, what="traffic again")

    cluster.stop(a)
    kill_wireguard_go(a)
    eventually(lambda: a.sh("ip", "link", "show", "flannel-wg", check=False).returncode != 0, timeout=3,
               what="device gone")
    cluster.start(a)
    eventually(lambda: len(wg_dump(a)["peers"]) == 1, timeout=5, what="peers replayed")
    assert wg_dump(a)["public_key"] == key
    eventually(lambda: ping(pa, pb.addr).returncode == 0, timeout=5, what="traffic after restart")


def test_peer_lease_without_port_and_an_upstream_style_lease(make_cluster):
    """A lease as upstream before v0.26.6 writes it (no Port): reached on our own listen port."""
    cluster = wg_cluster(make_cluster, 2, {**WG, "Backend": {"Type": "wireguard", "ListenPort": 51900}})
    start_all(cluster)
    a = cluster.nodes[0]
    lease = json.dumps({"PublicIP": "198.51.100.77", "PublicIPv6": None, "BackendType": "wireguard",
                        "BackendData": {"PublicKey": "hA3o0ZdPN1S3fPYGyIqhJDqLRcmCN0VwVtHyyWy6ykM="}},
                       separators=(",", ":"))
    key = cluster.prefix + "/subnets/198.18.201.0-24"
    cluster.etcd_client.put(key, lease.encode())
    eventually(lambda: "hA3o0ZdPN1S3fPYGyIqhJDqLRcmCN0VwVtHyyWy6ykM=" in wg_dump(a)["peers"], timeout=2,
               what="old-style peer programmed")
    assert wg_dump(a)["peers"]["hA3o0ZdPN1S3fPYGyIqhJDqLRcmCN0VwVtHyyWy6ykM="]["endpoint"] == "198.51.100.77:51900"
    cluster.etcd_client.delete(key)
    eventually(lambda: "hA3o0ZdPN1S3fPYGyIqhJDqLRcmCN0VwVtHyyWy6ykM=" not in wg_dump(a)["peers"], timeout=2,
               what="old-style peer removed")


def flannelctl(cluster, node, *args: str) -> subprocess.CompletedProcess[str]:
    """flannelctl on `node` (in its private /run, where the key file and wireguard-go's sockets are)."""
    env = {"PATH": os.environ["PATH"], "FLANNELCTL_ETCD_ENDPOINTS": cluster.endpoint,
           "FLANNELCTL_ETCD_PREFIX": cluster.prefix}
    proc = subprocess.run(node.wrap([lab.tool("flannelctl"), *args]), capture_output=True, text=True, env=env,
                          timeout=60)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


def test_doctor_and_subnets_list_on_wireguard(make_cluster):
    cluster = wg_cluster(make_cluster, 2, {**WG, "Backend": {"Type": "wireguard", "PSK": PSK}})
    start_all(cluster)
    node, peer = cluster.nodes
    private = node.sh("cat", "/run/flannel/wgkey").stdout.strip()
    listing = flannelctl(cluster, node, "subnets", "list")
    assert listing.returncode == 0 and "IDENTITY" in listing.stdout.splitlines()[0]
    for n in cluster.nodes:
        assert wg_dump(n)["public_key"] in listing.stdout
    doctor = ("doctor", "--subnet-file", node.subnet_file)
    out = flannelctl(cluster, node, *doctor)
    assert out.returncode == 0 and "healthy" in out.stdout.splitlines()[-1], out.stdout
    assert "1 WireGuard peers as the leases say" in out.stdout
    assert f"flannel-wg: wireguard-go, port 51820, MTU 1420, public key {wg_dump(node)['public_key']}" in out.stdout

    cluster.stop(node)  # the daemon would repair what follows at once; its state stays on stop
    pkey = wg_dump(peer)["public_key"]
    node.sh("wg", "set", "flannel-wg", "peer", pkey, "remove")
    node.sh("wg", "set", "flannel-wg", "listen-port", "51999")
    proc = flannelctl(cluster, node, *doctor, "-o", "json")
    report = json.loads(proc.stdout)
    problems = [f["text"] for f in report["findings"] if f["level"] == "problem"]
    assert proc.returncode == 1, proc.stdout
    assert f"missing wireguard peer {pkey} endpoint {peer.ip}:51820 allowed-ips {cluster.subnet(peer)} with PSK " \
           "dev flannel-wg" in problems
    assert "flannel-wg listens on port 51999, expected 51820" in problems
    for secret in (private, PSK):
        assert secret not in proc.stdout + proc.stderr + listing.stdout
    cluster.start(node)  # and the daemon puts both right
    eventually(lambda: pkey in wg_dump(node)["peers"] and wg_dump(node)["listen_port"] == 51820, timeout=3,
               what="repaired")


def test_bad_inputs_are_one_clear_line(make_cluster):
    cluster = wg_cluster(make_cluster, 1, WG)
    (node,) = cluster.nodes
    # the kernel provider forced on a kernel without the module: named, exit 1, nothing leased
    proc = cluster.start(node, "--wireguard-provider=kernel", wait=False)
    assert proc.wait(20) == 1
    assert "creating wireguard device flannel-wg: Operation not supported" in node.log()
    assert "Traceback" not in node.log() and cluster.etcd_client.list_prefix(cluster.prefix + "/subnets/")[1] == []
    # a key file that holds no key is never replaced
    node.sh("sh", "-c", "echo not-a-key > /run/flannel/wgkey")
    proc = cluster.start(node, wait=False)
    assert proc.wait(20) == 1
    assert "WireGuard key file /run/flannel/wgkey holds no valid key" in node.log()
    assert node.sh("cat", "/run/flannel/wgkey").stdout.strip() == "not-a-key"
    # a PSK that is no key: the daemon waits for a config it can run, and never echoes the value
    node.sh("rm", "/run/flannel/wgkey")
    cluster.set_config({**WG, "Backend": {"Type": "wireguard", "PSK": "c2VjcmV0LXRvby1zaG9ydA=="}})
    cluster.start(node, wait=False)
    eventually(lambda: "Backend.PSK is not a WireGuard key" in node.log(), timeout=10, what="config refused")
    assert "c2VjcmV0LXRvby1zaG9ydA==" not in node.log()
    cluster.set_config(WG)
    node.wait_ready()


def test_wireguard_needs_only_the_units_two_capabilities(make_cluster):
    """The unit's CapabilityBoundingSet (NET_ADMIN, NET_RAW) suffices for wireguard-go too."""
    cluster = wg_cluster(make_cluster, 2, WG)
    node1, node2 = cluster.nodes
    argv = ["setpriv", "--bounding-set=-all,+net_admin,+net_raw", "--", lab.tool("flanneld"),
            f"--etcd-endpoints={cluster.endpoint}", f"--etcd-prefix={cluster.prefix}",
            f"--subnet-file={node1.subnet_file}", "--healthz-port=8471", "--iptables-resync=1"]
    os.makedirs(os.path.dirname(node1.subnet_file), exist_ok=True)
    node1.popen(argv, "flanneld")
    node1.wait_ready()
    cluster.start(node2)
    eventually(lambda: len(wg_dump(node1)["peers"]) == 1 and len(wg_dump(node2)["peers"]) == 1, timeout=5,
               what="peers")
    pid = next(p for p in lab.ip("netns", "pids", node1.ns).stdout.split()
               if b"wireguard-go" in pathlib.Path(f"/proc/{p}/cmdline").read_bytes())
    with open(f"/proc/{pid}/status") as fh:
        bounding = next(line for line in fh if line.startswith("CapBnd:")).split()[1]
    assert int(bounding, 16) == (1 << 12) | (1 << 13)  # wireguard-go runs within the same set
    assert ping(cluster.pod(node1), cluster.pod(node2).addr).returncode == 0


def test_an_endpoint_learnt_from_handshakes_is_kept_and_doctor_says_so(make_cluster):
    """Behind NAT a peer is reached at its mapped address and port, which WireGuard learns from its
    handshakes; a full reconcile wrote the lease's endpoint back every time, cutting such a peer
    off until its next handshake. (What a NAT would teach is set here by hand: the daemon cannot
    tell the two apart, and must leave both alone.)"""
    cluster = wg_cluster(make_cluster, 2, WG)
    start_all(cluster, "--reconcile-interval=1")
    a, b = cluster.nodes
    bkey = wg_dump(b)["public_key"]
    a.sh("wg", "set", "flannel-wg", "peer", bkey, "endpoint", "198.51.100.1:40001")
    time.sleep(3)  # three full reconciles
    assert wg_dump(a)["peers"][bkey]["endpoint"] == "198.51.100.1:40001"
    assert "repaired drift" not in a.log()
    out = flannelctl(cluster, a, "doctor", "--subnet-file", a.subnet_file)
    assert out.returncode == 0, out.stdout
    assert f"wireguard peer {bkey} reached at 198.51.100.1:40001, learnt from its handshakes (its lease: " \
           f"{b.ip}:51820)" in out.stdout
    # the peer's own traffic teaches the right endpoint back, as WireGuard roams
    assert ping(cluster.pod(b), cluster.pod(a).addr, count=3).returncode == 0
    eventually(lambda: wg_dump(a)["peers"][bkey]["endpoint"] == f"{b.ip}:51820", timeout=3, what="roamed back")


def test_a_node_behind_a_nat_that_rewrites_its_port_stays_reachable(make_cluster):
    """Node b sits behind a NAT (its own L2 segment, routed) that maps its WireGuard port 51820 to
    another, as home routers and cloud NAT gateways do, and publishes the NAT's address: node a
    reaches it only at the mapping b's handshakes teach. Every full reconcile (once a second here)
    wrote the lease's endpoint back over it, and a's packets went to a port nothing forwards until
    b's next packet taught the mapping again."""
    config = {**WG, "Backend": {"Type": "wireguard", "PersistentKeepaliveInterval": 5}}
    cluster = wg_cluster(make_cluster, 1, config)
    a = cluster.nodes[0]
    b = cluster.lab.add_remote_node(2)
    b.private_run()
    lab.sh(["nft", "-f", "-"], ns=cluster.lab.ul, input=(
        "table ip flannel_test_nat {\n chain post {\n  type nat hook postrouting priority 100;\n"
        f"  ip saddr {b.ip} udp sport 51820 snat to {lab.ROUTER_IP}:40000-40999\n }}\n}}\n"))
    cluster.start(a, "--reconcile-interval=1")
    cluster.start(b, f"--public-ip={lab.ROUTER_IP}", "--reconcile-interval=1")
    pod_a, pod_b = cluster.pod(a), cluster.pod(b)
    bkey = wg_dump(b)["public_key"]
    eventually(lambda: bkey in wg_dump(a)["peers"], timeout=5, what="b a peer of a")  # at NAT:51820, its lease
    eventually(lambda: ping(pod_b, pod_a.addr, count=1).returncode == 0, timeout=10, what="b's handshake through")
    mapped = wg_dump(a)["peers"][bkey]["endpoint"]
    assert mapped.startswith(f"{lab.ROUTER_IP}:40"), mapped  # the NAT's port, learnt from b's handshake
    probes = BothWays(pod_a, pod_b)
    start = time.monotonic()
    time.sleep(6)  # six full reconciles on each node, one keepalive
    end = time.monotonic()
    time.sleep(0.3)
    probes.stop().assert_through(start, end)
    assert wg_dump(a)["peers"][bkey]["endpoint"] == mapped
    assert "repaired drift" not in a.log()
