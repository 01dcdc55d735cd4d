"""The fault suite: flanneld under process, etcd and network faults, bad data, bad flags and security set-ups.

Every scenario runs on namespaces with a real etcd and real traffic between pods. Long forms
(minute-long outages, a tool hung past its timeout) are marked ``soak`` and run with ``pytest -m
soak``: CI runs them after the rest (.ci/run), the README's test command does not.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from flanneld import lab
from flanneld.etcd.client import EtcdClient
from flanneld.etcd.errors import EtcdError
from flanneld.etcd.options import EtcdOptions
from flanneld.lab.etcd import jwt_auth_token
from flanneld.lab.flannel import NETWORK, Cluster
from flanneld.lab.probes import BothWays, eventually, ping
from flanneld.lab.readers import fdbs, link, neighs, routes
from flanneld.model.lease import leases_prefix
from flanneld.node.metrics import parse

SOAK = pytest.mark.soak
PASSWORD = "fault-suite-Pa55word-q7"
NEW_PEER_WITHIN = 2.0  # seconds from etcd being back to a new peer being programmed


def fake_lease(n: int, subnet: str) -> tuple[str, bytes]:
    """A peer lease in upstream's bytes for a node that does not exist (nothing is sent to it)."""
    value = {"PublicIP": f"198.51.100.{100 + n % 100}", "PublicIPv6": None, "BackendType": "vxlan",
             "BackendData": {"VNI": 1, "VtepMAC": f"0e:fa:{(n >> 8) & 0xFF:02x}:{n & 0xFF:02x}:00:01"}}
    return subnet.replace("/", "-"), json.dumps(value, separators=(",", ":")).encode()


def put_fake(cluster: Cluster, n: int, subnet: str) -> str:
    key, value = fake_lease(n, subnet)
    cluster.etcd_client.put(leases_prefix(cluster.prefix) + key, value)
    return subnet


def no_traceback(*nodes: lab.Node) -> None:
    for node in nodes:
        assert "Traceback" not in node.log(), node.log()[-3000:]


def own_state(cluster: Cluster, node: lab.Node) -> tuple[str, str, int]:
    """(subnet, VTEP MAC, etcd lease id): what a restart must keep."""
    return cluster.subnet(node), link(node)["address"], cluster.etcd_client.get(cluster.lease_key(node)).lease_id


def readyz_asked_on(node: lab.Node) -> str:
    """/readyz's answer, asked on the node itself (while its underlay is down nothing reaches it)."""
    return node.sh(lab.tool("python3"), "-c", "import urllib.request as u\ntry:\n u.urlopen('http://127.0.0.1:8471"
                   "/readyz')\nexcept Exception as e:\n print(e.read().decode())", check=False).stdout


def lost_only_until(probes: BothWays, until: float, what: str) -> None:
    """Probe 2.5 s more, stop, and check that probes were lost (the fault was real) but none after
    `until`, and that probing went on at its rate (20 ms) from then."""
    time.sleep(2.5)
    end = time.monotonic()
    tally = probes.stop()
    late = [round(t - until, 2) for t in tally.lost_at if t > until]
    assert not late, f"probes lost more than 2 s after {what}: {late}"
    assert tally.lost and tally.sent_between(until, end) >= (end - until) / 0.02, tally[:2]


@pytest.fixture
def own_etcd(session_lab):
    """A dedicated etcd the test may stop, pause and restart (the session's serves everyone else)."""
    made: list[lab.EtcdServer] = []

    def make(**kw) -> lab.EtcdServer:
        server = lab.EtcdServer(f"f{len(made)}", **kw)
        made.append(server)
        server.start()
        return server

    yield make
    for server in made:
        server.destroy()


# -- process ------------------------------------------------------------------------------------


def test_kill_9_under_ping_loses_nothing_and_keeps_subnet_and_mac(make_cluster):
    cluster = make_cluster(2, NETWORK)
    cluster.start_all()
    node1, node2 = cluster.nodes
    pod1, pod2 = cluster.pod(node1), cluster.pod(node2)
    before = own_state(cluster, node1)
    probes = BothWays(pod1, pod2)
    start = time.monotonic()
    assert cluster.stop(node1, signal.SIGKILL) == -signal.SIGKILL
    time.sleep(0.5)  # the kernel keeps forwarding without the daemon
    cluster.start(node1)
    eventually(lambda: cluster.subnet(node2) in routes(node1), timeout=3, what="peer programmed after restart")
    end = time.monotonic()
    time.sleep(0.3)
    probes.stop().assert_through(start, end)  # every probe, both ways, from the kill to the restarted daemon ready
    assert own_state(cluster, node1) == before
    assert fdbs(node2)[before[1]] == node1.ip
    no_traceback(node1)


def test_twenty_sigterm_restarts_in_a_row(make_cluster):
    cluster = make_cluster(2, NETWORK)
    cluster.start_all()
    node1, node2 = cluster.nodes
    pod1, pod2 = cluster.pod(node1), cluster.pod(node2)
    before = own_state(cluster, node1)
    leases_before = cluster.etcd.lease_ids()
    probes = BothWays(pod1, pod2)
    start = time.monotonic()
    for _ in range(20):
        assert cluster.stop(node1) == 0
        cluster.start(node1)
    end = time.monotonic()
    time.sleep(0.3)
    probes.stop().assert_through(start, end)
    assert own_state(cluster, node1) == before
    assert cluster.etcd.lease_ids() == leases_before  # no etcd lease leaked or replaced on any restart
    assert cluster.subnet(node2) in routes(node1)
    no_traceback(node1)


# -- etcd ---------------------------------------------------------------------------------------


def _etcd_outage(make_cluster, own_etcd, seconds: float) -> None:
    server = own_etcd()
    cluster = make_cluster(2, NETWORK, etcd=server)
    cluster.start_all()
    node1, node2 = cluster.nodes
    pod1, pod2 = cluster.pod(node1), cluster.pod(node2)
    probes = BothWays(pod1, pod2)
    start = time.monotonic()
    server.stop()

    def down() -> bool:
        code, body = node1.http("/readyz")
        return code == 503 and body.startswith("not ready: etcd lease watch is down")

    eventually(down, timeout=20, what="/readyz 503 naming the watch while etcd is down")
    time.sleep(max(0.0, seconds - 1))
    assert node1.http("/healthz")[0] == 200  # alive: the data plane stays, nothing to restart
    server.start()
    back = time.monotonic()
    eventually(lambda: node1.http("/readyz")[0] == 200, timeout=NEW_PEER_WITHIN, what="ready again")
    new = put_fake(cluster, 1, "198.18.250.0/24")
    eventually(lambda: new in routes(node1) and new in routes(node2), timeout=NEW_PEER_WITHIN, what="new peer")
    end = time.monotonic()
    assert end - back <= NEW_PEER_WITHIN + 0.5
    time.sleep(0.3)
    probes.stop().assert_through(start, end)
    no_traceback(node1, node2)


