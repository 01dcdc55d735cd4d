"""flanneld on real namespaces: data path, churn, restarts, drift, firewall, health."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from flanneld import lab
from flanneld.lab.flannel import NETWORK
from flanneld.lab.probes import BothWays, eventually, ping, tcp_exchange
from flanneld.lab.readers import fdbs, link, neighs, routes
from flanneld.leases.watcher import LeaseWatcher
from flanneld.model import subnetenv
from flanneld.model.lease import leases_prefix


def gateway(cluster, node) -> str:
    return cluster.subnet(node).split("/")[0]


def test_three_nodes_pods_ping_and_tcp_over_vxlan(make_cluster, tmp_path):
    from scapy.all import IP, UDP, bind_layers, rdpcap
    from scapy.layers.vxlan import VXLAN

    cluster = make_cluster(3, NETWORK)
    cluster.start_all()
    pods = [cluster.pod(node) for node in cluster.nodes]
    pcap = tmp_path / "underlay.pcap"
    capture = subprocess.Popen(["ip", "netns", "exec", cluster.lab.ul, "tcpdump", "-i", "br0", "-nn", "-U", "-c", "6",
                                "-w", str(pcap), "udp", "port", "8472"], stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    for src in pods:
        for dst in pods:
            if src is not dst:
                result = ping(src, dst.addr)
                assert result.returncode == 0, f"{src.name} -> {dst.addr}: {result.stdout}{result.stderr}"
                assert tcp_exchange(src, dst) == "pct revo lennalf"
    capture.wait(10)
    bind_layers(UDP, VXLAN, dport=8472)
    packets = [p for p in rdpcap(str(pcap)) if p.haslayer(VXLAN)]
    assert packets, "no VXLAN packets on the underlay"
    pod_ips = {p.addr for p in pods}
    for packet in packets:
        assert packet[UDP].dport == 8472
        assert packet[VXLAN].vni == 1
        inner = packet[VXLAN].payload
        assert inner.haslayer(IP) and inner[IP].src in pod_ips and inner[IP].dst in pod_ips
        assert packet[IP].src.startswith("198.51.100.1")  # outer: node addresses

    node1 = cluster.nodes[0]
    dev = link(node1)
    assert dev["mtu"] == 1450 and dev["linkinfo"]["info_kind"] == "vxlan"
    data = dev["linkinfo"]["info_data"]
    assert data["id"] == 1 and data["port"] == 8472 and data["local"] == node1.ip and not data["learning"]
    assert cluster.env(node1).mtu == 1450
    # upstream's per-peer entries: neighbour, FDB entry, onlink route
    for peer in cluster.nodes[1:]:
        lease = cluster.lease(peer)
        mac = lease.backend["VtepMAC"]
        assert neighs(node1)[gateway(cluster, peer)] == mac
        assert fdbs(node1)[mac] == peer.ip
        route = routes(node1)[cluster.subnet(peer)]
        assert route["gateway"] == gateway(cluster, peer) and route["dev"] == "flannel.1"
        assert "onlink" in route["flags"]
    assert node1.http("/metrics")[1].count("flanneld_peers 2") == 1


def test_peer_leaving_and_joining_within_one_second(make_cluster):
    cluster = make_cluster(3, NETWORK)
    cluster.start_all()
    node1, node2, node3 = cluster.nodes
    gone = cluster.subnet(node3)
    gone_mac = cluster.lease(node3).backend["VtepMAC"]
    assert cluster.stop(node3) == 0
    cluster.etcd_client.delete(cluster.lease_key(node3))
    for node in (node1, node2):
        took = eventually(lambda n=node: gone not in routes(n) and gone.split("/")[0] not in neighs(n)
                          and gone_mac not in fdbs(n), timeout=1.0, what="entries of the departed peer removed")
        assert took < 1.0

    # a new node joins: time from its lease appearing in etcd to routes on the others
    appeared: dict[str, float] = {}
    watcher = LeaseWatcher(cluster.etcd_client, cluster.prefix)
    watcher.resync()
    thread = threading.Thread(target=watcher.run, args=(
        lambda evs: [appeared.setdefault(e.key, time.monotonic()) for e in evs],), daemon=True)
    thread.start()
    try:
        node4 = cluster.lab.add_node(4)
        cluster.start(node4, wait=False)
        eventually(lambda: appeared, timeout=15, what="the new node's lease")
        key, t0 = next(iter(appeared.items()))
        subnet = key.replace("-", "/")
        for node in (node1, node2):
            eventually(lambda n=node: subnet in routes(n), timeout=1.0, what=f"route to {subnet} on {node.ns}")
        assert time.monotonic() - t0 < 1.0
        node4.wait_ready()
        assert ping(cluster.pod(node1), cluster.pod(node4).addr).returncode == 0
    finally:
        watcher.stop()
        thread.join(5)


HOST_GW = {"Network": "198.18.0.0/16", "Backend": {"Type": "host-gw"}}
BACKENDS = pytest.mark.parametrize("config", [NETWORK, HOST_GW], ids=["vxlan", "host-gw"])


def own_identity(cluster, node, config) -> tuple:
    """Subnet, etcd lease and (VXLAN) the device MAC: what a restart keeps."""
    mac = link(node)["address"] if config is NETWORK else None
    return cluster.subnet(node), mac, cluster.etcd_client.get(cluster.lease_key(node)).lease_id


@BACKENDS
def test_hitless_restart_keeps_every_packet(make_cluster, config):
    cluster = make_cluster(2, config)
    cluster.start_all()
    node1, node2 = cluster.nodes
    pod1, pod2 = cluster.pod(node1), cluster.pod(node2)
    before = own_identity(cluster, node1, config)
    probes = BothWays(pod1, pod2)
    start = time.monotonic()
    assert cluster.stop(node1) == 0  # SIGTERM: exit 0, data plane left in place
    assert cluster.subnet(node2) in routes(node1) and (config is HOST_GW or link(node1) is not None)
    assert os.path.exists(node1.subnet_file)
    cluster.start(node1)
    # adopted: its first full reconcile is over (it wrote nothing: the state was all there)
    eventually(lambda: "watching leases from revision" in node1.log().split("starting;")[-1], timeout=5,
               what="the new daemon's watch")
    end = time.monotonic()
    time.sleep(0.3)
    probes.stop().assert_through(start, end)
    assert own_identity(cluster, node1, config) == before  # same subnet, same VTEP MAC, same etcd lease


@pytest.mark.parametrize(("config", "what"), [(NETWORK, "route"), (NETWORK, "neighbour"), (NETWORK, "fdb"),
                                              (NETWORK, "device"), (NETWORK, "address"), (HOST_GW, "route")],
                         ids=["route", "neighbour", "fdb", "device", "address", "host-gw-route"])
def test_drift_is_repaired_within_one_second(make_cluster, config, what):
    cluster = make_cluster(2, config)
    cluster.start_all()
    node1, node2 = cluster.nodes
    peer_subnet, peer_gw = cluster.subnet(node2), gateway(cluster, node2)
    vxlan = config is NETWORK
    mac = cluster.lease(node2).backend["VtepMAC"] if vxlan else None
    own_mac = link(node1)["address"] if vxlan else None
    own_addr = f"{gateway(cluster, node1)}/32"
    if what == "route":
        node1.sh("ip", "route", "del", peer_subnet)
    elif what == "neighbour":
        node1.sh("ip", "neigh", "del", peer_gw, "dev", "flannel.1")
    elif what == "fdb":
        node1.sh("bridge", "fdb", "del", mac, "dev", "flannel.1", "dst", node2.ip)
    elif what == "address":
        node1.sh("ip", "addr", "del", own_addr, "dev", "flannel.1")
    else:
        node1.sh("ip", "link", "del", "flannel.1")

    def repaired() -> bool:
        if not vxlan:
            return routes(node1).get(peer_subnet, {}).get("gateway") == node2.ip
        dev = link(node1)
        addrs = [f"{a['local']}/{a['prefixlen']}" for a in node1.sh_json("ip", "-j", "addr", "show", "dev",
                                                                          "flannel.1")[0]["addr_info"]] if dev else []
        return bool(dev and dev["address"] == own_mac and own_addr in addrs and peer_subnet in routes(node1)
                    and neighs(node1).get(peer_gw) == mac and fdbs(node1).get(mac) == node2.ip)

    took = eventually(repaired, timeout=1.0, what=f"{what} repaired")
    assert took < 1.0
    assert ping(cluster.pod(node1), cluster.pod(node2).addr).returncode == 0
    assert "repaired drift" in node1.log()


@BACKENDS
def test_peer_removed_while_down_is_cleaned_up_at_start(make_cluster, config):
    cluster = make_cluster(3, config)
    cluster.start_all()
    node1, _node2, node3 = cluster.nodes
    gone = cluster.subnet(node3)
    assert gone in routes(node1)
    assert cluster.stop(node1) == 0
    assert cluster.stop(node3) == 0
    cluster.etcd_client.delete(cluster.lease_key(node3))
    time.sleep(0.2)
    assert gone in routes(node1)  # nobody told node1 yet
    cluster.start(node1)
    assert gone not in routes(node1)
    if config is NETWORK:
        assert gone.split("/")[0] not in neighs(node1)


def masq_cluster(make_cluster, nftables: bool):
    config = {**NETWORK, "EnableNFTables": nftables}
    cluster = make_cluster(2, config)
    cluster.start_all("--ip-masq")
    return cluster


@pytest.mark.parametrize("nftables", [False, True], ids=["iptables", "nftables"])
def test_ip_masq_outside_traffic_only(make_cluster, tmp_path, nftables):
    from scapy.all import ICMP, IP, rdpcap

    cluster = masq_cluster(make_cluster, nftables)
    node1, node2 = cluster.nodes
    pod1, pod2 = cluster.pod(node1), cluster.pod(node2)
    outside_pcap, pod_pcap = tmp_path / "outside.pcap", tmp_path / "pod.pcap"
    captures = [
        subprocess.Popen(["ip", "netns", "exec", cluster.lab.out, "tcpdump", "-i", "any", "-nn", "-U", "-c", "1",
                          "-w", str(outside_pcap), "icmp[icmptype] == icmp-echo"], stderr=subprocess.DEVNULL),
        subprocess.Popen(["ip", "netns", "exec", pod2.name, "tcpdump", "-i", "any", "-nn", "-U", "-c", "1",
                          "-w", str(pod_pcap), "icmp[icmptype] == icmp-echo"], stderr=subprocess.DEVNULL),
    ]
    time.sleep(0.5)
    assert ping(pod1, lab.OUTSIDE_HOST_IP).returncode == 0  # the outside host has no route to pods: needs masq
    assert ping(pod1, pod2.addr).returncode == 0
    for capture in captures:
        capture.wait(10)
    outside = [p for p in rdpcap(str(outside_pcap)) if p.haslayer(ICMP)]
    assert outside[0][IP].src == node1.ip  # masqueraded to the node's address
    inside = [p for p in rdpcap(str(pod_pcap)) if p.haslayer(ICMP)]
    assert inside[0][IP].src == pod1.addr  # pod to pod keeps the pod address
    assert cluster.env(node1).ipmasq
    if nftables:
        assert "masquerade" in node1.sh("nft", "list", "table", "ip", "flannel-ipv4").stdout
        assert "FLANNEL-POSTRTG" not in node1.sh("iptables-save").stdout
    else:
        assert "-j MASQUERADE --random-fully" in node1.sh("iptables-save", "-t", "nat").stdout


@pytest.mark.parametrize("nftables", [False, True], ids=["iptables", "nftables"])
def test_pods_reach_each_other_under_a_forward_drop_policy(make_cluster, nftables):
    """Docker sets iptables' FORWARD policy to DROP. Our nftables accept ends only our own chain, so
    in nftables mode the flannel networks are accepted in that chain too; a flush is repaired."""
    cluster = make_cluster(2, {**NETWORK, "EnableNFTables": nftables})
    for node in cluster.nodes:
        node.sh("iptables", "-P", "FORWARD", "DROP")
    cluster.start_all()
    node1, node2 = cluster.nodes
    pod1, pod2 = cluster.pod(node1), cluster.pod(node2)
    assert ping(pod1, pod2.addr).returncode == 0 and ping(pod2, pod1.addr).returncode == 0
    node1.sh("iptables", "-F", "FLANNEL-FWD")  # someone flushes it: the periodic check restores it
    eventually(lambda: "-A FLANNEL-FWD" in node1.sh("iptables-save", "-t", "filter").stdout, timeout=3,
               what="FLANNEL-FWD restored")
    assert ping(pod1, pod2.addr).returncode == 0 and ping(pod2, pod1.addr).returncode == 0
    if nftables:
        assert "accept" in node1.sh("nft", "list", "table", "ip", "flannel-ipv4").stdout


def test_without_ip_masq_outside_is_unreachable(make_cluster):
    cluster = make_cluster(1, NETWORK)
    cluster.start_all()
    node = cluster.nodes[0]
    assert ping(cluster.pod(node), lab.OUTSIDE_HOST_IP, count=1, timeout=1).returncode != 0
    assert "FLANNEL-POSTRTG" not in node.sh("iptables-save", "-t", "nat").stdout
    assert '-A FLANNEL-FWD -s 198.18.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT' in \
        node.sh("iptables-save", "-t", "filter").stdout


@pytest.mark.parametrize("nftables", [False, True], ids=["iptables", "nftables"])
def test_firewall_drift_is_repaired(make_cluster, nftables):
    cluster = masq_cluster(make_cluster, nftables)
    node = cluster.nodes[0]
    if nftables:
        node.sh("nft", "flush", "chain", "ip", "flannel-ipv4", "postrtg")
        check = lambda: "masquerade" in node.sh("nft", "list", "table", "ip", "flannel-ipv4").stdout  # noqa: E731
    else:
        node.sh("iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG")
        check = lambda: node.sh("iptables-save", "-t", "nat").stdout.count("-A FLANNEL-POSTRTG") == 6  # noqa: E731
    eventually(check, timeout=3.0, what="firewall rules restored")
    assert "firewall rules drifted" in node.log()
    assert ping(cluster.pod(node), lab.OUTSIDE_HOST_IP).returncode == 0


def test_own_lease_deleted_is_reacquired(make_cluster):
    cluster = make_cluster(2, NETWORK)
    cluster.start_all()
    node1, node2 = cluster.nodes
    key, subnet = cluster.lease_key(node1), cluster.subnet(node1)
    cluster.etcd_client.delete(key)
    eventually(lambda: cluster.etcd_client.get(key) is not None, timeout=2.0, what="lease re-acquired")
    assert cluster.subnet(node1) == subnet
    assert node1.procs[-1].poll() is None
    assert ping(cluster.pod(node2), cluster.pod(node1).addr).returncode == 0


def test_waits_for_valid_config_and_ignores_bad_leases(make_cluster):
    cluster = make_cluster(2)
    node1, node2 = cluster.nodes
    cluster.start(node1, wait=False)
    eventually(lambda: "flannel config not found in etcd store" in node1.log(), timeout=10, what="waiting log line")
    code, body = node1.http("/readyz")
    assert code == 503 and "waiting for network config" in body
    cluster.set_config('{"Network": "198.18.0.0/29"}')
    eventually(lambda: "network is too small" in node1.log(), timeout=5, what="validation error logged")
    head = leases_prefix(cluster.prefix)
    cluster.etcd_client.put(head + "198.18.200.0-24", b"{definitely not json")
    cluster.etcd_client.put(head + "not-a-subnet", b"{}")
    cluster.set_config(NETWORK)
    node1.wait_ready()
    cluster.start(node2)
    assert ping(cluster.pod(node1), cluster.pod(node2).addr).returncode == 0
    log = node1.log()
    assert "ignoring malformed lease entry" in log and "Traceback" not in log
    assert "198.18.200.0/24" not in routes(node1)


def test_an_etcd_outage_is_readiness_not_liveness(make_cluster, session_lab):
    """/healthz is liveness: an etcd outage must not make a probe restart every node at once.
    /readyz says it, with the reason, and ?verbose lists every check."""
    server = lab.EtcdServer("health")
    server.start()
    try:
        cluster = make_cluster(1, None, etcd_endpoint=server.endpoint_for(lab.CTL_IP))
        cluster.etcd_client.close()
        from flanneld.etcd.client import EtcdClient
        from flanneld.etcd.options import EtcdOptions

        cluster.etcd_client = EtcdClient(EtcdOptions(endpoints=(server.endpoint,), prefix=cluster.prefix))
        cluster.set_config(NETWORK)
        node = cluster.nodes[0]
        cluster.start(node)
        assert node.http("/healthz") == (200, "flanneld is running\n")
        server.stop()

        def not_ready() -> bool:  # code and reason from one response: a stopping etcd may accept one last watch
            code, body = node.http("/readyz")
            return code == 503 and body.startswith("not ready: etcd lease watch is down")

        eventually(not_ready, timeout=20, what="not ready, naming the watch, while etcd is down")
        assert node.http("/healthz") == (200, "flanneld is running\n")  # alive all the same
        code, body = node.http("/readyz?verbose")
        assert code == 503 and body.startswith("[+]node ok\n[-]etcd-watch failed: etcd lease watch is down")
        assert body.endswith("readyz check failed\n")
        server.start()
        eventually(lambda: node.http("/readyz")[0] == 200, timeout=20, what="ready again")
        assert node.http("/readyz?verbose")[1].endswith("readyz check passed\n")
    finally:
        server.destroy()


def test_a_process_that_ignores_sigterm_is_killed_and_reported_with_its_log(make_cluster):
    # what the suite and the benches do with a daemon that hangs on stop: the error shows its log
    node = make_cluster(1, NETWORK).nodes[0]
    proc = node.popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                       "print('still here', flush=True); time.sleep(60)"], "stubborn")
    eventually(lambda: "still here" in node.log("stubborn"), timeout=10, what="the process running")
    with pytest.raises(lab.LabError) as err:
        node.stop(proc, signal.SIGTERM, timeout=1)
    assert proc.returncode is not None  # asked for its stacks (SIGUSR1), then killed
    assert "did not exit within 1s of SIGTERM" in str(err.value) and "still here" in str(err.value)


def test_sigterm_exit_zero_and_systemd_notification(make_cluster, tmp_path):
    cluster = make_cluster(1, NETWORK)
    node = cluster.nodes[0]
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(20)
    cluster.start(node, env={"NOTIFY_SOCKET": sock_path})
    assert sock.recv(4096).decode().startswith("READY=1\nSTATUS=lease 198.18.")
    # SIGUSR1: every thread's stack into the log (what to ask for when a daemon seems stuck), no stop;
    # READY=1 comes before the watch, netlink and config threads start: wait for them to run
    eventually(lambda: "watching leases from revision" in node.log(), timeout=5, what="the lease watch")
    daemon = node.procs[-1]
    daemon.send_signal(signal.SIGUSR1)
    threads = ("MainThread", "signals", "lease-watch", "netlink-monitor", "config-monitor", "health")
    eventually(lambda: daemon.poll() is not None or all(f"({thread}) (most recent call first):" in node.log()
                                                        for thread in threads), timeout=5, what="a stack dump")
    assert daemon.poll() is None, f"SIGUSR1 killed the daemon ({daemon.returncode}):\n{node.log()[-4000:]}"
    assert 'File "' in node.log() and node.http("/readyz")[0] == 200
    assert cluster.stop(node, signal.SIGTERM) == 0
    assert sock.recv(4096) == b"STOPPING=1"
    sock.close()
    assert "Traceback" not in node.log()


@contextlib.contextmanager
def one_thread_frozen(tid: int):
    """Stop one thread of a process, the others running on (ptrace's SEIZE + INTERRUPT stop only
    the tracee; SIGSTOP would stop them all), and let it go on leaving."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    seize, interrupt, detach, wall = 0x4206, 0x4207, 17, 0x40000000
    if libc.ptrace(seize, tid, None, None) != 0:
        raise OSError(ctypes.get_errno(), f"PTRACE_SEIZE {tid}")
    try:
        assert libc.ptrace(interrupt, tid, None, None) == 0
        assert os.waitpid(tid, wall)[0] == tid  # in its ptrace stop now
        yield
    finally:
        libc.ptrace(detach, tid, None, None)


