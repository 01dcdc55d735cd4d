"""flanneld: a Flannel-compatible overlay network daemon.

The package is split into a pure core (config, lease codecs, allocation, planning) and an
imperative shell (etcd etcd_client, netlink reconciler, firewall, daemon wiring).
"""

__version__ = "0.1.0"