def test_etcd_stopped_keeps_the_data_plane_and_recovers_fast(make_cluster, own_etcd):
    _etcd_outage(make_cluster, own_etcd, seconds=6)


@SOAK
def test_etcd_stopped_for_a_minute(make_cluster, own_etcd):
    _etcd_outage(make_cluster, own_etcd, seconds=60)


def test_etcd_restarted_with_compaction_in_between(make_cluster, own_etcd):
    """The daemon's resume revision is compacted away while it cannot see etcd: it re-lists and diffs."""
    server = own_etcd()
    cluster = make_cluster(2, NETWORK, etcd=server)
    cluster.start_all()
    node1 = cluster.nodes[0]
    gone = put_fake(cluster, 1, "198.18.240.0/24")
    eventually(lambda: gone in routes(node1), what="fake peer programmed")
    daemon = node1.procs[-1]
    daemon.send_signal(signal.SIGSTOP)
    try:
        server.restart()
        cluster.etcd_client.delete(leases_prefix(cluster.prefix) + gone.replace("/", "-"))
        came = put_fake(cluster, 2, "198.18.241.0/24")
        revision, _ = cluster.etcd_client.list_prefix(cluster.prefix)
        cluster.etcd_client.compact(revision)
    finally:
        daemon.send_signal(signal.SIGCONT)
    eventually(lambda: came in routes(node1) and gone not in routes(node1), timeout=5,
               what="compacted changes re-listed")
    assert "re-listing" in node1.log()
    no_traceback(node1)


def test_slow_etcd_paused_with_sigstop(make_cluster, own_etcd):
    server = own_etcd()
    cluster = make_cluster(2, NETWORK, etcd=server)
    cluster.start_all()
    node1, node2 = cluster.nodes
    probes = BothWays(cluster.pod(node1), cluster.pod(node2))
    start = time.monotonic()
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(6)
        assert node1.procs[-1].poll() is None and node1.http("/readyz")[0] == 200
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    new = put_fake(cluster, 3, "198.18.242.0/24")
    eventually(lambda: new in routes(node1), timeout=NEW_PEER_WITHIN + 3, what="new peer after etcd resumed")
    eventually(lambda: node1.http("/readyz")[0] == 200, timeout=15, what="ready (the watch back)")
    end = time.monotonic()
    time.sleep(0.3)
    probes.stop().assert_through(start, end)
    no_traceback(node1, node2)


def _established_ports(node: lab.Node) -> set[int]:
    out = node.sh("ss", "-Htn", "state", "established").stdout
    peers = [line.split()[-1].replace("[::ffff:", "").replace("]", "") for line in out.splitlines()]
    return {int(peer.rsplit(":", 1)[1]) for peer in peers if peer.startswith(f"{lab.CTL_IP}:")}


def test_three_member_cluster_member_killed(make_cluster, session_lab):
    members = lab.EtcdCluster("fm")
    members.start()
    try:
        cluster = make_cluster(2, NETWORK, etcd=members)
        cluster.start_all()
        node1, node2 = cluster.nodes
        in_use = _established_ports(node1) & {m.client_port for m in members.members}
        assert len(in_use) == 1, in_use
        victim = members.member_on_port(in_use.pop())
        probe = EtcdClient(EtcdOptions(endpoints=(victim.endpoint,), prefix=cluster.prefix))
        lease_id = probe.grant(120)
        probe.close()
        victim.kill()

        new = "198.18.243.0/24"

        def put_new() -> bool:  # a write may wait out the survivors' leader election
            try:
                return bool(put_fake(cluster, 4, new))
            except EtcdError:
                return False

        eventually(put_new, timeout=10, what="the survivors take writes")
        eventually(lambda: new in routes(node1), timeout=5, what="the watch resumed on another member")
        assert cluster.etcd_client.keepalive(lease_id) > 0  # renewals (keepalives) go to the survivors
        key, subnet = cluster.lease_key(node1), cluster.subnet(node1)
        cluster.etcd_client.delete(key)
        eventually(lambda: cluster.etcd_client.get(key) is not None, timeout=5, what="own lease re-acquired")
        assert cluster.subnet(node1) == subnet
        node3 = cluster.lab.add_node(3)
        cluster.nodes.append(node3)
        cluster.start(node3)
        subnets = [cluster.subnet(n) for n in cluster.nodes]
        assert len(set(subnets)) == 3  # no subnet handed out twice
        eventually(lambda: cluster.subnet(node3) in routes(node1), timeout=5, what="a new node seen")
        no_traceback(node1, node2, node3)
    finally:
        members.destroy()


def test_with_auth_a_dead_member_never_fails_the_login(monkeypatch):
    """The client library logged in on one member picked at random, without failover: with one of
    three members down, one connection in three failed. The login now tries the others."""
    import sys
    import types

    members = lab.EtcdCluster("fa")
    members.start()
    try:
        lab.enable_auth(members.members[0], "flannel", PASSWORD, "/flannel-test/")
        members.members[0].kill()
        prefix = f"/flannel-test/{os.getpid()}"
        # the library's pick made certain: the dead member, every time
        library = sys.modules["pyetcd.client"]  # (pyetcd.client, the attribute, is a function)
        monkeypatch.setattr(library, "random", types.SimpleNamespace(choice=lambda labels: labels[0]))
        for _ in range(3):
            client = EtcdClient(EtcdOptions(endpoints=members.endpoints, prefix=prefix, username="flannel",
                                            password=PASSWORD))
            try:
                assert client.list_prefix(prefix + "/subnets/")[1] == []
            finally:
                client.close()
        for _ in range(6):  # flannelctl, as an operator runs it: the library's own random pick
            ctl = subprocess.run([lab.tool("flannelctl"), f"--etcd-endpoints={','.join(members.endpoints)}",
                                  f"--etcd-prefix={prefix}", "--etcd-username=flannel", f"--etcd-password={PASSWORD}",
                                  "subnets", "list"], capture_output=True, text=True, timeout=60)
            assert ctl.returncode == 0, ctl.stderr
    finally:
        members.destroy()