def test_healthz_turns_503_while_the_event_loop_is_stuck_and_200_once_it_runs(make_cluster):
    """The rule: no turn of the loop for max(60 s, 3 reconcile intervals). The loop thread (the
    process's main thread) is frozen while every other thread, /healthz's too, runs on."""
    cluster = make_cluster(1, NETWORK)
    node = cluster.nodes[0]
    daemon = cluster.start(node, "--reconcile-interval=10")  # the rule's floor: 60 s
    with open(f"/proc/{daemon.pid}/comm") as comm:
        assert comm.read().strip() == "flanneld"
    for _ in range(5):
        with one_thread_frozen(daemon.pid):
            try:
                node.http("/healthz", timeout=3)
            except OSError:
                continue  # frozen holding the interpreter lock (mid-bytecode): every thread waits; again
            frozen = time.monotonic()
            eventually(lambda: node.http("/healthz")[0] == 503, timeout=70, interval=1, what="503 while stuck")
            assert time.monotonic() - frozen >= 57  # not before the rule says (the last turn may precede it)
            status, body = node.http("/healthz")
            assert status == 503 and "unhealthy: event loop has not run for" in body, body
            assert node.http("/readyz")[0] == 200  # ready it still is: the lease and data plane stand
            break
    else:
        pytest.fail("the loop thread was frozen holding the interpreter lock five times in a row")
    eventually(lambda: node.http("/healthz")[0] == 200, timeout=3, what="healthy once the loop runs again")
    assert daemon.poll() is None and "Traceback" not in node.log()


