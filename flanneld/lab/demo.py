"""``flanneld-demo``: a working overlay on one machine, no outside infrastructure.

Starts etcd in a private network namespace, builds an underlay with N node namespaces, runs
flanneld on each, wires one pod per node, proves pod-to-pod connectivity across nodes (ping and
TCP over VXLAN), prints what the cluster looks like, and keeps running until Ctrl-C (or exits
after the checks with --check). Everything lives in namespaces named after a random prefix and
is removed on exit; the root namespace is never touched.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import click

from flanneld import lab
from flanneld.etcd.client import EtcdClient
from flanneld.etcd.options import EtcdOptions
from flanneld.model.lease import decode_lease, leases_prefix
from flanneld.model.subnetenv import read
from flanneld.node.signals import call_on_signals

PREFIX = "/coreos.com/network"


def _say(text: str) -> None:
    click.echo(text, err=True)


@click.command(context_settings={"help_option_names": ["--help", "-h"]})
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(2, 20), help="Number of nodes.")
@click.option("--network", default="198.18.0.0/16", show_default=True, help="Overlay network.")
@click.option("--check", is_flag=True, help="Exit after the connectivity checks instead of waiting for Ctrl-C.")
def main(nodes: int, network: str, check: bool) -> None:
    """Run a flannel cluster in network namespaces on this machine (needs root)."""
    if os.geteuid() != 0:
        raise click.ClickException("the demo creates network namespaces: run it as root")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # while setting up: as Ctrl-C, then clean up
    lab.cleanup_stale()
    cluster = lab.Lab()
    etcd = None
    try:
        cluster.create_control()
        lab.enter_namespace(cluster.ctl)
        etcd = lab.EtcdServer("demo")
        etcd.start()
        etcd_client = EtcdClient(EtcdOptions(endpoints=(etcd.endpoint,), prefix=PREFIX))
        config = {"Network": network, "Backend": {"Type": "vxlan"}}
        etcd_client.put(f"{PREFIX}/config", json.dumps(config).encode())
        _say(f"etcd running in namespace {cluster.ctl}; network config: {json.dumps(config)}")
        members = cluster.build_underlay(nodes)
        endpoint = etcd.endpoint_for(lab.CTL_IP)
        for node in members:
            node.start_flanneld(endpoint, PREFIX, "--ip-masq")
        for node in members:
            node.wait_ready()
        _wait_meshed(members)
        pods = []
        for node in members:
            env = read(node.subnet_file)
            assert env is not None
            pods.append(node.add_pod(str(env.subnet), 1, mtu=env.mtu))
        _show(etcd_client, members, pods)
        ok = _check(pods)
        if check or not ok:
            sys.exit(0 if ok else 1)
        stop = threading.Event()
        call_on_signals(lambda _sig: stop.set())
        _say(f"\nThe cluster is up. Try (as root):\n  ip netns exec {pods[0].name} ping {pods[-1].addr}\n"
             f"  ip netns exec {members[0].ns} ip route\n"
             f"  ip netns exec {cluster.ctl} {lab.tool('flannelctl')} --etcd-endpoints={etcd.endpoint} "
             "subnets list\nPress Ctrl-C to stop and remove everything.")
        stop.wait()
    finally:
        if etcd is not None:
            etcd.destroy()
        cluster.close()
        _say("removed the demo namespaces")


def _show(etcd_client: EtcdClient, members: list[lab.Node], pods: list[lab.Pod]) -> None:
    _, kvs = etcd_client.list_prefix(leases_prefix(PREFIX))
    _say(f"\n{'node':<12} {'public IP':<16} {'subnet':<18} {'VTEP MAC':<19} pod")
    by_ip = {n.ip: (n, p) for n, p in zip(members, pods, strict=True)}
    for kv in kvs:
        lease = decode_lease(kv.key[len(leases_prefix(PREFIX)):], kv.value)
        node, pod = by_ip.get(str(lease.public_ip), (None, None))
        _say(f"{node.ns if node else '?':<12} {lease.public_ip!s:<16} {lease.subnet!s:<18} "
             f"{lease.backend.get('VtepMAC', ''):<19} {pod.addr if pod else ''}")


def _wait_meshed(members: list[lab.Node], timeout: float = 10.0) -> None:
    """Until every node routes to every other node's subnet: nodes started together become ready
    each with the peers it has seen, and learn of the later ones by the watch moments after."""
    subnets = {n.ns: str(env.lease_subnet) for n in members if (env := read(n.subnet_file)) is not None}
    deadline = time.monotonic() + timeout
    waiting = list(members)
    while waiting and time.monotonic() < deadline:
        waiting = [n for n in waiting if not all(
            subnets[o.ns] in n.sh("ip", "route", "show", "dev", "flannel.1", check=False).stdout
            for o in members if o is not n)]
        if waiting:
            time.sleep(0.05)
    for node in waiting:
        _say(f"{node.ns} does not route to every other node after {timeout:.0f}s")


def _ping(src: lab.Pod, dst: str) -> tuple[bool, str]:
    """Three probes 0.2 s apart, any answer counts (one probe lost to a neighbour being resolved is
    not a broken overlay); with what ping measured: the average round trip and the replies."""
    result = subprocess.run(["ip", "netns", "exec", src.name, "ping", "-c", "3", "-i", "0.2", "-W", "1", dst],
                            capture_output=True, text=True)
    replies = re.search(r"(\d+) packets transmitted, (\d+) received", result.stdout)
    rtt = re.search(r"rtt min/avg/max/mdev = [\d.]+/([\d.]+)/", result.stdout)
    measured = ", ".join(part for part in (
        f"{rtt.group(1)} ms round trip" if rtt else "",
        f"{replies.group(2)}/{replies.group(1)} replies" if replies else "") if part)
    return result.returncode == 0, measured  # iputils: 0 once any probe was answered


def _check(pods: list[lab.Pod]) -> bool:
    ok = True
    _say("")
    for src in pods:
        for dst in pods:
            if src is dst:
                continue
            good, measured = _ping(src, dst.addr)
            ok &= good
            _say(f"ping {src.addr:<15} -> {dst.addr:<15} {'ok' if good else 'FAILED'} ({measured})")
    outside, _ = _ping(pods[0], lab.OUTSIDE_HOST_IP)
    ok &= outside
    _say(f"ping {pods[0].addr:<15} -> {lab.OUTSIDE_HOST_IP:<15} {'ok' if outside else 'FAILED'} "
         "(outside host, masqueraded)")
    _say("all checks passed" if ok else "SOME CHECKS FAILED")
    return ok