def change_users(server: lab.EtcdServer, name: str) -> None:
    """Any change to users or roles: every JWT issued before it is refused from then on."""
    server.etcdctl("user", "add", name, "--new-user-password=pw", "--interactive=false", user=server.root_user)


def test_a_jwt_from_before_an_auth_change_is_replaced_in_calls_and_the_watch(own_etcd, tmp_path):
    """etcd refuses such a token with "revision of auth store is old" (a watch: in its cancel
    reason), not "invalid auth token": the client logged in again only on the latter, so every call
    failed, and the watch was retried with the dead token until something reset the client."""
    server = own_etcd(extra_args=jwt_auth_token(str(tmp_path)))
    lab.enable_auth(server, "flannel", PASSWORD, "/flannel-test/")
    prefix = f"/flannel-test/{os.getpid()}/"
    client = EtcdClient(EtcdOptions(endpoints=[server.endpoint], prefix=prefix, username="flannel",
                                    password=PASSWORD))
    try:
        assert client.list_prefix(prefix)[1] == []
        change_users(server, "other1")
        assert client.list_prefix(prefix)[1] == []  # a unary call logs in again and is retried
        change_users(server, "other2")
        with pytest.raises(EtcdError, match="revision of auth store is old"):
            next(iter(client.watch_prefix(prefix, 1)))  # the watch is canceled (the caller retries)...
        batch = next(iter(client.watch_prefix(prefix, 1)))  # ...and the next one logs in afresh
        assert batch.created
    finally:
        client.close()


def test_an_auth_change_at_etcd_never_stops_the_daemons_watch(make_cluster, own_etcd, tmp_path):
    """JWT tokens, users changed, etcd restarted (the watch reconnects with the token it has)."""
    server = own_etcd(extra_args=jwt_auth_token(str(tmp_path)))
    lab.enable_auth(server, "flannel", PASSWORD, "/flannel-test/")
    cluster = make_cluster(2, NETWORK, etcd=server, etcd_options={"username": "flannel", "password": PASSWORD})
    cluster.start_all("--etcd-username=flannel", f"--etcd-password={PASSWORD}")
    node1, node2 = cluster.nodes
    change_users(server, "operator")
    server.restart()
    new = put_fake(cluster, 5, "198.18.244.0/24")
    eventually(lambda: new in routes(node1) and new in routes(node2), timeout=10, what="the watch resumed")
    for node in cluster.nodes:
        assert node.http("/readyz")[0] == 200  # the watch is back
        assert "logging in again" in node.log() and PASSWORD not in node.log(), node.log()
    no_traceback(node1, node2)


@pytest.mark.parametrize("security", ["auth-http", "auth-https", "mutual-tls"])
def test_etcd_restart_with_auth_or_tls(make_cluster, own_etcd, tmp_path, security):
    """Username/password over http and https, and mutual TLS: leasing works, and after an etcd restart
    (which forgets every auth token) the watch logs in again and resumes."""
    options: dict = {}
    flags: list[str] = []
    if security == "auth-http":
        server = own_etcd(extra_args=["--auth-token", "simple"])
    else:
        certs = lab.make_certs(str(tmp_path))
        d = os.path.dirname(certs.ca)
        mutual = security == "mutual-tls"
        server = own_etcd(tls=dataclasses.replace(certs, client_cert_auth=mutual),
                          extra_args=[] if mutual else ["--auth-token", "simple"])
        options["cafile"] = certs.ca
        flags.append(f"--etcd-cafile={certs.ca}")
        if mutual:
            options.update(certfile=f"{d}/client.crt", keyfile=f"{d}/client.key")
            flags += [f"--etcd-certfile={d}/client.crt", f"--etcd-keyfile={d}/client.key"]
    if security.startswith("auth"):
        prefix_root = "/flannel-test/"
        lab.enable_auth(server, "flannel", PASSWORD, prefix_root)
        options.update(username="flannel", password=PASSWORD)
        flags += ["--etcd-username=flannel", f"--etcd-password={PASSWORD}"]
    cluster = make_cluster(2, NETWORK, etcd=server, etcd_options=options)
    cluster.start_all(*flags)
    node1, node2 = cluster.nodes
    probes = BothWays(cluster.pod(node1), cluster.pod(node2))
    start = time.monotonic()
    server.restart()
    new = put_fake(cluster, 5, "198.18.244.0/24")
    eventually(lambda: new in routes(node1) and new in routes(node2), timeout=5, what="watch resumed after restart")
    eventually(lambda: node1.http("/readyz")[0] == 200, timeout=5, what="ready after restart (the watch)")
    end = time.monotonic()
    time.sleep(0.3)
    probes.stop().assert_through(start, end)
    for node in cluster.nodes:
        text = node.log() + node.http("/metrics")[1]
        assert PASSWORD not in text
        assert "ssl_transport_security" not in text and "Handshake failed" not in text
    no_traceback(node1, node2)


def test_wrong_ca_is_named_in_one_line_without_grpc_noise(make_cluster, own_etcd, tmp_path):
    certs = lab.make_certs(str(tmp_path / "right"))
    server = own_etcd(tls=certs)
    other = lab.make_certs(str(tmp_path / "other"))
    cluster = make_cluster(1, None, etcd=server, etcd_options={"cafile": certs.ca})
    node = cluster.nodes[0]
    cluster.start(node, f"--etcd-cafile={other.ca}", wait=False)
    eventually(lambda: "check --etcd-cafile" in node.log(), timeout=10, what="the TLS reason in the log")
    line = next(line for line in node.log().splitlines() if "check --etcd-cafile" in line)
    assert "etcd's certificate is not trusted" in line
    assert "Handshake failed" not in node.log() and "ssl_transport_security" not in node.log()
    assert node.http("/readyz")[0] == 503
    ctl = subprocess.run([lab.tool("flannelctl"), f"--etcd-endpoints={server.endpoint}", f"--etcd-cafile={other.ca}",
                          "--etcd-timeout=2", "subnets", "list"], capture_output=True, text=True, timeout=60)
    assert ctl.returncode == 1 and ctl.stderr.count("\n") == 1 and "check --etcd-cafile" in ctl.stderr, ctl.stderr