def test_a_second_daemon_is_refused_naming_the_first_which_loses_nothing(make_cluster, tmp_path):
    """An operator trying a flag by hand while the service runs: the same subnet file, or another
    one for the same node on the same network. Each is refused in one line naming the running
    daemon's PID, before it touches anything; the first keeps every packet and its etcd lease."""
    cluster = make_cluster(2, NETWORK)
    cluster.start_all()
    node1, node2 = cluster.nodes
    first = node1.procs[-1]
    lease = cluster.etcd_client.get(cluster.lease_key(node1))
    probes = BothWays(cluster.pod(node1), cluster.pod(node2))
    start = time.monotonic()
    same = node1.start_flanneld(cluster.endpoint, cluster.prefix, "--iptables-resync=1", "--ip-masq")
    assert same.wait(20) == 1
    identity = node1.start_flanneld(cluster.endpoint, cluster.prefix, f"--subnet-file={tmp_path}/other.env",
                                    healthz_port=8472)
    assert identity.wait(20) == 1
    node1.healthz_port = 8471
    end = time.monotonic()
    time.sleep(0.3)
    probes.stop().assert_through(start, end)
    refusals = [line for line in node1.log().splitlines() if "another flanneld" in line]
    assert len(refusals) == 2 and all(f"another flanneld (PID {first.pid})" in line for line in refusals), refusals
    assert f"runs for the subnet file {node1.subnet_file}" in refusals[0]
    assert f"runs as this node ({node1.ip}) on the network at {cluster.prefix}" in refusals[1]
    assert not os.path.exists(f"{tmp_path}/other.env")
    assert first.poll() is None and node1.http("/healthz")[0] == 200
    after = cluster.etcd_client.get(cluster.lease_key(node1))
    assert (after.lease_id, after.mod_revision) == (lease.lease_id, lease.mod_revision)  # not even rewritten
    assert "Traceback" not in node1.log()


