"""`flanneld cleanup` on a real kernel: a node leaves the cluster and nothing of flanneld's stays
behind, on the node (compared with its state before flanneld first ran) or at its peers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time

import pytest

from flanneld import lab
from flanneld.lab.flannel import NETWORK
from flanneld.lab.probes import eventually
from flanneld.lab.readers import routes

BACKENDS = {
    "vxlan": NETWORK,
    "host-gw": {**NETWORK, "Backend": {"Type": "host-gw"}},
    "wireguard": {**NETWORK, "Backend": {"Type": "wireguard"}},
    "vxlan-nftables": {**NETWORK, "EnableNFTables": True},
}


def state(node) -> dict[str, object]:
    """What a node holds that flanneld could have made: links, routes, both firewalls, /run/flannel."""
    def saved(tool: str, table: str) -> list[str]:
        text = node.sh(tool, "-t", table).stdout
        return [re.sub(r"\[\d+:\d+\]", "", line) for line in text.splitlines() if not line.startswith("#")]

    files = node.sh("sh", "-c", "find /run/flannel -type f 2>/dev/null; true").stdout.split()
    return {
        "links": sorted(link["ifname"] for link in node.sh_json("ip", "-j", "link", "show")),
        "routes": sorted(json.dumps(r, sort_keys=True) for family in ("-4", "-6")
                         for r in node.sh_json("ip", "-j", family, "route", "show", "table", "main")),
        "iptables": {f"{tool} {table}": saved(tool, table) for tool in ("iptables-save", "ip6tables-save")
                     for table in ("nat", "filter")},
        "nft": _rules(node.sh("nft", "list", "ruleset").stdout),
        "run": files,
    }


def _rules(ruleset: str) -> list[str]:
    """nftables' rules (counters dropped). Tables and base chains without a rule are left out:
    iptables-nft creates them on first use and they do nothing (accept policy, no rule); deleting
    them would be deleting iptables' own tables, which other software on a node uses too."""
    return [re.sub(r"counter packets \d+ bytes \d+ ?", "", line.strip()) for line in ruleset.splitlines()
            if line.strip() and not line.strip().startswith(("table ", "chain ", "type ", "}"))]


def installed(node) -> dict[str, str]:
    """Where this node's unit, settings and CNI files go (never the host's /etc or /opt)."""
    base = os.path.join(os.path.dirname(node.subnet_file), "installed")
    return {"--unit-dir": f"{base}/systemd", "--defaults": f"{base}/default-flanneld",
            "--cni-bin-dir": f"{base}/cni-bin", "--cni-conf-dir": f"{base}/net.d"}


def install(node) -> list[str]:
    where = installed(node)
    node.sh(lab.tool("flanneld"), "install-unit", f"--unit-dir={where['--unit-dir']}",
            f"--defaults={where['--defaults']}")
    node.sh(lab.tool("flanneld"), "install-cni", f"--bin-dir={where['--cni-bin-dir']}",
            f"--conf-dir={where['--cni-conf-dir']}", f"--subnet-file={node.subnet_file}")
    os.makedirs(f"{where['--unit-dir']}/multi-user.target.wants")
    os.symlink(f"{where['--unit-dir']}/flanneld.service", f"{where['--unit-dir']}/multi-user.target.wants/"
               "flanneld.service")  # as systemctl enable makes it
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.dirname(where["--unit-dir"])) for f in fs)