# -- network ------------------------------------------------------------------------------------


def _underlay_down(make_cluster, seconds: float) -> None:
    cluster = make_cluster(2, NETWORK)
    cluster.start_all()
    node1, node2 = cluster.nodes
    pod1, pod2 = cluster.pod(node1), cluster.pod(node2)
    probes = BothWays(pod1, pod2, interval=0.02)
    down = time.monotonic()
    node1.sh("ip", "link", "set", node1.ifname, "down")
    time.sleep(seconds)
    node1.sh("ip", "link", "set", node1.ifname, "up")
    # the node's own network configuration puts its default route back (the kernel dropped it)
    node1.sh("ip", "route", "replace", "default", "via", lab.ROUTER_IP)
    up = time.monotonic()
    new = put_fake(cluster, 6, "198.18.245.0/24")
    eventually(lambda: new in routes(node1), timeout=5, what="watch back after the link came up")
    end = time.monotonic()
    time.sleep(1)
    tally = probes.stop()
    # the outage was real (probes sent while the link was down were lost) and the pods' path was
    # back within 1 s of the link: from then on, through the watch's recovery, every probe answered
    assert tally.lost and all(down <= t <= up + 1.0 for t in tally.lost_at), (tally.lost, tally.lost_at[-3:], up)
    last = tally.sent_at[-1]
    assert last > end and tally.sent_between(up + 1.0, last) >= (last - up - 1.0) / 0.02, "probing stalled"
    assert node1.procs[-1].poll() is None
    no_traceback(node1)


@pytest.mark.parametrize("config", [NETWORK, {**NETWORK, "Backend": {"Type": "host-gw"}},
                                    {**NETWORK, "Backend": {"Type": "wireguard"}}],
                         ids=["vxlan", "host-gw", "wireguard"])
def test_an_underlay_deleted_and_created_again_is_followed(make_cluster, config):
    """A bond, VLAN or bridge rebuilt, a NIC re-probed: the kernel deletes flannel.1 with the
    interface, and the daemon retried forever on the old ifindex. It now says the interface is
    gone (/readyz names it), and rebuilds on the new one when it is back: pods talk again within
    2 s of the interface being back, both ways. (WireGuard's device outlives the interface; its
    tunnel must carry pods again all the same.)"""
    cluster = make_cluster(2, config)
    node1, node2 = cluster.nodes
    if config["Backend"]["Type"] == "wireguard":
        if shutil.which("wireguard-go") is None:
            pytest.skip("wireguard-go is not installed")
        for node in cluster.nodes:
            node.private_run()  # wireguard-go's sockets and the key: the node's own /run
        cluster.start_all(converge=False)
    else:
        cluster.start_all()
    pod1, pod2 = cluster.pod(node1), cluster.pod(node2)
    eventually(lambda: ping(pod1, pod2.addr, count=1).returncode == 0, timeout=5, what="pods talking")
    probes = BothWays(pod1, pod2, interval=0.02)
    p, eth = cluster.lab.prefix, node1.ifname
    mac = node1.sh("cat", f"/sys/class/net/{eth}/address").stdout.strip()  # a rebuilt bond or VLAN keeps it
    node1.sh("ip", "link", "del", eth)  # the veth pair goes, flannel.1 (vxlan) with it
    eventually(lambda: f"interface {eth} is gone" in node1.log(), timeout=3, what="the loss said")
    readyz = readyz_asked_on(node1)  # no way in from outside
    assert readyz.startswith(f"not ready: interface {eth} is gone"), readyz
    lab.ipbatch([f"link add {eth} netns {node1.ns} type veth peer name {p}-n1", f"link set {p}-n1 master br0 up"],
                ns=cluster.lab.ul)
    lab.ipbatch([f"link set {eth} address {mac}", f"addr add {node1.ip}/24 dev {eth}",
                 f"addr add {node1.ip6}/64 dev {eth} nodad", f"link set {eth} up",
                 f"route add default via {lab.ROUTER_IP}"], ns=node1.ns)
    up = time.monotonic()

    def ready() -> bool:
        try:
            return node1.http("/readyz", timeout=0.5)[0] == 200
        except OSError:  # the control namespace still resolving the new interface's MAC
            return False

    eventually(ready, timeout=5, what="ready again")
    lost_only_until(probes, up + 2.0, "the interface was back")
    assert node1.log().count(f"interface {eth} is gone") == 1 and f"interface {eth} is back" in node1.log()
    no_traceback(node1)


@pytest.mark.parametrize("config", [NETWORK, {**NETWORK, "Backend": {"Type": "host-gw"}}], ids=["vxlan", "host-gw"])
def test_the_underlay_address_removed_and_added_again_is_followed(make_cluster, config):
    """The address the overlay runs over taken off the interface (renumbering, a hand slip): peers
    cannot reach the node, and nothing said so. Now it is said once, /readyz names it, and once
    the address is back pods talk again within 2 s (host-gw's routes, which the kernel dropped with
    the address, rebuilt)."""
    cluster = make_cluster(2, config)
    cluster.start_all()
    node1, node2 = cluster.nodes
    probes = BothWays(cluster.pod(node1), cluster.pod(node2), interval=0.02)
    eth = node1.ifname
    node1.sh("ip", "addr", "del", f"{node1.ip}/24", "dev", eth)
    eventually(lambda: f"interface {eth} no longer holds {node1.ip}" in node1.log(), timeout=3, what="the loss said")
    readyz = readyz_asked_on(node1)
    assert readyz.startswith(f"not ready: interface {eth} no longer holds {node1.ip}"), readyz
    time.sleep(1)
    lab.ipbatch([f"addr add {node1.ip}/24 dev {eth}", f"route add default via {lab.ROUTER_IP}"], ns=node1.ns)
    back = time.monotonic()
    eventually(lambda: node1.http("/readyz", timeout=0.5)[0] == 200, timeout=5, what="ready again")
    lost_only_until(probes, back + 2.0, "the address was back")
    log = node1.log()
    assert log.count(f"no longer holds {node1.ip}") == 1 and f"interface {eth} holds {node1.ip} again" in log
    no_traceback(node1)