@pytest.mark.parametrize("nftables", [False, True], ids=["iptables", "nftables"])
def test_two_daemons_for_two_networks_on_one_host_both_keep_working(make_cluster, tmp_path, nftables):
    """Upstream's running.md allows it (another --etcd-prefix and --subnet-file). Both wrote the same
    firewall chains: each flushed the other's rules and saw its own missing at its next check, every
    second here. Each owns the rules naming its network now; both overlays carry pods, and neither
    daemon ever sees drift."""
    half_a = {"Network": "198.18.0.0/17", "SubnetMax": "198.18.120.0", "EnableNFTables": nftables,
              "Backend": {"Type": "vxlan"}}
    half_b = {"Network": "198.18.128.0/17", "SubnetMax": "198.18.250.0", "EnableNFTables": nftables,
              "Backend": {"Type": "vxlan", "VNI": 2}}
    cluster = make_cluster(2, half_a)
    prefix_b = cluster.prefix.replace("/network", "/second")
    cluster.etcd_client.put(prefix_b + "/config", json.dumps(half_b).encode())
    cluster.start_all("--ip-masq")
    nodes = cluster.nodes
    pods_b = []
    for n, node in enumerate(nodes, 1):
        env_b = f"{tmp_path}/{n}-second.env"
        node.start_flanneld(cluster.endpoint, prefix_b, f"--subnet-file={env_b}", "--ip-masq", "--iptables-resync=1",
                            healthz_port=8472)
        node.wait_ready()
        env = subnetenv.read(env_b)
        pods_b.append(node.add_pod(str(env.subnet), 2, bridge=f"{cluster.lab.prefix}-cni1", mtu=env.mtu))
        node.healthz_port = 8471
    probes = [BothWays(cluster.pod(nodes[0]), cluster.pod(nodes[1])), BothWays(*pods_b)]
    start = time.monotonic()
    time.sleep(5)  # five firewall checks of each of the four daemons
    end = time.monotonic()
    time.sleep(0.3)
    for p in probes:
        p.stop().assert_through(start, end)
    for node in nodes:
        assert "drifted" not in node.log(), node.log()[-2000:]
        rules = node.sh("nft", "list", "table", "ip", "flannel-ipv4").stdout if nftables else \
            node.sh("iptables-save", "-t", "nat").stdout
        assert "198.18.0.0/17" in rules and "198.18.128.0/17" in rules
        assert sum("mark" in line for line in rules.splitlines()) == 1  # the mark's RETURN, once for both
        assert "Traceback" not in node.log()


