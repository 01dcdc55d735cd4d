"""The node the planner tests plan for: its external interface on the test underlay (dual-stack,
both subnets on-link) and the network configs they run under."""

from __future__ import annotations

import ipaddress

from flanneld.plan.backend import External

A = ipaddress.ip_address
N = ipaddress.ip_network

EXT = External("eth0", 2, 1500, A("198.51.100.11"), A("198.51.100.11"), A("2001:db8:51::11"), A("2001:db8:51::11"),
               (N("198.51.100.0/24"), N("2001:db8:51::/64")))
V4 = {"Network": "198.18.0.0/16"}
DUAL = {"Network": "198.18.0.0/16", "EnableIPv6": True, "IPv6Network": "2001:db8:1800::/56"}