def test_underlay_link_down_and_back(make_cluster):
    _underlay_down(make_cluster, seconds=5)


@SOAK
def test_underlay_link_down_30s(make_cluster):
    _underlay_down(make_cluster, seconds=30)


def test_peer_public_ip_changed_peers_follow(make_cluster):
    cluster = make_cluster(2, NETWORK)
    cluster.start_all()
    node1, node2 = cluster.nodes
    subnet, mac = cluster.subnet(node2), link(node2)["address"]
    assert cluster.stop(node2) == 0
    new_ip = "198.51.100.52"
    node2.sh("ip", "addr", "del", f"{node2.ip}/24", "dev", node2.ifname)
    node2.sh("ip", "addr", "add", f"{new_ip}/24", "dev", node2.ifname)
    node2.sh("ip", "route", "replace", "default", "via", lab.ROUTER_IP)
    node2.ip = new_ip
    cluster.start(node2)
    assert cluster.subnet(node2) == subnet  # recognized by its VTEP MAC: same subnet, lease updated
    lease = cluster.lease(node2)
    assert str(lease.public_ip) == new_ip and lease.backend.get("VtepMAC") == mac
    eventually(lambda: fdbs(node1).get(mac) == new_ip, timeout=3, what="peer's FDB entry follows the new address")
    assert link(node2)["linkinfo"]["info_data"]["local"] == new_ip
    probes = BothWays(cluster.pod(node1), cluster.pod(node2))
    time.sleep(0.5)
    tally = probes.stop()
    assert tally.lost == 0 and tally.sent > 50, tally[:2]
    assert "our address changed, keeping the subnet" in node2.log()


# -- churn --------------------------------------------------------------------------------------


def test_500_leases_churn_in_bursts_while_pods_talk(make_cluster):
    cluster = make_cluster(2, {"Network": "198.18.0.0/16", "SubnetLen": 26, "Backend": {"Type": "vxlan"}})
    cluster.start_all()
    node1, node2 = cluster.nodes
    probes = BothWays(cluster.pod(node1), cluster.pod(node2), interval=0.02)
    start = time.monotonic()
    real = {cluster.subnet(n) for n in cluster.nodes}
    head = leases_prefix(cluster.prefix)
    free = [f"198.18.{i // 4}.{(i % 4) * 64}/26" for i in range(4, 1024)]
    free = [s for s in free if s not in real][:500]

    def put(batch):
        for n, subnet in batch:
            key, value = fake_lease(n, subnet)
            cluster.etcd_client.put(head + key, value)

    def delete(batch):
        for _, subnet in batch:
            cluster.etcd_client.delete(head + subnet.replace("/", "-"))

    fakes = list(enumerate(free, start=10))
    put(fakes[:250])
    delete(fakes[:125])
    put(fakes[250:])

    def exact(expected: set[str]) -> bool:
        return all(set(routes(node)) == expected - {cluster.subnet(node)}
                   for node in cluster.nodes)

    live = {s for _, s in fakes[125:]} | real
    eventually(lambda: exact(live), timeout=10, what="every node has exactly the live leases (0 missed)")
    delete(fakes[125:])
    eventually(lambda: exact(real), timeout=10, what="every removed lease gone (0 stale)")
    for node in cluster.nodes:
        assert len(fdbs(node)) == 1  # only the other real node's VTEP
    end = time.monotonic()
    time.sleep(0.3)
    probes.stop().assert_through(start, end, interval=0.02)
    no_traceback(node1, node2)


# -- bad data -----------------------------------------------------------------------------------


def test_bad_leases_are_ignored_or_warned_and_nothing_else_is_disturbed(make_cluster):
    cluster = make_cluster(2, NETWORK)
    cluster.start_all()
    node1, node2 = cluster.nodes
    head = leases_prefix(cluster.prefix)
    own_key = cluster.lease_key(node1)
    probes = BothWays(cluster.pod(node1), cluster.pod(node2))
    start = time.monotonic()
    good = put_fake(cluster, 7, "198.18.230.0/24")
    cluster.etcd_client.put(head + "198.18.231.0-24", b'{"PublicIP":"198.51.100.107","BackendType":"vxlan",')
    cluster.etcd_client.put(head + "junk-key", b"{}")
    cluster.etcd_client.put(head + "10.99.0.0-24", fake_lease(8, "10.99.0.0/24")[1])  # outside the Network
    wide = put_fake(cluster, 9, "198.18.208.0/20")  # not SubnetLen: programmed, warned (above SubnetMax)
    key, value = fake_lease(10, "198.18.232.0/24")  # upstream spells the field "VtepMac" too
    cluster.etcd_client.put(head + key, value.replace(b"VtepMAC", b"VtepMac"))
    eventually(lambda: {good, wide, "198.18.232.0/24"} <= set(routes(node1)), timeout=3, what="good leases")
    end = time.monotonic()  # bad data around good: pods never noticed
    stolen = json.loads(cluster.etcd_client.get(own_key).value)
    stolen["PublicIP"] = "198.51.100.99"  # someone claims our subnet with another address
    cluster.etcd_client.put(own_key, json.dumps(stolen).encode())
    eventually(lambda: str(cluster.lease(node1).public_ip) == node1.ip, timeout=3, what="our lease restored")
    restored = time.monotonic()
    time.sleep(0.3)
    tally = probes.stop()
    # until we restore our lease, node2 sends our pods' traffic to the thief's address: those probes
    # (and only those) may be lost
    assert all(end <= t <= restored for t in tally.lost_at), (tally.lost, [t - end for t in tally.lost_at])
    tally._replace(lost=0, lost_at=()).assert_through(start, end)
    log = node1.log()
    assert "ignoring malformed lease entry" in log and "junk-key" in log
    assert "10.99.0.0/24 is outside the network" in log
    assert f"lease {head}198.18.208.0-20 does not fit the network config (IPv4 subnet 198.18.208.0/20: it is a /20 " \
           "but the network config's SubnetLen is 24); programming it anyway" in log
    assert log.count("198.18.208.0-20 does not fit") == 1  # once, not per event or reconcile
    assert "was modified in etcd; restoring our attributes" in log
    assert "10.99.0.0/24" not in routes(node1) and "198.18.231.0/24" not in routes(node1)
    no_traceback(node1, node2)