def test_the_lock_dies_with_its_holder(make_cluster):
    cluster = make_cluster(1, NETWORK)
    node = cluster.nodes[0]
    cluster.start(node)
    assert cluster.stop(node, signal.SIGKILL) == -signal.SIGKILL  # no clean-up ran
    assert os.path.exists(node.subnet_file + ".lock")
    cluster.start(node)  # nothing stale blocks it
    assert node.log().count("another flanneld") == 0


def test_a_unit_written_for_upstream_starts_this_daemon_unchanged(make_cluster):
    """klog's flags and the Kubernetes ones at their off values, as upstream's units carry them."""
    cluster = make_cluster(1, NETWORK)
    node = cluster.nodes[0]
    cluster.start(node, "-logtostderr", "-v=2", "--kube-subnet-mgr=false", "--kube-api-url=",
                  "-vmodule=main=3", env={"FLANNELD_NET_CONFIG_PATH": "/etc/kube-flannel/net-conf.json"})
    assert node.http("/readyz")[0] == 200
    assert node.log().count("is klog's flag") == 2 and "Traceback" not in node.log()


def test_environment_flags_and_command_line_precedence(make_cluster):
    cluster = make_cluster(1, NETWORK)
    node = cluster.nodes[0]
    env = {"FLANNELD_ETCD_ENDPOINTS": cluster.endpoint, "FLANNELD_ETCD_PREFIX": cluster.prefix,
           "FLANNELD_SUBNET_FILE": node.subnet_file, "FLANNELD_HEALTHZ_PORT": "8471", "FLANNELD_IP_MASQ": "true",
           "FLANNELD_PUBLIC_IP": "198.51.100.77"}
    node.popen(["flanneld" if not os.path.exists(lab.tool("flanneld")) else lab.tool("flanneld"),
                "-ip-masq=false"], "flanneld", env=env)
    node.wait_ready()
    assert cluster.env(node).ipmasq is False  # the command line wins
    assert str(cluster.lease(node).public_ip) == "198.51.100.77"  # the environment applies


