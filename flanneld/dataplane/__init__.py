"""Desired -> diff -> the node's OS: the reconciler, the one netlink owner and its codec, the
device handlers, interface choice and the firewall.
"""
