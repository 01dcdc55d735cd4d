"""Test helpers: a flannel cluster in namespaces on the session etcd, and kernel-state readers."""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

from flanneld.etcd.client import Registry
from flanneld.etcd.options import EtcdOptions
from flanneld.lab import cluster as lab
from flanneld.model.lease import decode_lease, leases_prefix, subnet_key
from flanneld.model.subnetenv import SubnetEnv, read

_counter = itertools.count(1)
# Daemons lease below 198.18.200.0: tests put made-up peers (and junk) from 198.18.200.0 up, where
# no node's own lease can be (a random pick landing on one made tests overwrite a node's own key).
NETWORK = {"Network": "198.18.0.0/16", "SubnetMax": "198.18.199.0", "Backend": {"Type": "vxlan"}}


def eventually(check: Callable[[], Any], timeout: float = 1.0, interval: float = 0.01, what: str = "") -> float:
    """Poll until check() is truthy; return the seconds it took (AssertionError after timeout)."""
    start = time.monotonic()
    while True:
        result = check()
        elapsed = time.monotonic() - start
        if result:
            return elapsed
        if elapsed > timeout:
            raise AssertionError(f"not within {timeout}s: {what or check}")
        time.sleep(interval)


class Cluster:
    """Nodes in namespaces on an etcd (a server or a cluster); `etcd_options` are the test's own credentials."""

    def __init__(self, session_lab: lab.Lab, etcd: lab.EtcdServer | lab.EtcdCluster, nodes: int = 3,
                 config: dict[str, Any] | None = None, etcd_endpoint: str | None = None,
                 etcd_options: dict[str, Any] | None = None) -> None:
        self.lab = lab.Lab(prefix=f"{session_lab.prefix}c{next(_counter)}", ctl=session_lab.ctl)
        self.etcd = etcd
        self.prefix = f"/flannel-test/{uuid.uuid4().hex[:10]}/network"
        self.endpoint = etcd_endpoint or etcd.endpoint_for(lab.CTL_IP)
        self.registry = Registry(EtcdOptions(endpoints=etcd.endpoints, prefix=self.prefix, **(etcd_options or {})))
        if config is not None:
            self.set_config(config)
        self.nodes = self.lab.build_underlay(nodes)

    def set_config(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else json.dumps(config)
        self.registry.put(self.prefix + "/config", text.encode())

    # -- daemons -----------------------------------------------------------------------------

    def start(self, node: lab.Node, *flags: str, wait: bool = True, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        proc = node.start_flanneld(self.endpoint, self.prefix, "--iptables-resync=1", *flags, env=env)
        if wait:
            node.wait_ready()
        return proc

    def start_all(self, *flags: str, converge: bool = True) -> None:
        """Start every node's daemon; by default also wait until each routes to every other.

        Ready means "my own lease and device are in place": a node that became ready before a
        later one joined learns of it from the watch a few milliseconds later.
        """
        for node in self.nodes:
            self.start(node, *flags, wait=False)
        for node in self.nodes:
            node.wait_ready()
        if converge:
            eventually(self._converged, timeout=5.0, what="every node routes to every other node")

    def _converged(self) -> bool:
        envs = {node.ns: self.env(node) for node in self.nodes}
        subnets = {ns: {str(s) for s in (env.lease_subnet, env.lease_subnet6) if s} for ns, env in envs.items()}
        for node in self.nodes:
            have = set(routes(node)) | set(routes(node, "-6"))
            if any(not subnets[other.ns] <= have for other in self.nodes if other is not node):
                return False
        return True

    @staticmethod
    def stop(node: lab.Node, sig: int = signal.SIGTERM) -> int:
        return node.stop(node.procs.pop(), sig)

    # -- state -------------------------------------------------------------------------------

    def env(self, node: lab.Node) -> SubnetEnv:
        env = read(node.subnet_file)
        assert env is not None, f"no subnet file for {node.ns}"
        return env

    def subnet(self, node: lab.Node) -> str:
        """The node's IPv4 subnet (its IPv6 one in an IPv6-only network)."""
        env = self.env(node)
        return str(env.lease_subnet or env.lease_subnet6)

    def subnet6(self, node: lab.Node) -> str:
        return str(self.env(node).lease_subnet6)

    def lease_key(self, node: lab.Node) -> str:
        env = self.env(node)
        return leases_prefix(self.prefix) + subnet_key(env.lease_subnet, env.lease_subnet6)

    def lease(self, node: lab.Node):
        kv = self.registry.get(self.lease_key(node))
        return decode_lease(self.lease_key(node)[len(leases_prefix(self.prefix)):], kv.value) if kv else None

    def pod(self, node: lab.Node, index: int = 1) -> lab.Pod:
        env = self.env(node)
        return node.add_pod(str(env.subnet) if env.subnet else None, index,
                            gateway6_cidr=str(env.ipv6_subnet) if env.ipv6_subnet else None, mtu=env.mtu)

    def close(self) -> None:
        self.lab.close()
        self.registry.close()


class Pinger:
    """Pings from a pod every `interval` seconds until stop(), which returns (sent, lost).

    Lost counts the sequence numbers with no reply up to the last one answered, so the probe
    still in flight when we stop is not counted as lost.
    """

    def __init__(self, src: lab.Pod, dst: str, interval: float = 0.01) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", src.name, "ping", "-n", "-i", str(interval), "-W", "1",
                                      dst], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(0.3)

    def stop(self) -> tuple[int, int]:
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=15)
        answered = {int(m) for m in re.findall(r"icmp_seq=(\d+) ttl=", out)}
        assert answered, f"no ping was answered: {out[-500:]}"
        return max(answered), max(answered) - len(answered)