def test_interface_selection_flags(make_cluster):
    cluster = make_cluster(1, NETWORK)
    node = cluster.nodes[0]
    extra = f"{cluster.lab.prefix}-x0"
    node.sh("ip", "link", "add", extra, "type", "veth", "peer", "name", f"{cluster.lab.prefix}-x1")
    node.sh("ip", "addr", "add", "198.51.100.200/32", "dev", extra)
    node.sh("ip", "link", "set", extra, "up")
    node.sh("ip", "route", "add", "203.0.113.128/25", "dev", extra)  # the kernel's answer for can-reach below
    node.sh("ip", "addr", "add", "198.51.100.111/24", "dev", node.ifname)  # eth0's second address
    node.sh("ip", "route", "add", "203.0.113.64/26", "dev", node.ifname, "src", "198.51.100.111")
    for flags, public, local in [
        # the address that chose the interface is the one published and sent from (upstream's rule)
        (("--iface=198.51.100.111",), "198.51.100.111", "198.51.100.111"),
        ((r"--iface-regex=\.111$",), "198.51.100.111", "198.51.100.111"),
        (("--iface-can-reach=203.0.113.70",), "198.51.100.111", "198.51.100.111"),  # the route's source
        (("--public-ip=198.51.100.111",), "198.51.100.111", "198.51.100.111"),  # the interface holding it
        (("--iface=nonexistent0", "--iface-can-reach=203.0.113.130"), "198.51.100.200", "198.51.100.200"),
        ((f"--iface={extra}",), "198.51.100.200", "198.51.100.200"),
        (("--iface=198.51.100.200",), "198.51.100.200", "198.51.100.200"),
        ((r"--iface-regex=^198\.51\.100\.200$",), "198.51.100.200", "198.51.100.200"),
        (("--iface=nonexistent0", f"--iface={node.ifname}"), node.ip, node.ip),
        ((f"--iface-can-reach={lab.ROUTER_IP}",), node.ip, node.ip),
        (("--iface-can-reach=203.0.113.130",), "198.51.100.200", "198.51.100.200"),  # not the default route's
        ((f"--iface={extra}", "--public-ip=198.51.100.222"), "198.51.100.222", "198.51.100.200"),
    ]:
        cluster.start(node, *flags)
        assert str(cluster.lease(node).public_ip) == public, flags
        assert link(node)["linkinfo"]["info_data"]["local"] == local, flags
        assert cluster.stop(node) == 0
    proc = node.start_flanneld(cluster.endpoint, cluster.prefix, "--iface=nonexistent0")
    assert proc.wait(20) == 1
    assert "failed to find an interface matching --iface nonexistent0" in node.log()


def test_interface_selection_flags_in_ipv6(make_cluster):
    """The same rules over IPv6 (an IPv6-only network): the address that chose the interface is
    the one published and sent from (flannel-v6.1's local6)."""
    cluster = make_cluster(1, {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "2001:db8:1800::/56"})
    node = cluster.nodes[0]
    base = node.ip6.rsplit("::", 1)[0]
    extra = f"{cluster.lab.prefix}-x0"
    node.sh("ip", "link", "add", extra, "type", "veth", "peer", "name", f"{cluster.lab.prefix}-x1")
    node.sh("ip", "-6", "addr", "add", f"{base}::200/128", "dev", extra, "nodad")
    node.sh("ip", "link", "set", extra, "up")
    node.sh("ip", "-6", "addr", "add", f"{base}::111/64", "dev", node.ifname, "nodad")  # eth0's second address
    node.sh("ip", "-6", "route", "add", f"{base}::f000/116", "dev", node.ifname, "src", f"{base}::111")
    for flags, public, local in [
        ((f"--iface={base}::111",), f"{base}::111", f"{base}::111"),
        ((r"--iface-regex=::111$",), f"{base}::111", f"{base}::111"),
        ((f"--iface-can-reach={base}::f001",), f"{base}::111", f"{base}::111"),  # the route's source
        ((f"--public-ipv6={base}::111",), f"{base}::111", f"{base}::111"),  # the interface holding it
        ((f"--iface={extra}",), f"{base}::200", f"{base}::200"),
        # behind NAT: published only; sent from eth0's best address (equals: the kernel's order)
        ((f"--iface={node.ifname}", f"--public-ipv6={base}::222"), f"{base}::222", (node.ip6, f"{base}::111")),
    ]:
        cluster.start(node, *flags)
        assert str(cluster.lease(node).public_ipv6) == public, flags
        assert link(node, "flannel-v6.1")["linkinfo"]["info_data"]["local6"] in (local if isinstance(local, tuple)
                                                                                 else (local,)), flags
        assert cluster.stop(node) == 0