def test_overlapping_leases_of_both_kinds_never_cut_off_a_live_node(make_cluster):
    """A /25 put inside node2's live /24 claims node2's VTEP address: it was programmed too, its
    neighbour entry replaced node2's, and node1 lost node2's pods at once, for good. Now the lease
    that fits the config wins; and a lease that fits, put inside an older misfit (a reservation made
    by hand), takes over from it; the misfit is programmed again once the overlap ends."""
    cluster = make_cluster(3, NETWORK)
    node1, node2, node3 = cluster.nodes
    cluster.start(node1, "--reconcile-interval=1")
    cluster.start(node2)
    head = leases_prefix(cluster.prefix)
    live = ipaddress.ip_network(cluster.subnet(node2))
    vtep = str(live.network_address)
    eventually(lambda: str(live) in routes(node1), timeout=3, what="node2 routed")
    mac2 = link(node2)["address"]
    pair = BothWays(cluster.pod(node1), cluster.pod(node2))
    start = time.monotonic()
    inside = put_fake(cluster, 40, f"{vtep}/25")
    eventually(lambda: f"not programming all of lease {vtep}-25" in node1.log(), timeout=3, what="the misfit named")
    skipped = ("flanneld_skipped_peers", (("reason", "overlap"),))
    assert parse(node1.http("/metrics")[1]).get(skipped) == 1
    for _ in range(8):  # full reconciles once a second meanwhile
        assert neighs(node1).get(vtep) == mac2 and inside not in routes(node1)
        time.sleep(0.25)

    # the other kind: an older misfit /23, then a reservation that fits put inside it for node3
    used = {ipaddress.ip_network(cluster.subnet(n)) for n in (node1, node2)}
    wide = next(n for n in (ipaddress.ip_network(f"198.18.{x}.0/23") for x in range(100, 199, 2))
                if not any(n.overlaps(u) for u in used))
    put_fake(cluster, 41, str(wide))
    eventually(lambda: str(wide) in routes(node1), timeout=3, what="the lone misfit programmed")
    fitting = str(next(wide.subnets(new_prefix=24)))
    reservation = {"PublicIP": node3.ip, "PublicIPv6": None, "BackendType": "vxlan",
                   "BackendData": {"VNI": 1, "VtepMAC": "0e:fa:00:2a:00:02"}}
    cluster.etcd_client.put(head + fitting.replace("/", "-"), json.dumps(reservation).encode())
    eventually(lambda: fitting in routes(node1) and str(wide) not in routes(node1), timeout=3,
               what="the reservation programmed instead of the misfit")
    cluster.start(node3)
    assert cluster.subnet(node3) == fitting  # it took its reservation
    eventually(lambda: neighs(node1).get(str(wide.network_address)) == link(node3)["address"], timeout=3,
               what="node3's VTEP")
    third = BothWays(cluster.pod(node1, 2), cluster.pod(node3))
    middle = time.monotonic()
    time.sleep(3)
    end = time.monotonic()
    time.sleep(0.3)
    pair.stop().assert_through(start, end)
    third.stop().assert_through(middle, end)
    cluster.stop(node3)  # gone for good: its reservation deleted, the misfit is alone again
    cluster.etcd_client.delete(head + fitting.replace("/", "-"))
    eventually(lambda: str(wide) in routes(node1), timeout=3, what="the misfit programmed again")
    said = node1.log()
    assert said.count(f"not programming all of lease {vtep}-25: its subnet {inside} overlaps lease {vtep}-24") == 1
    assert f"not programming all of lease {wide.network_address}-23: its subnet {wide} overlaps lease " \
           f"{fitting.replace('/', '-')}" in said
    no_traceback(node1, node2, node3)


def test_a_lease_whose_vtep_mac_is_not_unicast_is_skipped_once_and_nothing_loops(make_cluster):
    """Such a MAC passed the format check, the kernel refused its FDB entry on every try, and every
    vxlan node ran a full reconcile (and warned) once a second for as long as the key existed."""
    cluster = make_cluster(2, NETWORK)
    cluster.start_all()
    node1, node2 = cluster.nodes
    head = leases_prefix(cluster.prefix)
    junk = {"198.18.233.0/24": "01:00:5e:00:00:01", "198.18.234.0/24": "ff:ff:ff:ff:ff:ff",
            "198.18.235.0/24": "00:00:00:00:00:00"}
    for n, (subnet, mac) in enumerate(junk.items()):
        key, value = fake_lease(20 + n, subnet)
        cluster.etcd_client.put(head + key, value.replace(b"0e:fa:00:%02x:00:01" % (20 + n), mac.encode()))
    good = put_fake(cluster, 23, "198.18.236.0/24")  # written after the junk: programmed all the same
    eventually(lambda: good in routes(node1) and good in routes(node2), timeout=3, what="the good peer")
    skipped = ("flanneld_skipped_peers", (("reason", "backend-data"),))
    repairs = ("flanneld_drift_repairs_total", ())
    eventually(lambda: parse(node1.http("/metrics")[1]).get(skipped) == 3, timeout=3, what="three skipped peers")
    before = parse(node1.http("/metrics")[1]).get(repairs, 0.0)
    probes = BothWays(cluster.pod(node1), cluster.pod(node2))
    start = time.monotonic()
    time.sleep(4)
    end = time.monotonic()
    time.sleep(0.3)
    probes.stop().assert_through(start, end)
    assert parse(node1.http("/metrics")[1]).get(repairs, 0.0) == before  # no reconcile loop
    for node in (node1, node2):
        log = node.log()
        for subnet, mac in junk.items():
            assert log.count(f"VtepMAC {mac} is not a unicast MAC") == 1, log[-3000:]
            assert subnet not in routes(node)
        assert "could not write" not in log
    no_traceback(node1, node2)


