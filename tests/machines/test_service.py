"""flanneld as an operator runs it: three Debian machines with systemd as PID 1, provisioned by
vagrant/provision.sh (node1 also runs Debian's etcd service), the shipped unit, vxlan, a pod on
each through the installed CNI plugin. The tier's short form (run by .ci/run).

The tests share the cluster and run in file order: each leaves it as it found it (all daemons
running, a pod on each machine) except the last, cleanup.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from flanneld.lab.machines import Machine
from flanneld.lab.probes import Pinger, Tally, eventually
from tests.machines.conftest import VERSION_NEXT, Provisioned

pytestmark = pytest.mark.machines

VXLAN = {"Network": "198.18.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan", "VNI": 1}}
VENV = "/opt/flanneld/venv"
DROPIN = "/etc/systemd/system/flanneld.service.d"


@pytest.fixture(scope="module")
def cluster(provisioned) -> Provisioned:
    return provisioned(3, VXLAN)


def probe_both_ways(cluster: Provisioned, a: Machine, b: Machine) -> tuple[Pinger, Pinger]:
    """Echo requests every 10 ms from a's pod to b's and back (the prober runs inside the pods)."""
    return cluster.pinger(a, cluster.pod_ip(b)), cluster.pinger(b, cluster.pod_ip(a))


def stop_probes(pingers: tuple[Pinger, Pinger]) -> Tally:
    first, second = (p.stop() for p in pingers)
    return first.merged(second)


def vtep_mac(machine: Machine) -> str:
    return machine.read("/sys/class/net/flannel.1/address").strip()


def fdb_has(machine: Machine, mac: str, dst: str) -> bool:
    return f"{mac} dst {dst}" in machine.run("bridge", "fdb", "show", "dev", "flannel.1").stdout


def test_the_unit_is_active_only_once_ready_with_subnet_env_and_the_data_plane_in_place(cluster):
    """A first start on a clean node with etcd out of reach: the unit stays "activating" (no READY=1
    without a lease); once etcd answers it turns active, and ExecStartPost= (run by systemd when
    READY=1 arrives, before the unit is active) finds subnet.env, the device, the peers' routes and
    the firewall rules in place."""
    node2 = cluster.machines[1]
    peers = [cluster.subnet_env(m)["FLANNEL_SUBNET"] for m in (cluster.machines[0], cluster.machines[2])]
    assert node2.show("flanneld", "Type", "NotifyAccess") == {"Type": "notify", "NotifyAccess": "main"}
    node2.systemctl("stop", "flanneld")
    node2.run(f"{VENV}/bin/flanneld", "cleanup", "--keep-installed")  # a restart would find it all in place
    assert "flannel.1" not in node2.run("ip", "-br", "link").stdout
    node2.run("mkdir", "-p", DROPIN)
    snapshot = ("cat /run/flannel/subnet.env; ip -o link show flannel.1; ip route show dev flannel.1; "
                "iptables-save -t nat | grep -c FLANNEL-POSTRTG")
    node2.run("tee", f"{DROPIN}/at-ready.conf", input=f"[Service]\nExecStartPost=/bin/sh -c "
              f"'({snapshot}) > /run/flannel/at-ready 2>&1'\n")
    node2.run("nft", "-f", "-", input="table inet labtest { chain out { type filter hook output priority 0; "
              "tcp dport 2379 drop; }; }")
    try:
        node2.systemctl("daemon-reload")
        node2.systemctl("start", "--no-block", "flanneld")
        time.sleep(3)
        assert node2.systemctl("is-active", "flanneld", check=False) == "activating"
        assert node2.run("test", "-e", "/run/flannel/subnet.env", check=False).returncode != 0
        node2.run("nft", "delete", "table", "inet", "labtest")
        eventually(lambda: node2.systemctl("is-active", "flanneld", check=False) == "active", timeout=30,
                   interval=0.2, what="active once etcd answers")
        at_ready = node2.read("/run/flannel/at-ready")
    finally:
        node2.run("nft", "delete", "table", "inet", "labtest", check=False)
        node2.run("rm", "-rf", DROPIN, "/run/flannel/at-ready")
        node2.systemctl("daemon-reload")
    env = cluster.subnet_env(node2)
    assert f"FLANNEL_SUBNET={env['FLANNEL_SUBNET']}" in at_ready and "flannel.1:" in at_ready, at_ready
    for peer in peers:  # the peers' routes were programmed before READY=1, not after
        network = re.sub(r"\.1/24$", ".0/24", peer)
        assert f"{network} via" in at_ready, at_ready
    assert int(at_ready.split()[-1]) >= 1, at_ready  # the masquerade rules
    journal = node2.journal()
    last_start = journal.rindex("Starting flanneld.service")
    assert journal.index("ready: lease", last_start) < journal.index("Started flanneld.service", last_start)


def test_the_journal_carries_the_daemons_lines_as_text_and_as_json(cluster):
    node3 = cluster.machines[2]
    text = cluster.daemon_journal(node3)
    assert re.search(r"^\S+ \S+ I flanneld: ready: lease 198\.18\.\d+\.0/24", text, re.M), text
    node3.run("sh", "-c", "echo FLANNELD_LOG_FORMAT=json >> /etc/default/flanneld")
    try:
        node3.systemctl("restart", "flanneld")
        lines = cluster.daemon_journal(node3).splitlines()
    finally:
        node3.run("sed", "-i", "/FLANNELD_LOG_FORMAT=json/d", "/etc/default/flanneld")
        node3.systemctl("restart", "flanneld")
    records = [json.loads(line) for line in lines]  # every line the daemon wrote is one JSON object
    assert any(r["message"].startswith("ready: lease") and r["level"] == "INFO" for r in records), records


def test_pods_on_different_machines_ping_each_other(cluster):
    for src in cluster.machines:
        for dst in cluster.machines:
            if src is not dst:
                out = src.run("ip", "netns", "exec", "pod", "ping", "-c1", "-W2", cluster.pod_ip(dst), check=False)
                assert out.returncode == 0, f"{src.name} -> {dst.name}: {out.stdout}{out.stderr}"


def test_restart_loses_no_packet(cluster):
    node2, node3 = cluster.machines[1], cluster.machines[2]
    pingers = probe_both_ways(cluster, node2, node3)
    time.sleep(0.5)
    start = time.monotonic()
    for machine in (node2, node3):
        pid = machine.show("flanneld", "MainPID")["MainPID"]
        machine.systemctl("restart", "flanneld")
        assert machine.show("flanneld", "MainPID")["MainPID"] != pid
    end = time.monotonic()
    time.sleep(0.5)
    stop_probes(pingers).assert_through(start, end)


def test_a_killed_daemon_is_restarted_by_systemd_and_no_packet_is_lost(cluster):
    node2, node3 = cluster.machines[1], cluster.machines[2]
    before = node2.show("flanneld", "MainPID", "NRestarts")
    pingers = probe_both_ways(cluster, node2, node3)
    time.sleep(0.5)
    start = time.monotonic()
    node2.systemctl("kill", "-s", "KILL", "flanneld")

    def restarted() -> bool:
        now = node2.show("flanneld", "MainPID", "NRestarts", "ActiveState")
        return now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"])

    eventually(restarted, timeout=30, interval=0.2, what="systemd restarted flanneld (Restart=always)")
    end = time.monotonic()
    time.sleep(0.5)
    stop_probes(pingers).assert_through(start, end)
    assert int(node2.show("flanneld", "NRestarts")["NRestarts"]) == int(before["NRestarts"]) + 1


def test_stop_leaves_the_data_plane_in_place(cluster):
    node2, node3 = cluster.machines[1], cluster.machines[2]
    pingers = probe_both_ways(cluster, node2, node3)
    time.sleep(0.5)
    start = time.monotonic()
    node2.systemctl("stop", "flanneld")
    try:
        assert node2.systemctl("is-active", "flanneld", check=False) == "inactive"
        time.sleep(2)
        assert "flannel.1" in node2.run("ip", "-br", "link").stdout
        assert node2.read("/run/flannel/subnet.env")
        end = time.monotonic()
    finally:
        node2.systemctl("start", "flanneld")
    stop_probes(pingers).assert_through(start, end)


def test_a_second_flanneld_by_hand_is_refused_while_the_service_runs(cluster):
    node2 = cluster.machines[1]
    pid = node2.show("flanneld", "MainPID")["MainPID"]
    out = node2.run(f"{VENV}/bin/flanneld", f"--etcd-endpoints={cluster.etcd}", "--iface=eth0", check=False,
                    timeout=30)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert f"another flanneld (PID {pid}) runs for the subnet file /run/flannel/subnet.env" in lines[-1], out.stderr
    assert "Traceback" not in out.stderr
    refused = node2.run(f"{VENV}/bin/flanneld", "cleanup", check=False)
    assert refused.returncode != 0 and pid in refused.stderr and "flannel.1" in node2.run("ip", "-br", "link").stdout


def test_an_upgrade_loses_no_packet_and_keeps_the_subnet(cluster, newer_wheelhouse):
    node2, node3 = cluster.machines[1], cluster.machines[2]
    subnet = cluster.subnet_env(node2)["FLANNEL_SUBNET"]
    pingers = probe_both_ways(cluster, node2, node3)
    time.sleep(0.5)
    start = time.monotonic()
    node2.run(f"{VENV}/bin/python", "-m", "pip", "install", "-q", "--no-index", "--find-links", newer_wheelhouse,
              "--upgrade", "flanneld-py", timeout=120)
    node2.systemctl("restart", "flanneld")
    end = time.monotonic()
    time.sleep(0.5)
    stop_probes(pingers).assert_through(start, end)
    assert VERSION_NEXT in node2.run(f"{VENV}/bin/flanneld", "--version").stdout
    assert f"flanneld {VERSION_NEXT} starting" in cluster.daemon_journal(node2)
    assert cluster.subnet_env(node2)["FLANNEL_SUBNET"] == subnet


def test_a_rebooted_node_starts_flanneld_after_the_network_with_its_subnet(cluster):
    node1, node3 = cluster.machines[0], cluster.machines[2]
    subnet = cluster.subnet_env(node3)["FLANNEL_SUBNET"]
    node3.reboot()
    # started at boot (nobody asked), after network-online.target was reached
    assert node3.systemctl("is-active", "flanneld") == "active"
    started = int(node3.show("flanneld", "ExecMainStartTimestampMonotonic")["ExecMainStartTimestampMonotonic"])
    online = int(node3.show("network-online.target", "ActiveEnterTimestampMonotonic")["ActiveEnterTimestampMonotonic"])
    assert 0 < online <= started
    assert cluster.subnet_env(node3)["FLANNEL_SUBNET"] == subnet  # its lease found again in etcd
    mac = vtep_mac(node3)  # a new device (the daemon gives it the MAC its lease published, if it had one)
    eventually(lambda: fdb_has(node1, mac, node3.ip), timeout=5, interval=0.1, what="node1 has node3's VTEP")
    pod = cluster.new_pod(node3)  # the runtime brings its pod back (pod.sh: DEL first, then ADD)
    out = node1.run("ip", "netns", "exec", "pod", "ping", "-c1", "-W2", pod, check=False)
    assert out.returncode == 0, out.stdout


def test_the_etcd_machine_rebooted_the_others_keep_the_data_plane_and_reconnect(cluster):
    node1, node2, node3 = cluster.machines
    restarts = {m.name: m.show("flanneld", "NRestarts")["NRestarts"] for m in (node2, node3)}
    subnet = cluster.subnet_env(node1)["FLANNEL_SUBNET"]
    pingers = probe_both_ways(cluster, node2, node3)
    time.sleep(0.5)
    start = time.monotonic()
    node1.reboot()  # etcd and node1's flanneld come back at boot
    assert node1.systemctl("is-active", "etcd") == "active" and node1.systemctl("is-active", "flanneld") == "active"
    end = time.monotonic()
    # provision.sh orders etcd after the node's address (Debian's unit alone races it: etcd exits, not restarted)
    started = int(node1.show("etcd", "ExecMainStartTimestampMonotonic")["ExecMainStartTimestampMonotonic"])
    online = int(node1.show("network-online.target", "ActiveEnterTimestampMonotonic")["ActiveEnterTimestampMonotonic"])
    assert 0 < online <= started
    time.sleep(0.5)
    stop_probes(pingers).assert_through(start, end)
    assert cluster.subnet_env(node1)["FLANNEL_SUBNET"] == subnet
    mac = vtep_mac(node1)
    for machine in (node2, node3):  # their watches came back: node1's VTEP is still (or again) theirs
        eventually(lambda m=machine: fdb_has(m, mac, node1.ip), timeout=30, interval=0.2,
                   what=f"{machine.name} has node1's VTEP after etcd came back")
        assert machine.show("flanneld", "NRestarts")["NRestarts"] == restarts[machine.name]
    pod = cluster.new_pod(node1)
    out = node2.run("ip", "netns", "exec", "pod", "ping", "-c1", "-W2", pod, check=False)
    assert out.returncode == 0, out.stdout


DENIED = re.compile(r"permission denied|operation not permitted|read-only file system|EPERM|EACCES|Traceback", re.I)


def test_the_hardened_unit_denies_the_daemon_nothing_it_needs(cluster):
    for machine in cluster.machines:
        journal = machine.journal()
        assert not DENIED.search(journal), f"{machine.name}: {DENIED.search(journal)}: {journal[-3000:]}"
        pid = machine.show("flanneld", "MainPID")["MainPID"]
        status = dict(line.split(":", 1) for line in machine.read(f"/proc/{pid}/status").splitlines())
        assert int(status["CapBnd"], 16) == (1 << 12) | (1 << 13)  # CAP_NET_ADMIN | CAP_NET_RAW only
        assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"  # the filter applies


def test_cleanup_under_systemd_leaves_the_node_as_before_flanneld(cluster):
    """The last test: node3 is cleaned up. The operator disables the service first, as cleanup's help says."""
    node1, node3 = cluster.machines[0], cluster.machines[2]
    subnet = cluster.subnet_env(node3)["FLANNEL_SUBNET"].replace(".1/24", ".0/24")
    node3.systemctl("disable", "--now", "flanneld")
    out = node3.run(f"{VENV}/bin/flanneld", "cleanup", "--release-lease", f"--etcd-endpoints={cluster.etcd}")
    assert "removed" in out.stdout and "Traceback" not in out.stderr
    assert "flannel" not in node3.run("ip", "-br", "link").stdout
    assert node3.run("test", "-e", "/run/flannel", check=False).returncode != 0  # not even its directory
    assert node3.run("test", "-e", "/etc/systemd/system/flanneld.service", check=False).returncode != 0
    assert "FLANNEL" not in node3.run("iptables-save").stdout
    eventually(lambda: subnet not in node1.run("ip", "route").stdout, timeout=5, interval=0.1,
               what="node1 dropped node3's route once its lease was released")
