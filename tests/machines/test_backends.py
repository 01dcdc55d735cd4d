"""Every backend under systemd, in both firewall modes: two provisioned machines, pods ping both
ways, and `systemctl restart flanneld` on both under a 10 ms ping loses no packet. (vxlan with
iptables is test_service's cluster.) WireGuard: wireguard-go is started by the daemon under the
unit and, with KillMode=process, outlives the restart; the new daemon adopts it."""

from __future__ import annotations

import time

import pytest

from flanneld.lab.probes import eventually

pytestmark = pytest.mark.machines

NETWORK = "198.18.0.0/16"
CASES = [
    ("vxlan", True),
    ("host-gw", False),
    ("host-gw", True),
    ("wireguard", False),
    ("wireguard", True),
]


def wireguard_go(machine) -> str:
    return machine.run("pgrep", "-x", "wireguard-go", check=False).stdout.strip()


@pytest.mark.parametrize(("backend", "nftables"), CASES,
                         ids=[f"{b}-{'nftables' if n else 'iptables'}" for b, n in CASES])
def test_pods_ping_and_a_restart_loses_no_packet(provisioned, backend, nftables):
    config = {"Network": NETWORK, "SubnetLen": 24, "Backend": {"Type": backend}, "EnableNFTables": nftables}
    cluster = provisioned(2, config)
    try:
        a, b = cluster.machines
        for src, dst in ((a, b), (b, a)):
            out = src.run("ip", "netns", "exec", "pod", "ping", "-c1", "-W2", cluster.pod_ip(dst), check=False)
            assert out.returncode == 0, f"{backend}: {src.name} -> {dst.name}: {out.stdout}"
        if nftables:
            assert "chain postrtg" in a.run("nft", "list", "table", "ip", "flannel-ipv4").stdout
            assert "FLANNEL" not in a.run("iptables-save").stdout
        else:
            assert "FLANNEL-POSTRTG" in a.run("iptables-save", "-t", "nat").stdout
        tunnels = {m.name: wireguard_go(m) for m in cluster.machines}
        if backend == "wireguard":
            assert all(tunnels.values()), tunnels
            cgroup = a.read(f"/proc/{tunnels[a.name]}/cgroup")
            assert "/system.slice/flanneld.service" in cgroup, cgroup  # started under the unit
        pingers = (cluster.pinger(a, cluster.pod_ip(b)), cluster.pinger(b, cluster.pod_ip(a)))
        time.sleep(0.5)
        start = time.monotonic()
        for machine in cluster.machines:
            machine.systemctl("restart", "flanneld")
        end = time.monotonic()
        time.sleep(0.5)
        first, second = (p.stop() for p in pingers)
        first.merged(second).assert_through(start, end)
        assert {m.name: wireguard_go(m) for m in cluster.machines} == tunnels  # the same tunnel processes
        if backend == "wireguard":
            eventually(lambda: "latest handshake" in a.run("wg", "show").stdout, timeout=5, what="a handshake")
    finally:
        cluster.close()