def cleanup(cluster, node, *flags: str, check: bool = True):
    return node.sh(lab.tool("flanneld"), "cleanup", f"--subnet-file={node.subnet_file}",
                   f"--etcd-endpoints={cluster.endpoint}", f"--etcd-prefix={cluster.prefix}",
                   *(f"{k}={v}" for k, v in installed(node).items()), *flags, check=check)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_cleanup_leaves_nothing_of_ours_and_peers_drop_the_node_within_a_second(make_cluster, backend):
    config = BACKENDS[backend]
    if backend == "wireguard" and shutil.which("wireguard-go") is None:
        pytest.skip("wireguard-go is not installed")
    cluster = make_cluster(2, config)
    node1, node2 = cluster.nodes
    if backend == "wireguard":
        for node in cluster.nodes:
            node.private_run()
    before = state(node1)  # as the node was before flanneld first ran
    files = install(node1)
    assert len(files) == 5, files  # unit, its enable symlink, settings, plugin, conflist
    cluster.start_all("--ip-masq", converge=backend != "wireguard")
    subnet = cluster.subnet(node1)
    eventually(lambda: subnet in routes(node2) or backend == "wireguard", timeout=5, what="node1 programmed at node2")
    running = cleanup(cluster, node1, check=False)
    pid = node1.procs[-1].pid
    assert running.returncode == 1 and running.stderr.strip() == (
        f"Error: flanneld (PID {pid}) runs for {node1.subnet_file}: stop it first (systemctl stop flanneld); it "
        "would put everything back"), running.stderr
    assert cluster.stop(node1) == 0  # SIGTERM: the data plane and the lease stay, as for a restart
    left = state(node1)
    assert left != before

    dry = cleanup(cluster, node1, "--dry-run", "--release-lease").stdout.splitlines()
    assert state(node1) == left and cluster.lease(node1) is not None  # changed nothing
    assert dry and all(line.startswith("would remove ") for line in dry), dry
    assert f"would remove file {node1.subnet_file}" in dry

    done = cleanup(cluster, node1, "--release-lease", "--remove-key")
    gone = time.monotonic()
    said = done.stdout.splitlines()
    assert [line.replace("removed ", "would remove ", 1) for line in said if "wgkey" not in line] == dry
    eventually(lambda: subnet not in routes(node2), timeout=1, what="node2 dropping node1's route")
    if backend == "wireguard":
        eventually(lambda: not node2.sh("wg", "show", "flannel-wg", "peers").stdout.strip(), timeout=1,
                   what="node2 dropping node1 as a WireGuard peer")
    assert time.monotonic() - gone <= 1.0
    assert state(node1) == before, _diff(before, state(node1))
    assert not [f for f in files if os.path.lexists(f)]
    assert sum(line.startswith(("removed file", "removed symlink")) and "installed" in line for line in said) == 5
    assert not os.path.exists(node1.subnet_file + ".lock")
    assert cleanup(cluster, node1, "--release-lease").stdout.splitlines()[-1] == "nothing of flanneld's to remove"


def _diff(before: dict, after: dict) -> dict:
    return {k: (before[k], after[k]) for k in before if before[k] != after[k]}


def test_a_lease_that_is_another_nodes_now_is_never_released(make_cluster):
    cluster = make_cluster(1, NETWORK)
    node = cluster.nodes[0]
    cluster.start(node)
    key = cluster.lease_key(node)
    assert cluster.stop(node) == 0
    value = json.loads(cluster.etcd_client.get(key).value)
    value["PublicIP"] = "198.51.100.99"  # our lease expired and another node took the subnet
    cluster.etcd_client.put(key, json.dumps(value).encode())
    out = cleanup(cluster, node, "--release-lease").stdout
    assert f"lease {key.rsplit('/', 1)[1]} is another node's now (198.51.100.99): left in etcd" in out
    assert cluster.etcd_client.get(key) is not None


def test_flannelctl_retires_a_dead_node_and_refuses_a_live_one_without_force(make_cluster):
    """A node that will never come back: its lease stayed for up to 24 h and every peer kept
    programming it. flannelctl retires it (after a confirmation); a node that still answers is
    refused unless --force."""
    from tests.integration.test_ctl import Ctl

    cluster = make_cluster(3, NETWORK)
    cluster.start_all()
    node1, node2, node3 = cluster.nodes
    ctl = Ctl(cluster.etcd, cluster.prefix)
    ctl.env["FLANNELCTL_ETCD_ENDPOINTS"] = cluster.endpoint
    subnet2, subnet3 = cluster.subnet(node2), cluster.subnet(node3)
    refusal = ctl.refused("retire", subnet2, "--yes")
    assert refusal == (f"flannelctl: error: refused: the node of {subnet2.replace('/', '-')} ({node2.ip}) looks alive: "
                       f"its flanneld answers http://{node2.ip}:8471/healthz; on it, stop flanneld and run "
                       "'flanneld cleanup --release-lease', or retire it with --force")
    # node2 dies for good: its daemon killed, its machine off the network
    cluster.stop(node2, signal.SIGKILL)
    node2.sh("ip", "link", "set", node2.ifname, "down")
    asked = ctl("retire", node2.ip, input="n\n")  # by public IP; the operator says no
    assert asked.returncode == 1 and "retire the node" in asked.stdout and cluster.lease(node2) is not None
    done = ctl.ok("retire", node2.ip, input="y\n")
    retired = time.monotonic()
    assert done.strip().endswith(f"retired {node2.ip}: lease {subnet2.replace('/', '-')} deleted")
    eventually(lambda: subnet2 not in routes(node1) and subnet2 not in routes(node3), timeout=1,
               what="the peers dropping node2")
    assert time.monotonic() - retired <= 1.0
    # --force retires a live one (here node3, which then re-acquires a subnet, as flanneld does)
    assert ctl.ok("retire", subnet3, "--force", "--yes").strip() == \
        f"retired {node3.ip}: lease {subnet3.replace('/', '-')} deleted"
