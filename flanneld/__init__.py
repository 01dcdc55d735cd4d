"""flanneld: a Flannel-compatible overlay network daemon.

The subpackages follow the data flow, etcd -> leases -> desired kernel state -> diff -> netlink:
``model`` (values and codecs), ``etcd``, ``leases``, ``plan``, ``dataplane``, then the two
programs, ``node`` (the daemon) and ``ctl`` (flannelctl); ``lab`` is for tests and the demo only.
An import only goes down that list (checked in CI); see docs/architecture.md.
"""

__version__ = "0.1.0"
