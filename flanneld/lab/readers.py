"""A node's kernel state as `ip -j` and `bridge -j` show it, for assertions."""

from __future__ import annotations

import json
from typing import Any

from flanneld.lab.cluster import Node


def ip_json(node: Node, *args: str) -> list[dict[str, Any]]:
    out = node.sh("ip", "-j", *args).stdout
    return json.loads(out) if out.strip() else []


def routes(node: Node, family: str = "-4") -> dict[str, dict[str, Any]]:
    """Main-table routes not made by the kernel, by destination."""
    return {r["dst"]: r for r in ip_json(node, family, "route", "show", "table", "main")
            if r.get("protocol") != "kernel" and r["dst"] != "default"}


def neighs(node: Node, dev: str = "flannel.1") -> dict[str, str]:
    return {n["dst"]: n.get("lladdr", "") for n in ip_json(node, "neigh", "show", "dev", dev)
            if "PERMANENT" in n.get("state", [])}


def fdbs(node: Node, dev: str = "flannel.1") -> dict[str, str]:
    out = node.sh("bridge", "-j", "fdb", "show", "dev", dev).stdout
    return {e["mac"]: e.get("dst", "") for e in json.loads(out or "[]") if "dst" in e}


def link(node: Node, dev: str = "flannel.1") -> dict[str, Any] | None:
    found = node.sh("ip", "-j", "-d", "link", "show", dev, check=False)
    return json.loads(found.stdout)[0] if found.returncode == 0 else None