def test_a_lease_copying_a_nodes_vtep_mac_never_takes_its_fdb_entry(make_cluster):
    """A second lease with node2's VtepMAC wanted an FDB entry with the same key: the entry took turns
    between the two addresses on every reconcile. The copy is skipped; node2 keeps its entry."""
    cluster = make_cluster(2, NETWORK)
    cluster.start_all("--reconcile-interval=1")
    node1, node2 = cluster.nodes
    mac = cluster.lease(node2).backend["VtepMAC"]
    key, value = fake_lease(30, "198.18.237.0/24")
    cluster.etcd_client.put(leases_prefix(cluster.prefix) + key, value.replace(b"0e:fa:00:1e:00:01", mac.encode()))
    eventually(lambda: "already the VTEP of lease" in node1.log(), timeout=3, what="the copy named")
    probes = BothWays(cluster.pod(node1), cluster.pod(node2))
    start = time.monotonic()
    for _ in range(12):  # full reconciles once a second meanwhile
        assert fdbs(node1).get(mac) == node2.ip
        time.sleep(0.25)
    end = time.monotonic()
    time.sleep(0.3)
    probes.stop().assert_through(start, end)
    assert node1.log().count("already the VTEP of lease") == 1 and "198.18.237.0/24" not in routes(node1)
    no_traceback(node1, node2)


@pytest.mark.parametrize(("backend", "message"), [
    ({"Type": "vxlan", "VNI": 16777216}, "Backend.VNI must be an integer in 0..16777215, got 16777216"),
    ({"Type": "vxlan", "MTU": 100}, "Backend.MTU 100 is too small for an overlay (minimum 1280)"),
    ({"Type": "vxlan", "Port": -1}, "Backend.Port must be an integer in 0..65535, got -1"),
])
def test_absurd_backend_values_are_refused_and_the_daemon_waits(make_cluster, backend, message):
    cluster = make_cluster(1, {"Network": "198.18.0.0/16", "Backend": backend})
    node = cluster.nodes[0]
    cluster.start(node, wait=False)
    eventually(lambda: message in node.log(), timeout=10, what=message)
    assert node.http("/readyz")[0] == 503 and link(node) is None
    cluster.set_config(NETWORK)
    node.wait_ready()
    no_traceback(node)


def test_config_made_invalid_while_running_is_warned_once(make_cluster):
    cluster = make_cluster(1, NETWORK)
    node = cluster.nodes[0]
    cluster.start(node, "--reconcile-interval=1")
    key = f"{cluster.prefix}/config"
    cluster.set_config('{"Network": "198.18.0.0/16", "Backend": {"Type": "udp"}')
    eventually(lambda: f"network config at {key} is now invalid" in node.log(), timeout=5, what="warning")
    time.sleep(2.5)
    line = next(line for line in node.log().splitlines() if "is now invalid" in line)
    assert "keeps running with the config it started with" in line and node.log().count("is now invalid") == 1
    cluster.set_config({"Network": "198.18.0.0/16", "SubnetLen": 25})
    eventually(lambda: "changed; this daemon keeps running" in node.log(), timeout=5, what="changed warning")
    cluster.set_config(NETWORK)
    eventually(lambda: "is the one this daemon runs with again" in node.log(), timeout=5, what="back to normal")
    assert node.procs[-1].poll() is None and node.http("/readyz")[0] == 200


# -- bad flags ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "env", "message"), [
    (["--iface-can-reach=not-an-ip"], {}, "'not-an-ip' is not an IP address"),
    (["--healthz-ip=not-an-ip"], {}, "'not-an-ip' is not an IP address"),
    (["--public-ip=2001:db8::1"], {}, "is not an IPv4 address"),
    (["--public-ipv6=198.51.100.1"], {}, "is not an IPv6 address"),
    (["--iface-regex=("], {}, "is not a valid regular expression"),
    (["--etcd-endpoints=notaurl"], {}, "invalid etcd endpoint 'notaurl': not a URL"),
    ([], {"FLANNELD_ETCD_ENDPOINTS": "notaurl"}, "invalid etcd endpoint 'notaurl': not a URL"),
    (["--etcd-endpoints=ftp://198.51.100.2:2379"], {}, "unsupported scheme 'ftp'"),
    (["--etcd-endpoints=http://198.51.100.2:99999"], {}, "the port must be a number in 1..65535"),
    (["--etcd-endpoints=http://root:hunter2@198.51.100.2:2379"], {}, "credentials go in --etcd-username"),
    (["--healthz-port=70000"], {}, "70000 is not in 0..65535"),
    (["--subnet-lease-renew-margin=0"], {}, "0 is not in 1..1439"),
    (["--iptables-resync=soon"], {}, "'soon' is not an integer"),
    (["--ip-masq=maybe"], {}, "'maybe' is not a boolean"),
    (["--no-such-flag"], {}, "No such option"),
])
def test_malformed_flags_are_one_line_and_exit_2(make_cluster, flags, env, message):
    node = make_cluster(1).nodes[0]
    proc = node.popen([lab.tool("flanneld"), "--etcd-prefix=/flannel-test/never", *flags], "flanneld", env=env)
    assert proc.wait(30) == 2
    out = node.log()
    assert out.count("\n") == 1 and out.startswith("flanneld: error: ") and message in out, out
    assert "hunter2" not in out


def test_node_problems_fail_at_once_in_one_line_before_anything_is_programmed(make_cluster, tmp_path):
    cluster = make_cluster(1, NETWORK)
    node = cluster.nodes[0]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    listener = subprocess.Popen(["ip", "netns", "exec", node.ns, "python3", "-c",
                                 "import socket,time;s=socket.socket();s.bind(('0.0.0.0',8471));s.listen();"
                                 "time.sleep(60)"])
    time.sleep(0.3)
    try:
        cases = [
            (["--healthz-port=8471"], "cannot serve /healthz on 0.0.0.0:8471 (--healthz-ip/--healthz-port): "
                                      "Address already in use"),
            (["--healthz-ip=203.0.113.77", "--healthz-port=8472"], "cannot serve /healthz on 203.0.113.77:8472 "
                                                                   "(--healthz-ip/--healthz-port): Cannot assign"),
            ([f"--subnet-file={blocker}/sub/subnet.env"], f"cannot write the subnet file {blocker}/sub/subnet.env "
                                                          "(--subnet-file): Not a directory"),
        ]
        for flags, message in cases:
            path = os.path.join(cluster.lab.dir, f"{node.ns}-flanneld.log")
            if os.path.exists(path):
                os.unlink(path)
            # the node's own subnet file (the host's /run/flannel is not the test's), unless the case sets one
            argv = [lab.tool("flanneld"), f"--etcd-endpoints={cluster.endpoint}", f"--etcd-prefix={cluster.prefix}",
                    f"--subnet-file={node.subnet_file}", *flags]
            proc = node.popen(argv, "flanneld")
            assert proc.wait(30) == 1, node.log()
            lines = [line for line in node.log().splitlines() if " E " in line or "error" in line.lower()]
            assert len(lines) == 1 and message in lines[0], node.log()
            no_traceback(node)
    finally:
        listener.kill()
        listener.wait()
    assert link(node) is None  # nothing programmed
    assert cluster.etcd_client.list_prefix(leases_prefix(cluster.prefix))[1] == []  # and no lease taken


