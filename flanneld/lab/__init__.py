"""Clusters in network namespaces, etcd servers, probes and the demo: used by the tests, the
benchmarks and flanneld-demo only; nothing in the product imports it.
"""

from flanneld.lab.cluster import Lab, Node, Pod
from flanneld.lab.etcd import EtcdCluster, EtcdProxy, EtcdServer, EtcdTLS, enable_auth, etcd_metric, make_certs
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
    cleanup_stale,
    enter_namespace,
    free_port,
    ip,
    ipbatch,
    list_namespaces,
    new_prefix,
    sh,
    tail,
    tool,
)

__all__ = [
    "CTL_IP", "OUTSIDE", "OUTSIDE_HOST_IP", "REMOTE_GW", "REMOTE_NET", "ROUTER_IP", "STATE_DIR", "UNDERLAY",
    "UNDERLAY6", "EtcdCluster", "EtcdProxy", "EtcdServer", "EtcdTLS", "Lab", "LabError", "Node", "Pod",
    "cleanup", "cleanup_stale", "enable_auth", "enter_namespace", "etcd_metric", "free_port", "ip", "ipbatch",
    "list_namespaces", "make_certs", "new_prefix", "sh", "tail", "tool",
]