def test_ipv6_address_choice_skips_deprecated_and_prefers_permanent_addresses(make_cluster):
    """Upstream v0.28's ranking on a real kernel: a deprecated address (preferred lifetime 0) is never
    chosen, a dynamic one (finite lifetime, as SLAAC and DHCPv6 give) only after a permanent one,
    whatever order the kernel lists them in."""
    cluster = make_cluster(1, {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "2001:db8:1800::/56"})
    node = cluster.nodes[0]
    base = node.ip6.rsplit("::", 1)[0]
    node.sh("ip", "-6", "addr", "add", f"{base}::d1/64", "dev", node.ifname, "nodad", "preferred_lft", "0")
    node.sh("ip", "-6", "addr", "add", f"{base}::d2/64", "dev", node.ifname, "nodad", "valid_lft", "3600",
            "preferred_lft", "3600")
    listed = node.sh("ip", "-6", "-o", "addr", "show", "dev", node.ifname, "scope", "global").stdout
    assert "deprecated" in listed and "dynamic" in listed, listed
    cluster.start(node, f"--iface={node.ifname}")
    assert str(cluster.lease(node).public_ipv6) == node.ip6
    assert cluster.stop(node) == 0
    # a privacy address: the kernel makes temporary ones from a template marked mngtmpaddr
    node.sh("sysctl", "-qw", f"net.ipv6.conf.{node.ifname}.use_tempaddr=2")
    node.sh("ip", "-6", "addr", "add", f"{base}::5/64", "dev", node.ifname, "nodad", "mngtmpaddr", "valid_lft", "3600",
            "preferred_lft", "3600")
    eventually(lambda: "temporary dynamic" in node.sh("ip", "-6", "-o", "addr", "show", "dev", node.ifname).stdout
               and "tentative" not in node.sh("ip", "-6", "-o", "addr", "show", "dev", node.ifname).stdout,
               timeout=5, what="a temporary address past DAD")
    listed = node.sh("ip", "-6", "-o", "addr", "show", "dev", node.ifname, "scope", "global").stdout.splitlines()
    assert "temporary" in listed[0], listed  # listed first: taking the first would pick it
    node.sh("ip", "-6", "addr", "del", f"{node.ip6}/64", "dev", node.ifname)
    cluster.start(node, f"--iface={node.ifname}")  # the permanent one gone: a dynamic one, never the deprecated
    assert str(cluster.lease(node).public_ipv6) in (f"{base}::d2", f"{base}::5")  # nor the temporary
    assert cluster.stop(node) == 0
    # upstream #2072: --public-ipv6 naming an address of the interface is the address sent from too
    cluster.start(node, f"--iface={node.ifname}", f"--public-ipv6={base}::d2")
    assert str(cluster.lease(node).public_ipv6) == f"{base}::d2"
    assert link(node, "flannel-v6.1")["linkinfo"]["info_data"]["local6"] == f"{base}::d2"


def test_an_underlay_mtu_change_is_followed_by_the_devices_and_subnet_env(make_cluster):
    """eth0 9000 -> 1500 under a running daemon left flannel.1 at 8950 and FLANNEL_MTU=8950, silently:
    every full-size packet lost. The device and subnet.env follow now, with one warning that pods
    started before keep their MTU."""
    cluster = make_cluster(1, NETWORK)
    node = cluster.nodes[0]
    cluster.start(node)
    assert link(node)["mtu"] == 1450 and cluster.env(node).mtu == 1450
    node.sh("ip", "link", "set", node.ifname, "mtu", "1400")
    eventually(lambda: link(node)["mtu"] == 1350 and cluster.env(node).mtu == 1350, timeout=3,
               what="flannel.1 and subnet.env following the underlay")
    line = next(x for x in node.log().splitlines() if "MTU is now 1400" in x)
    assert "the overlay's is 1350 (was 1450)" in line and "pods started before keep MTU 1450" in line
    node.sh("ip", "link", "set", node.ifname, "mtu", "1500")
    eventually(lambda: link(node)["mtu"] == 1450 and cluster.env(node).mtu == 1450, timeout=3, what="and back")
    assert node.log().count("MTU is now") == 2 and "Traceback" not in node.log()


def test_direct_routing_uses_the_underlay(make_cluster):
    cluster = make_cluster(2, {**NETWORK, "Backend": {"Type": "vxlan", "DirectRouting": True}})
    cluster.start_all()
    node1, node2 = cluster.nodes
    route = routes(node1)[cluster.subnet(node2)]
    assert route["gateway"] == node2.ip and route["dev"] == node1.ifname
    assert fdbs(node1) == {} and neighs(node1) == {}
    assert ping(cluster.pod(node1), cluster.pod(node2).addr).returncode == 0


def test_dual_stack(make_cluster):
    cluster = make_cluster(2, {**NETWORK, "EnableIPv6": True, "IPv6Network": "2001:db8:1800::/56"})
    cluster.start_all()
    node1, node2 = cluster.nodes
    env = cluster.env(node1)
    assert env.ipv6_subnet is not None and env.mtu == 1430  # IPv6 encapsulation needs 70 bytes
    assert link(node1)["mtu"] == 1450 and link(node1, "flannel-v6.1")["mtu"] == 1430
    pod1, pod2 = cluster.pod(node1), cluster.pod(node2)
    assert ping(pod1, pod2.addr).returncode == 0
    result = ping(pod1, pod2.ip6.split("/")[0])
    assert result.returncode == 0, result.stdout + result.stderr
    assert cluster.lease_key(node1).endswith("-24&" + str(env.lease_subnet6).replace("/", "-"))
    lease = cluster.etcd_client.get(cluster.lease_key(node1))
    assert lease is not None and b'"BackendV6Data":{"VNI":1,"VtepMAC":' in lease.value


