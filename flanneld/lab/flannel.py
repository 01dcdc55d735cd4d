"""A flannel cluster for tests and benchmarks: nodes in namespaces running flanneld on a shared etcd."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import uuid
from typing import Any

from flanneld.etcd.client import EtcdClient
from flanneld.etcd.options import EtcdOptions
from flanneld.lab.cluster import Lab, Node, Pod
from flanneld.lab.etcd import EtcdCluster, EtcdServer
from flanneld.lab.netns import CTL_IP
from flanneld.lab.probes import eventually
from flanneld.lab.readers import routes
from flanneld.model.lease import decode_lease, leases_prefix, subnet_key
from flanneld.model.subnetenv import SubnetEnv, read

_counter = itertools.count(1)
# Daemons lease below 198.18.200.0: tests put made-up peers (and junk) from 198.18.200.0 up, where
# no node's own lease can be (a random pick landing on one made tests overwrite a node's own key).
NETWORK = {"Network": "198.18.0.0/16", "SubnetMax": "198.18.199.0", "Backend": {"Type": "vxlan"}}


class Cluster:
    """Nodes in namespaces on an etcd (a server or a cluster); `etcd_options` are the test's own credentials."""

    def __init__(self, session_lab: Lab, etcd: EtcdServer | EtcdCluster, nodes: int = 3,
                 config: dict[str, Any] | None = None, etcd_endpoint: str | None = None,
                 etcd_options: dict[str, Any] | None = None) -> None:
        self.lab = Lab(prefix=f"{session_lab.prefix}c{next(_counter)}", ctl=session_lab.ctl)
        self.etcd = etcd
        self.prefix = f"/flannel-test/{uuid.uuid4().hex[:10]}/network"
        self.endpoint = etcd_endpoint or etcd.endpoint_for(CTL_IP)
        self.etcd_client = EtcdClient(EtcdOptions(endpoints=etcd.endpoints, prefix=self.prefix, **(etcd_options or {})))
        if config is not None:
            self.set_config(config)
        self.nodes = self.lab.build_underlay(nodes)

    def set_config(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else json.dumps(config)
        self.etcd_client.put(self.prefix + "/config", text.encode())

    # -- daemons -----------------------------------------------------------------------------

    def start(self, node: Node, *flags: str, wait: bool = True, env: dict[str, str] | None = None
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
    def stop(node: Node, sig: int = signal.SIGTERM) -> int:
        return node.stop(node.procs.pop(), sig)

    # -- state -------------------------------------------------------------------------------

    def env(self, node: Node) -> SubnetEnv:
        env = read(node.subnet_file)
        assert env is not None, f"no subnet file for {node.ns}"
        return env

    def subnet(self, node: Node) -> str:
        """The node's IPv4 subnet (its IPv6 one in an IPv6-only network)."""
        env = self.env(node)
        return str(env.lease_subnet or env.lease_subnet6)

    def subnet6(self, node: Node) -> str:
        return str(self.env(node).lease_subnet6)

    def lease_key(self, node: Node) -> str:
        env = self.env(node)
        return leases_prefix(self.prefix) + subnet_key(env.lease_subnet, env.lease_subnet6)

    def lease(self, node: Node):
        kv = self.etcd_client.get(self.lease_key(node))
        return decode_lease(self.lease_key(node)[len(leases_prefix(self.prefix)):], kv.value) if kv else None

    def pod(self, node: Node, index: int = 1) -> Pod:
        env = self.env(node)
        return node.add_pod(str(env.subnet) if env.subnet else None, index,
                            gateway6_cidr=str(env.ipv6_subnet) if env.ipv6_subnet else None, mtu=env.mtu)

    def close(self) -> None:
        self.lab.close()
        self.etcd_client.close()
