"""Values and byte-exact codecs everyone shares: the network config, lease keys and values,
subnet.env, WireGuard keys, address families. No etcd, no netlink, no threads.
"""
