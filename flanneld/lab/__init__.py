"""Clusters in network namespaces, etcd servers, probes and the demo: used by the tests, the
benchmarks and flanneld-demo only; nothing in the product imports it.
"""

from flanneld.lab import netns
from flanneld.lab.cluster import Lab, Node, Pod
from flanneld.lab.etcd import EtcdCluster, EtcdProxy, EtcdServer, EtcdTLS, enable_auth, etcd_metric, make_certs
from flanneld.lab.netns import *  # noqa: F403  (the lab's addresses and namespace helpers: netns.__all__)

__all__ = [*netns.__all__, "EtcdCluster", "EtcdProxy", "EtcdServer", "EtcdTLS", "Lab", "Node", "Pod", "enable_auth",
           "etcd_metric", "make_certs"]