def ip_json(node: lab.Node, *args: str) -> list[dict[str, Any]]:
    out = node.sh("ip", "-j", *args).stdout
    return json.loads(out) if out.strip() else []


def routes(node: lab.Node, family: str = "-4") -> dict[str, dict[str, Any]]:
    """Main-table routes not made by the kernel, by destination."""
    return {r["dst"]: r for r in ip_json(node, family, "route", "show", "table", "main")
            if r.get("protocol") != "kernel" and r["dst"] != "default"}


def neighs(node: lab.Node, dev: str = "flannel.1") -> dict[str, str]:
    return {n["dst"]: n.get("lladdr", "") for n in ip_json(node, "neigh", "show", "dev", dev)
            if "PERMANENT" in n.get("state", [])}


def fdbs(node: lab.Node, dev: str = "flannel.1") -> dict[str, str]:
    out = node.sh("bridge", "-j", "fdb", "show", "dev", dev).stdout
    return {e["mac"]: e.get("dst", "") for e in json.loads(out or "[]") if "dst" in e}


def link(node: lab.Node, dev: str = "flannel.1") -> dict[str, Any] | None:
    found = node.sh("ip", "-j", "-d", "link", "show", dev, check=False)
    return json.loads(found.stdout)[0] if found.returncode == 0 else None


def ping(src: lab.Pod, dst: str, count: int = 2, interval: float = 0.2, timeout: int = 2
         ) -> subprocess.CompletedProcess[str]:
    return lab.sh(["ping", "-c", str(count), "-i", str(interval), "-W", str(timeout), dst], ns=src.name, check=False,
                  timeout=count * interval + timeout + 10)


def tcp_exchange(client: lab.Pod, server: lab.Pod, port: int = 5201, ipv6: bool = False) -> str:
    """Open a TCP connection from client to server (over IPv6 if asked) and echo a message back."""
    addr = server.ip6.split("/")[0] if ipv6 and server.ip6 else server.addr
    family = "socket.AF_INET6" if ":" in addr else "socket.AF_INET"
    srv = subprocess.Popen(
        ["ip", "netns", "exec", server.name, "python3", "-c",
         f"import socket;s=socket.socket({family});s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
         f"s.bind(('{addr}',{port}));s.listen(1);c,_=s.accept();c.sendall(c.recv(100)[::-1]);c.close()"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            out = lab.sh(["python3", "-c",
                          "import socket,sys;s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=2);"
                          "s.sendall(b'flannel over tcp');print(s.recv(100).decode())", addr, str(port)],
                         ns=client.name, check=False)
            if out.returncode == 0:
                return out.stdout.strip()
            time.sleep(0.05)
        raise AssertionError(f"TCP to {addr}:{port} failed: {out.stderr}")
    finally:
        srv.kill()
        srv.wait()