def test_tx_checksum_offload_switch(make_cluster):
    dual = {**NETWORK, "EnableIPv6": True, "IPv6Network": "2001:db8:1800::/56"}
    cluster = make_cluster(1, {**dual, "Backend": {"Type": "vxlan", "DisableTxChecksumOffloading": True}})
    cluster.start_all()
    node = cluster.nodes[0]

    def offload() -> list[str]:
        return node.sh(lab.tool("python3"), "-c", "from flanneld.dataplane.netlink import Kernel; k = Kernel(); "
                       "print(k.tx_checksum('flannel.1'), k.tx_checksum('flannel-v6.1'))").stdout.split()

    assert offload() == ["False", "False"]  # both devices
    cluster.set_config({**dual, "Backend": {"Type": "vxlan", "DisableTxChecksumOffloading": False}})
    assert cluster.stop(node) == 0
    cluster.start(node)
    assert offload() == ["True", "True"]  # switched back off: the kernel's default again


def test_peer_mac_change_replaces_stale_fdb_entry(make_cluster):
    from flanneld.model.lease import LeaseAttrs, backend_json, encode_value

    cluster = make_cluster(2, NETWORK)
    cluster.start_all()
    node1, node2 = cluster.nodes
    old = cluster.lease(node2)
    assert cluster.stop(node2) == 0
    new_mac = "0e:99:88:77:66:55"
    changed = LeaseAttrs(old.public_ip, None, "vxlan", backend_json({"VNI": 1, "VtepMAC": new_mac})).lease(
        old.subnet, None)
    kv = cluster.etcd_client.get(cluster.lease_key(node2))
    cluster.etcd_client.put(kv.key, encode_value(changed), kv.lease_id)
    eventually(lambda: fdbs(node1).get(new_mac) == node2.ip and old.backend["VtepMAC"] not in fdbs(node1)
               and neighs(node1).get(gateway(cluster, node2)) == new_mac, timeout=1.0, what="FDB updated")


def test_interop_with_an_upstream_style_node(make_cluster):
    """A node programmed exactly as upstream flanneld does, with an upstream-format lease."""
    cluster = make_cluster(2, NETWORK)
    node1, upstream = cluster.nodes
    cluster.start(node1)
    mac, subnet, gw = "96:c1:44:57:f9:c6", "198.18.250.0/24", "198.18.250.0"
    value = (f'{{"PublicIP":"{upstream.ip}","PublicIPv6":null,"BackendType":"vxlan",'
             f'"BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}').encode()
    cluster.etcd_client.put(leases_prefix(cluster.prefix) + "198.18.250.0-24", value, cluster.etcd_client.grant(600))
    ours = cluster.lease(node1)
    lab.ipbatch([
        f"link add flannel.1 address {mac} mtu 1450 type vxlan id 1 local {upstream.ip} dev {upstream.ifname} "
        "dstport 8472 nolearning", "link set flannel.1 up", f"addr add {gw}/32 dev flannel.1",
        f"neigh replace {ours.subnet.network_address} lladdr {ours.backend['VtepMAC']} dev flannel.1 nud permanent",
        f"route replace {ours.subnet} via {ours.subnet.network_address} dev flannel.1 onlink",
    ], ns=upstream.ns)
    upstream.sh("bridge", "fdb", "replace", ours.backend["VtepMAC"], "dev", "flannel.1", "dst", node1.ip,
                "self", "permanent")
    eventually(lambda: subnet in routes(node1), timeout=1.0, what="route to the upstream node")
    pod_up = upstream.add_pod("198.18.250.1/24", 1)
    assert ping(cluster.pod(node1), pod_up.addr).returncode == 0


def test_the_blackhole_route_never_cuts_off_the_nodes_own_pods(make_cluster):
    """Upstream's metric-0 blackhole, added before the pod bridge exists, shadows the bridge's
    connected route; ours (metric 4000) only catches what no bridge route takes."""
    cluster = make_cluster(2, NETWORK)
    cluster.start_all("--ip-blackhole-route")
    node1, node2 = cluster.nodes
    subnet = cluster.subnet(node1)
    blackhole = routes(node1)[subnet]
    assert blackhole.get("type") == "blackhole" and blackhole.get("metric") == 4000, blackhole
    pod1, pod2 = cluster.pod(node1), cluster.pod(node2)
    assert node1.sh("ping", "-c", "2", "-i", "0.2", "-W", "1", pod1.addr, check=False).returncode == 0
    assert ping(pod2, pod1.addr).returncode == 0 and ping(pod1, pod2.addr).returncode == 0


def test_the_daemon_never_asks_etcd_for_lease_ttls(make_cluster, session_lab):
    """TTLs are flannelctl's business: a daemon starting among many leases asks etcd for none of
    them (one LeaseTimeToLive per key was an upstream-style cost at scale)."""
    server = lab.EtcdServer("ttl")
    server.start()
    try:
        cluster = make_cluster(1, NETWORK, etcd=server)
        head = leases_prefix(cluster.prefix)
        for n in range(30):
            cluster.etcd_client.put(f"{head}198.18.{200 + n}.0-24",
                                    b'{"PublicIP":"198.51.100.%d","BackendType":"vxlan","BackendData":'
                                    b'{"VNI":1,"VtepMAC":"0e:fb:00:00:00:%02x"}}' % (100 + n, n),
                                    cluster.etcd_client.grant(600))
        node = cluster.nodes[0]
        cluster.start(node)
        time.sleep(1.5)  # a firewall check and the config monitor's first look meanwhile

        def ttl_calls() -> float:
            return lab.etcd_metric(server.endpoint, "grpc_server_handled_total", 'grpc_method="LeaseTimeToLive"')

        assert ttl_calls() == 0
        listed = subprocess.run([lab.tool("flannelctl"), f"--etcd-endpoints={server.endpoint}",
                                 f"--etcd-prefix={cluster.prefix}", "subnets", "list"],
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert ttl_calls() > 0  # the counter is the right one: flannelctl's TTL column moves it
    finally:
        server.destroy()
