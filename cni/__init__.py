"""The ``flannel`` CNI plugin and its installer (installed as ``flanneld.cni``)."""
