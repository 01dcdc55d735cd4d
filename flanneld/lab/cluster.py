"""A cluster in network namespaces on one machine: for the demo and the integration tests.

Topology (every name starts with the lab's prefix, e.g. ``fl3a9c``)::

    <p>-ctl   the controlling process and etcd (198.51.100.2) ──┐
    <p>-n1 … <p>-nN  nodes, <p>-eth0 = 198.51.100.1x/24 ────────┤ bridge br0 in <p>-ul,
                                                                 │ 198.51.100.1: router
    <p>-out   an "outside world" host 203.0.113.10 ── <p>-ul (203.0.113.1)

The root namespace is never modified: links are created directly inside namespaces, and the
controlling process itself moves into ``<p>-ctl`` (enter_namespace) before talking to etcd,
because from the root namespace these test addresses would route to the real LAN.

Everything a lab creates is found again by its prefix: ``cleanup(prefix)`` kills processes
inside the namespaces and deletes them; ``cleanup_stale()`` does that for labs whose owning
process has died (a crashed test run).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from flanneld.lab.netns import (
    CTL_IP,
    OUTSIDE,
    OUTSIDE_HOST_IP,
    REMOTE_GW,
    REMOTE_NET,
    ROUTER_IP,
    STATE_DIR,
    UNDERLAY,
    UNDERLAY6,
    LabError,
    cleanup,
    ip,
    ipbatch,
    new_prefix,
    sh,
    tail,
    tool,
)

# the cluster


@dataclass
class Pod:
    name: str  # namespace
    ifname: str
    ip: str  # with prefix length
    ip6: str | None = None

    @property
    def addr(self) -> str:
        return self.ip.split("/")[0]


@dataclass
class Node:
    lab: Lab
    index: int
    ns: str
    ip: str
    ip6: str
    ifname: str
    pods: list[Pod] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    healthz_port: int = 8471
    run_holder: subprocess.Popen[bytes] | None = None  # keeps the node's private /run alive

    def private_run(self) -> None:
        """Give this node its own /run (a tmpfs in a mount namespace of its own) for every process
        started on it from now on, as a real node has: its key file, wireguard-go's sockets in
        /run/wireguard. The namespace outlives daemon restarts (a holder process keeps it)."""
        if self.run_holder is not None:
            return
        script = ("mount -t tmpfs -o mode=0755 flannel-lab-run /run && mkdir -p /run/flannel /run/wireguard "
                  "&& echo ready && exec sleep 1000000")
        holder = subprocess.Popen(["ip", "netns", "exec", self.ns, "unshare", "--mount", "--propagation", "private",
                                   "sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        line = holder.stdout.readline() if holder.stdout else b""
        if line.strip() != b"ready":
            holder.kill()
            raise LabError(f"could not give {self.ns} a private /run: {line.decode(errors='replace').strip()}")
        self.run_holder = holder

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """`argv` run in this node's network namespace (and its private /run, if it has one)."""
        if self.run_holder is not None:
            return ["nsenter", f"--target={self.run_holder.pid}", "--mount", "--net", "--", *argv]
        return ["ip", "netns", "exec", self.ns, *argv]

    def sh(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        if self.run_holder is not None:
            return sh(self.wrap(args), check=check, timeout=timeout)
        return sh(list(args), ns=self.ns, check=check, timeout=timeout)

    def sh_json(self, *args: str) -> list:
        import json

        out = self.sh(*args).stdout
        return json.loads(out) if out.strip() else []

    def popen(self, argv: Sequence[str], log_name: str, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        path = self.log_path(log_name)
        log = open(path, "ab")  # noqa: SIM115 - owned by the child process
        proc = subprocess.Popen(self.wrap(argv), stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        log.close()
        proc.log_path = path  # type: ignore[attr-defined]  # what wait_stopped reports
        self.procs.append(proc)
        return proc

    def add_pod(self, gateway_cidr: str | None, index: int, bridge: str | None = None,
                gateway6_cidr: str | None = None, mtu: int | None = None) -> Pod:
        """A pod namespace wired like the CNI bridge plugin would: veth into a bridge holding the gateway(s).

        `gateway_cidr` is None in an IPv6-only network; the pod's address then is its IPv6 one.
        """
        p = self.lab.prefix
        bridge = bridge or f"{p}-cni0"
        pod_ns = f"{self.ns}-p{index}"
        self.lab.add_namespace(pod_ns)
        cmds = []
        if ip("link", "show", bridge, ns=self.ns, check=False).returncode != 0:
            cmds += [f"link add {bridge} type bridge", f"link set {bridge} up"]
            cmds += [f"addr add {cidr} dev {bridge} nodad" if ":" in cidr else f"addr add {cidr} dev {bridge}"
                     for cidr in (gateway_cidr, gateway6_cidr) if cidr]
        host_if = f"{p}-v{index}"
        pod_if = f"{p}-eth0"
        cmds += [f"link add {host_if} type veth peer name {pod_if} netns {pod_ns}",
                 f"link set {host_if} master {bridge} up"]
        if mtu:
            cmds.append(f"link set {host_if} mtu {mtu}")
        ipbatch(cmds, ns=self.ns)
        pod_cmds = [f"link set {pod_if} up"]
        pod_ip = pod6 = None
        if gateway_cidr:
            gw_ip, plen = gateway_cidr.split("/")
            subnet = ipaddress.ip_interface(gateway_cidr).network
            offset = 10 if subnet.num_addresses > 32 else 1  # small subnets: right after the gateway
            pod_ip = f"{subnet.network_address + offset + index}/{plen}"
            pod_cmds += [f"addr add {pod_ip} dev {pod_if}", f"route add default via {gw_ip}"]
        if mtu:
            pod_cmds.append(f"link set {pod_if} mtu {mtu}")
        if gateway6_cidr:
            gw6, plen6 = gateway6_cidr.split("/")
            subnet6 = ipaddress.ip_interface(gateway6_cidr).network
            pod6 = f"{subnet6.network_address + 10 + index}/{plen6}"
            pod_cmds += [f"addr add {pod6} dev {pod_if} nodad", f"route add ::/0 via {gw6}"]
        ipbatch(pod_cmds, ns=pod_ns)
        pod = Pod(pod_ns, pod_if, pod_ip or pod6 or "", pod6)
        self.pods.append(pod)
        return pod

    @property
    def subnet_file(self) -> str:
        return os.path.join(self.lab.dir, self.ns, "subnet.env")

    def start_flanneld(self, endpoint: str, prefix: str, *flags: str, healthz_port: int = 8471,
                       env: dict[str, str] | None = None, executable: str = "flanneld") -> subprocess.Popen[bytes]:
        """Run flanneld in this node's namespace (its subnet file and log live in the lab dir)."""
        os.makedirs(os.path.dirname(self.subnet_file), exist_ok=True)
        argv = [tool(executable), f"--etcd-endpoints={endpoint}", f"--etcd-prefix={prefix}",
                f"--subnet-file={self.subnet_file}", f"--healthz-port={healthz_port}", *flags]
        self.healthz_port = healthz_port
        return self.popen(argv, "flanneld", env=env)

    def http(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """GET one of this node's flanneld endpoints (from the control namespace)."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{self.ip}:{self.healthz_port}{path}", timeout=timeout) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs[-1] if self.procs else None
            if proc is not None and proc.poll() is not None:
                raise LabError(f"flanneld on {self.ns} exited with {proc.returncode}: {self.log()[-2000:]}")
            try:
                if self.http("/readyz", timeout=0.5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise LabError(f"flanneld on {self.ns} not ready after {timeout}s: {self.log()[-2000:]}")

    def log_path(self, name: str = "flanneld") -> str:
        """Where popen() sends the output of the process it started under `name` (appended to)."""
        return os.path.join(self.lab.dir, f"{self.ns}-{name}.log")

    def log(self, name: str = "flanneld") -> str:
        try:
            with open(self.log_path(name), errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Signal one of this node's processes and wait for it (see wait_stopped)."""
        proc.send_signal(sig)
        return self.wait_stopped(proc, sig, timeout)

    def wait_stopped(self, proc: subprocess.Popen[bytes], sig: int, timeout: float) -> int:
        """Wait for a process sent `sig`; one that hangs (a daemon) is made to print every
        thread's stack (SIGUSR1) into its log, killed, and reported with that log (LabError)."""
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)
            time.sleep(1)
            proc.kill()
            proc.wait()
            log_path = getattr(proc, "log_path", "")
            raise LabError(f"process {proc.pid} on {self.ns} did not exit within {timeout}s of "
                           f"{signal.Signals(sig).name}; the end of {log_path}:\n{tail(log_path, 200)}") from None

    def stop_processes(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def release_run(self) -> None:
        """End the private /run (and reap its holder)."""
        if self.run_holder is not None:
            self.run_holder.kill()
            self.run_holder.wait()
            self.run_holder = None


class Lab:
    """Namespaces of one cluster, all named `<prefix>…`; close() removes everything.

    A lab either owns a control namespace (``<prefix>-ctl``) or, given `ctl`, attaches its
    underlay to an existing one (the test session's, where etcd runs).
    """

    def __init__(self, prefix: str | None = None, ctl: str | None = None) -> None:
        self.prefix = prefix or new_prefix()
        self.owns_ctl = ctl is None
        if self.owns_ctl:
            os.makedirs(STATE_DIR, exist_ok=True)
            with open(os.path.join(STATE_DIR, self.prefix), "w") as fh:
                fh.write(str(os.getpid()))
        self.dir = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        self.namespaces: list[str] = []
        self.nodes: list[Node] = []
        self.ctl = ctl or f"{self.prefix}-ctl"
        self.remote_route = False
        self.ul = f"{self.prefix}-ul"
        self.out = f"{self.prefix}-out"

    def add_namespace(self, name: str, forwarding: bool = False) -> str:
        ip("netns", "add", name)
        self.namespaces.append(name)
        sysctls = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
        if forwarding:
            sysctls += ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]
        sh(["sysctl", "-q", "-w", *sysctls], ns=name)
        ip("link", "set", "lo", "up", ns=name)
        return name

    def create_control(self) -> str:
        """The namespace for the controlling process and etcd (enter it with enter_namespace)."""
        return self.add_namespace(self.ctl)

    def build_underlay(self, nodes: int, connect_ctl: bool = True) -> list[Node]:
        p = self.prefix
        self.add_namespace(self.ul, forwarding=True)
        ipbatch([
            "link add br0 type bridge", f"addr add {ROUTER_IP}/24 dev br0",
            f"addr add {UNDERLAY6}::1/64 dev br0 nodad", "link set br0 up",
        ], ns=self.ul)
        self.add_namespace(self.out)
        ipbatch([f"link add {p}-o netns {self.out} type veth peer name {p}-r",
                 f"addr add {OUTSIDE}.1/24 dev {p}-r", f"link set {p}-r up"], ns=self.ul)
        ipbatch([f"addr add {OUTSIDE_HOST_IP}/24 dev {p}-o", f"link set {p}-o up",
                 f"route add {UNDERLAY}.0/24 via {OUTSIDE}.1"], ns=self.out)
        if connect_ctl:
            ipbatch([f"link add {p}-c netns {self.ctl} type veth peer name {p}-cu",
                     f"link set {p}-cu master br0 up"], ns=self.ul)
            ipbatch([f"addr add {CTL_IP}/24 dev {p}-c", f"addr add {UNDERLAY6}::2/64 dev {p}-c nodad",
                     f"link set {p}-c up"], ns=self.ctl)
        for i in range(1, nodes + 1):
            self.add_node(i)
        return self.nodes

    def add_node(self, i: int) -> Node:
        p = self.prefix
        ns = self.add_namespace(f"{p}-n{i}", forwarding=True)
        ifname = f"{p}-eth0"
        node_ip, node_ip6 = f"{UNDERLAY}.{10 + i}", f"{UNDERLAY6}::{10 + i:x}"
        ipbatch([f"link add {ifname} netns {ns} type veth peer name {p}-n{i}",
                 f"link set {p}-n{i} master br0 up"], ns=self.ul)
        ipbatch([f"addr add {node_ip}/24 dev {ifname}", f"addr add {node_ip6}/64 dev {ifname} nodad",
                 f"link set {ifname} up",
                 f"route add default via {ROUTER_IP}", f"route add ::/0 via {UNDERLAY6}::1"], ns=ns)
        node = Node(self, i, ns, node_ip, node_ip6, ifname)
        self.nodes.append(node)
        return node

    def add_remote_node(self, i: int) -> Node:
        """A node on another L2 segment (203.0.113.64/26 behind the underlay router): reachable, not on-link."""
        p = self.prefix
        ns = self.add_namespace(f"{p}-n{i}", forwarding=True)
        ifname = f"{p}-eth0"
        if ip("link", "show", "br1", ns=self.ul, check=False).returncode != 0:
            ipbatch(["link add br1 type bridge", f"addr add {REMOTE_GW}/26 dev br1", "link set br1 up"], ns=self.ul)
            ip("route", "replace", f"{REMOTE_NET}", "via", ROUTER_IP, ns=self.ctl)  # etcd answers it
            self.remote_route = True
        node_ip = f"{OUTSIDE}.{65 + i}"
        ipbatch([f"link add {ifname} netns {ns} type veth peer name {p}-n{i}",
                 f"link set {p}-n{i} master br1 up"], ns=self.ul)
        ipbatch([f"addr add {node_ip}/26 dev {ifname}", f"link set {ifname} up",
                 f"route add default via {REMOTE_GW}"], ns=ns)
        node = Node(self, i, ns, node_ip, "", ifname)
        self.nodes.append(node)
        return node

    def close(self) -> None:
        if self.remote_route:
            ip("route", "del", REMOTE_NET, ns=self.ctl, check=False)
        for node in self.nodes:
            node.stop_processes()
        if not self.owns_ctl:
            # our link into the shared control namespace goes away with the underlay namespace
            ip("link", "del", f"{self.prefix}-c", ns=self.ctl, check=False)
        cleanup(self.prefix)  # also wireguard-go and other detached processes in the node namespaces
        for node in self.nodes:
            node.release_run()
        shutil.rmtree(self.dir, ignore_errors=True)