# -- security -----------------------------------------------------------------------------------


def test_firewall_flushed_right_after_its_own_repair_is_repaired_again(make_cluster):
    cluster = make_cluster(1, NETWORK)
    node = cluster.nodes[0]
    cluster.start(node, "--ip-masq")

    def masq_rules() -> int:
        return node.sh("iptables-save", "-t", "nat").stdout.count("-A FLANNEL-POSTRTG")

    node.sh("iptables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "1")
    eventually(lambda: masq_rules() == 6, timeout=3, what="deleted rule restored")
    node.sh("iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG")  # at once, while the daemon may still be listing
    eventually(lambda: masq_rules() == 6, timeout=3, what="flushed chain restored too")
    key = ("flanneld_firewall_repairs_total", ())
    repairs = parse(node.http("/metrics")[1])[key]
    time.sleep(2.5)
    assert repairs >= 2 and parse(node.http("/metrics")[1])[key] == repairs  # no reinstall loop once in place


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_in_logs_metrics_or_flannelctl_output(make_cluster, own_etcd, log_format):
    server = own_etcd(extra_args=["--auth-token", "simple"])
    lab.enable_auth(server, "flannel", PASSWORD, "/flannel-test/")
    cluster = make_cluster(1, NETWORK, etcd=server, etcd_options={"username": "flannel", "password": PASSWORD})
    node = cluster.nodes[0]
    cluster.start(node, "--etcd-username=flannel", f"--etcd-password={PASSWORD}", "-v=2", f"--log-format={log_format}")
    server.restart()  # every client logs in again: the token changes hands once more
    env = {**os.environ, "FLANNELCTL_ETCD_PASSWORD": PASSWORD}
    outputs = []
    for args in (["subnets", "list", "-o", "wide"], ["subnets", "list", "-o", "json"], ["config", "get"], ["stats"]):
        proc = subprocess.run([lab.tool("flannelctl"), f"--etcd-endpoints={server.endpoint}",
                               f"--etcd-prefix={cluster.prefix}", "--etcd-username=flannel", *args],
                              capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        outputs += [proc.stdout, proc.stderr]
    wrong = subprocess.run([lab.tool("flannelctl"), f"--etcd-endpoints={server.endpoint}", "--etcd-username=flannel",
                            f"--etcd-password={PASSWORD}x", "subnets", "list"], capture_output=True, text=True,
                           timeout=60)
    assert wrong.returncode == 1 and "authentication failed" in wrong.stderr
    time.sleep(1)
    outputs += [wrong.stdout, wrong.stderr, node.log(), node.http("/metrics")[1]]
    tokens = {line.split('"token":"')[1].split('"')[0] for line in server.log_tail(200).splitlines()
              if '"token":"' in line}  # etcd logs the (simple) tokens it rejects: none may leak from us either
    assert tokens, "etcd logged no rejected token: the scan below would find nothing to look for"
    for text in outputs:
        assert PASSWORD not in text and not any(token in text for token in tokens)
    if log_format == "json":
        assert all(json.loads(line) for line in node.log().splitlines())


def test_an_iptables_without_random_fully_still_masquerades(make_cluster, tmp_path):
    """iptables before 1.6.2 refuses --random-fully: the daemon masquerades without it, says so
    once, and its checks do not reinstall over and over (the rules checked are those installed)."""
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    real = subprocess.run(["sh", "-c", "command -v iptables-restore"], capture_output=True, text=True).stdout.strip()
    wrapper = wrappers / "iptables-restore"
    wrapper.write_text("#!/bin/sh\ninput=$(cat)\ncase \"$input\" in *--random-fully*)\n"
                       "  echo 'iptables-restore v1.4.21: unknown option \"--random-fully\"' >&2; exit 2;;\nesac\n"
                       f'printf \'%s\\n\' "$input" | exec {real} "$@"\n')
    wrapper.chmod(0o755)
    cluster = make_cluster(1, NETWORK)
    node = cluster.nodes[0]
    cluster.start(node, "--ip-masq", env={"PATH": f"{wrappers}:{os.environ['PATH']}"})
    nat = node.sh("iptables-save", "-t", "nat").stdout
    assert "-j MASQUERADE" in nat and "--random-fully" not in nat
    time.sleep(3)  # three firewall checks (--iptables-resync=1)
    assert parse(node.http("/metrics")[1]).get(("flanneld_firewall_repairs_total", ()), 0.0) == 0
    assert node.log().count("cannot masquerade with --random-fully here") == 1
    no_traceback(node)


@SOAK
def test_a_hung_iptables_save_never_kills_the_daemon(make_cluster, tmp_path):
    """The periodic firewall check's tool hangs (a stuck xtables lock): after its 30 s timeout the
    check fails in one line and is retried; the daemon (its loop thread included) goes on."""
    wrappers, hang = tmp_path / "bin", tmp_path / "hang"
    wrappers.mkdir()
    real = subprocess.run(["sh", "-c", "command -v iptables-save"], capture_output=True, text=True).stdout.strip()
    wrapper = wrappers / "iptables-save"
    wrapper.write_text(f'#!/bin/sh\n[ -e {hang} ] && exec sleep 300\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    cluster = make_cluster(1, NETWORK)
    node = cluster.nodes[0]
    cluster.start(node, env={"PATH": f"{wrappers}:{os.environ['PATH']}"})
    hang.touch()
    try:
        eventually(lambda: "iptables-save did not answer within 30 s" in node.log(), timeout=45, interval=0.5,
                   what="the hung check reported")
        assert node.procs[-1].poll() is None and node.http("/healthz")[0] == 200
    finally:
        hang.unlink()
        node.sh("pkill", "-f", "sleep 300", check=False)
    node.sh("iptables", "-F", "FLANNEL-FWD")
    eventually(lambda: "-A FLANNEL-FWD" in node.sh("iptables-save", "-t", "filter").stdout, timeout=35,
               what="the loop still repairs the firewall")
    no_traceback(node)
