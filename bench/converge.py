#!/usr/bin/env python3
"""Convergence benchmark: a node joining a cluster of N peers, then lease churn, per backend.

For each backend and N: pre-load N peer leases in etcd, start flanneld in a fresh node namespace
and time until every peer route is in the kernel; report RSS; then put 200 more leases
back-to-back and time until all of them are routed (counting misses). Baseline in the same run:
programming the same entries (vxlan: 3N, host-gw: N routes) with `ip -batch` (iproute2), i.e.
what the kernel needs with a native tool. Budgets apply to vxlan (the issue's); host-gw is
reported beside it.

Fake peers' public addresses cycle through the underlay range; no traffic is sent to them.

    .venv/bin/python bench/converge.py [--sizes 1000,5000] [--churn 200] [--backends vxlan,host-gw]
                                       [--prober-window 30] [--far-end-in-sender]

The overlay prober (on by default, --probe-interval=30): at the largest vxlan size the node runs
once with it off and once on, each then left idle for two probe intervals: RSS, and CPU in the
first interval and in the second (steady state), same run; CPU as the scheduler's runtime of the
daemon's threads, and of its `prober` thread alone. The far end's packet processing runs on
kernel threads of its own (--far-end-in-sender: in the node's system calls, the lab's default).
One host on the underlay holds every fake peer's public address: it answers ARP and the
underlay's pings, and drops VXLAN. So every peer is `unreachable` (encapsulation blocked, as
behind a firewall dropping UDP 8472 cluster-wide): after its first look and the confirming one
(a log line each), every interval a small probe over the overlay and one over the underlay,
which answers: per peer as many packets as a path that works (small and full-size, both
answered), and the prober's dearest steady state, as a failing path is never backed off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

from benchlib import etcd_in_namespace

from flanneld import lab
from flanneld.etcd.client import EtcdClient
from flanneld.etcd.options import EtcdOptions
from flanneld.model.lease import LeaseAttrs, backend_json, encode_value, leases_prefix

PREFIX = "/coreos.com/network"
# The bench writes peer leases itself from 198.18.0.8/29 upwards (up to ~198.18.163.0 for 5000 + 200);
# SubnetMin keeps the node's own lease clear of them, so a churn lease never lands on its key.
CONFIG = {"Network": "198.18.0.0/16", "SubnetLen": 29, "SubnetMin": "198.18.200.0"}
BUDGET = {"converge_s": 2.5, "rss_mb": 60, "churn_s": 1.0, "prober_rss_mb": 3.0, "prober_cpu_pct": 1.0}


def peer(n: int, backend: str = "vxlan"):
    import ipaddress

    data = backend_json({"VNI": 1, "VtepMAC": f"0e:{n >> 24 & 255:02x}:{n >> 16 & 255:02x}:"
                                              f"{n >> 8 & 255:02x}:{n & 255:02x}:01"}) if backend == "vxlan" else None
    attrs = LeaseAttrs(ipaddress.IPv4Address(f"198.51.100.{20 + n % 230}"), None, backend, data)
    base = int(ipaddress.IPv4Address("198.18.0.0")) + 8 * (n + 1)
    return attrs.lease(ipaddress.IPv4Network((base, 29)), None)


def count_routes(node: lab.Node, backend: str) -> int:
    """Peer routes flanneld installed (the underlay's own routes do not count)."""
    dev = "flannel.1" if backend == "vxlan" else node.ifname
    out = node.sh("ip", "-o", "route", "show", "proto", "boot", "dev", dev, check=False).stdout
    return out.count("\n") - (0 if backend == "vxlan" else out.count("default"))


def wait_routes(node: lab.Node, want: int, timeout: float, backend: str) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if count_routes(node, backend) >= want:
            return time.perf_counter()
        time.sleep(0.01)
    raise SystemExit(f"only {count_routes(node, backend)} of {want} routes after {timeout}s:\n{node.log()[-3000:]}")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process, as the kernel samples them (a 4 ms tick here):
    only the split between the two is read from these."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def run_seconds(pid: int, thread: str | None = None) -> float:
    """Seconds every thread of a process (or the one the kernel knows as `thread`: the daemon names
    its threads) was on a CPU, as the scheduler measured it: nanoseconds, not sampled at the tick
    (a thread waking 4 times a second for 200 µs is seen exactly)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            if thread is not None:
                with open(f"/proc/{pid}/task/{tid}/comm") as fh:
                    if fh.read().strip() != thread:
                        continue
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
    return total / 1e9


def far_end_on_its_own_thread(ns: str, ifname: str) -> None:
    """What a packet sent into veth `ifname`'s peer costs on the far side (the bridge, the answering
    host, its reply) runs on a kernel thread of its own: GRO on gives the veth a NAPI instance and
    `threaded` polls it from a kthread. By default the lab runs all of it in the sender's system
    call (a veth delivers in the sender's context, and this kernel has no IRQ time accounting), so
    the sender's CPU counts the far end's work as well, which on a real network is another node's."""
    features = (f"from pyroute2.ethtool import Ethtool; e = Ethtool(); f = e.get_features({ifname!r}); "
                f"f.features['rx-gro'].enable = True; e.set_features({ifname!r}, f); e.close()")
    lab.sh([sys.executable, "-c", features], ns=ns)
    lab.sh(["sh", "-c", f"echo 1 > /sys/class/net/{ifname}/threaded"], ns=ns)


def baseline_ip_batch(node: lab.Node, n: int, backend: str) -> float:
    """iproute2 programming the same entries (on a scratch VXLAN device for vxlan)."""
    if backend == "host-gw":
        start = time.perf_counter()
        lab.ipbatch([f"route replace {peer(i).subnet} via {peer(i).public_ip} dev {node.ifname} metric 7"
                     for i in range(n)], ns=node.ns)
        took = time.perf_counter() - start
        lab.ipbatch([f"route del {peer(i).subnet} metric 7" for i in range(n)], ns=node.ns)
        return took
    cmds = ["link add flbench type vxlan id 99 local " + node.ip + " dev " + node.ifname + " dstport 8472 nolearning",
            "link set flbench up"]
    for i in range(n):
        p = peer(i)
        mac = json.loads(p.backend_data)["VtepMAC"]
        gw = str(p.subnet.network_address)
        cmds.append(f"neigh replace {gw} lladdr {mac} dev flbench nud permanent")
    start = time.perf_counter()
    lab.ipbatch(cmds, ns=node.ns)
    fdb = "\n".join(f"fdb replace {json.loads(peer(i).backend_data)['VtepMAC']} dev flbench dst {peer(i).public_ip}"
                    " self permanent" for i in range(n)) + "\n"
    subprocess.run(["ip", "netns", "exec", node.ns, "bridge", "-batch", "-"], input=fdb, text=True, check=True)
    lab.ipbatch([f"route replace {peer(i).subnet} via {peer(i).subnet.network_address} dev flbench onlink metric 7"
                 for i in range(n)], ns=node.ns)
    took = time.perf_counter() - start
    lab.ip("link", "del", "flbench", ns=node.ns)
    return took


def run_size(n: int, churn: int, endpoint: str, tag: int, backend: str, flags: tuple[str, ...] = (),
             window: float = 0.0, far_end_threads: bool = True) -> dict[str, float]:
    reg = EtcdClient(EtcdOptions(endpoints=(endpoint,), prefix=PREFIX))
    reg.put(PREFIX + "/config", json.dumps({**CONFIG, "Backend": {"Type": backend}}).encode())
    head = leases_prefix(PREFIX)
    for key, _ in [(kv.key, 0) for kv in reg.list_prefix(head)[1]]:
        reg.delete(key)
    for i in range(n):
        lease = peer(i, backend)
        reg.put(head + lease.key, encode_value(lease))
    # a short per-size prefix: interface names derive from it and must fit in 15 characters
    cluster = lab.Lab(prefix=f"{CTL.removesuffix('-ctl')}c{tag}", ctl=CTL)
    try:
        node = cluster.build_underlay(1)[0]
        if window:  # one host answers (ARP, ping) for every fake peer's public address; VXLAN it drops
            host = f"{cluster.prefix}-peers"
            cluster.add_namespace(host)
            lab.ipbatch([f"link add {cluster.prefix}-p netns {host} type veth peer name {cluster.prefix}-pu",
                         f"link set {cluster.prefix}-pu master br0 up"], ns=cluster.ul)
            lab.ipbatch([f"addr add 198.51.100.{20 + i}/32 dev {cluster.prefix}-p" for i in range(230)]
                        + [f"link set {cluster.prefix}-p up"], ns=host)
            if far_end_threads:  # the node's packets and the host's replies, from where they enter the bridge
                for port in (f"{cluster.prefix}-n{node.index}", f"{cluster.prefix}-pu"):
                    far_end_on_its_own_thread(cluster.ul, port)
        baseline = baseline_ip_batch(node, n, backend)
        start = time.perf_counter()
        proc = node.start_flanneld(f"http://{lab.CTL_IP}:{endpoint.rsplit(':', 1)[1]}", PREFIX, *flags)
        converged = wait_routes(node, n, 60, backend) - start
        time.sleep(1.0)
        rss = rss_mb(proc.pid)
        churn_start = time.perf_counter()
        for i in range(n, n + churn):
            lease = peer(i, backend)
            reg.put(head + lease.key, encode_value(lease))
        churned = wait_routes(node, n + churn, 30, backend) - churn_start
        time.sleep(0.5)
        missed = n + churn - count_routes(node, backend)
        idle_cpu = first_cpu = idle_sys = prober_thread = 0.0
        if window:  # the first interval (every peer's first look, and here its failure said) apart
            before = run_seconds(proc.pid)
            time.sleep(window)
            middle, ticks, thread = run_seconds(proc.pid), cpu_seconds(proc.pid), run_seconds(proc.pid, "prober")
            time.sleep(window)
            after, ticks_after = run_seconds(proc.pid), cpu_seconds(proc.pid)
            first_cpu = (middle - before) / window * 100
            idle_cpu = (after - middle) / window * 100
            prober_thread = (run_seconds(proc.pid, "prober") - thread) / window * 100
            sampled = sum(ticks_after) - sum(ticks)
            idle_sys = idle_cpu * (ticks_after[1] - ticks[1]) / sampled if sampled else 0.0
            rss = max(rss, rss_mb(proc.pid))
        node.stop_processes()
    finally:
        cluster.close()
        reg.close()
    return {"backend": backend, "peers": n, "converge_s": round(converged, 3), "rss_mb": round(rss, 1),
            "churn_leases": churn, "churn_s": round(churned, 3), "churn_missed": missed,
            "baseline_ip_batch_s": round(baseline, 3), "idle_cpu_pct": round(idle_cpu, 2),
            "idle_system_cpu_pct": round(idle_sys, 2), "first_interval_cpu_pct": round(first_cpu, 2),
            "prober_thread_cpu_pct": round(prober_thread, 2)}


CTL = ""


def main() -> int:
    global CTL
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,5000")
    parser.add_argument("--churn", type=int, default=200)
    parser.add_argument("--backends", default="vxlan,host-gw")
    parser.add_argument("--far-end-in-sender", action="store_true",
                        help="Leave the answering host's packet processing in the node's system calls, as the "
                             "lab does by default (the prober's CPU then counts the far end's work too).")
    parser.add_argument("--prober-window", type=float, default=30.0,
                        help="Seconds of idle CPU measured with the prober off and on (0: skip).")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    results = []
    with etcd_in_namespace("converge") as (server, CTL):
        tag = 0
        for backend in args.backends.split(","):
            for n in (int(x) for x in args.sizes.split(",")):
                # the daemon as the converge budget has always measured it; the prober has a budget of its own
                results.append(run_size(n, args.churn, server.endpoint, tag, backend, ("--probe-interval=0",)))
                tag += 1
        prober = {}
        if args.prober_window:
            n = max(int(x) for x in args.sizes.split(","))
            for mode, flags in (("off", ("--probe-interval=0",)), ("on", ())):
                prober[mode] = run_size(n, 0, server.endpoint, tag, "vxlan", flags, args.prober_window,
                                        far_end_threads=not args.far_end_in_sender)
                tag += 1

    head = f"{'backend':>8} {'peers':>6} {'converge':>9} {'ip -batch':>10} {'RSS':>8} {'churn':>8} {'missed':>7}"
    print(head)
    for r in results:
        print(f"{r['backend']:>8} {r['peers']:>6} {r['converge_s']:>8.2f}s {r['baseline_ip_batch_s']:>9.2f}s "
              f"{r['rss_mb']:>6.1f}MB {r['churn_s']:>7.2f}s {r['churn_missed']:>7}")
    if prober:
        off, on = prober["off"], prober["on"]
        print(f"prober, vxlan {on['peers']} peers, idle {args.prober_window:.0f}s after the first "
              f"{args.prober_window:.0f}s: off {off['rss_mb']:.1f}MB {off['idle_cpu_pct']:.2f}% CPU, on "
              f"{on['rss_mb']:.1f}MB {on['idle_cpu_pct']:.2f}% CPU ({on['idle_system_cpu_pct']:.2f}% in the kernel) "
              f"(first interval {on['first_interval_cpu_pct']:.2f}%; the prober thread itself "
              f"{on['prober_thread_cpu_pct']:.2f}%); "
              f"converge {off['converge_s']:.2f}s off, {on['converge_s']:.2f}s on")
    vxlan = [r for r in results if r["backend"] == "vxlan"] or results
    largest = max(vxlan, key=lambda r: r["peers"])
    verdict = {
        "converge_ok": largest["converge_s"] <= BUDGET["converge_s"],
        "rss_ok": all(r["rss_mb"] <= BUDGET["rss_mb"] for r in results),
        "churn_ok": all(r["churn_s"] <= BUDGET["churn_s"] and r["churn_missed"] == 0 for r in results),
    }
    if prober:
        verdict["prober"] = {"off": prober["off"], "on": prober["on"],
                             "rss_delta_mb": round(prober["on"]["rss_mb"] - prober["off"]["rss_mb"], 1),
                             "cpu_delta_pct": round(prober["on"]["idle_cpu_pct"] - prober["off"]["idle_cpu_pct"], 2)}
        verdict["prober_rss_ok"] = verdict["prober"]["rss_delta_mb"] <= BUDGET["prober_rss_mb"]
        verdict["prober_cpu_ok"] = verdict["prober"]["cpu_delta_pct"] <= BUDGET["prober_cpu_pct"]
    print(json.dumps({"bench": "converge", "budget": BUDGET, "results": results, **verdict}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
