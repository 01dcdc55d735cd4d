"""The overlay self-test as flannelctl shows it: a node's probe table (in ``doctor``) and the
cluster's (``flannelctl probes``: every node's table, asked of its flanneld's /probes).

Fetching is :func:`fetch`; everything else is pure: findings for doctor, the failing pairs, and
a matrix for small clusters.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flanneld.plan.probes import FAILING, OK, UNPROBED

TIMEOUT = 2.0
MATRIX_MAX = 16  # nodes: beyond this a matrix is wider than a terminal; failing pairs are listed
CELL = {OK: ".", "unreachable": "U", "underlay-unreachable": "X", "mtu": "M", UNPROBED: "?"}


class FetchError(Exception):
    """A node's table could not be had; the message says why (one line)."""


def url(address: str, port: int) -> str:
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    return f"http://{host}:{port}/probes"


def fetch(address: str, port: int, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
    """A node's probe table from its flanneld's health endpoint."""
    where = url(address, port)
    try:
        with urllib.request.urlopen(where, timeout=timeout) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace").strip()
        raise FetchError(f"{where} answered {exc.code}: {detail}") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise FetchError(f"{where} does not answer: {reason}") from None
    peers = doc.get("peers") if isinstance(doc, dict) else None
    if not isinstance(peers, list):
        raise FetchError(f"{where} answered something other than a probe table")
    return peers


@dataclass(frozen=True)
class Row:
    """One peer of a table, as doctor says it."""

    level: str  # ok | warning | problem (doctor's levels)
    text: str


def rows(table: Sequence[Mapping[str, Any]]) -> list[Row]:
    """Doctor's lines for a node's table: each failing peer (failing first, as the table is
    ordered), each unprobed one as a warning, then one line for those that answer."""
    out: list[Row] = []
    answering = [p for p in table if p.get("state") == OK]
    for peer in table:
        state = peer.get("state")
        name = f"peer {peer.get('subnet')} ({peer.get('public_ip')})"
        if state in FAILING:
            out.append(Row("problem", f"{name}: {state} — {peer.get('cause')}"))
        elif state == UNPROBED:
            out.append(Row("warning", f"{name}: unprobed ({peer.get('cause')})"))
    if answering:
        rtts = sorted(p["rtt_ms"] for p in answering if isinstance(p.get("rtt_ms"), int | float))
        median = f", median round trip {rtts[len(rtts) // 2]:.2f} ms" if rtts else ""
        out.append(Row("ok", f"{len(answering)} of {len(table)} peers answer over the overlay, full size "
                             f"included{median}"))
    elif not table:
        out.append(Row("ok", "no peers to probe"))
    return out


@dataclass(frozen=True)
class Node:
    subnet: str
    public_ip: str


def failing_pairs(tables: Mapping[Node, Sequence[Mapping[str, Any]]]) -> list[tuple[Node, str, str, str, str]]:
    """(from, to subnet, to public IP, state, cause) for every pair whose probe fails."""
    pairs = []
    for node, table in sorted(tables.items(), key=lambda item: item[0].subnet):
        for peer in table:
            if peer.get("state") in FAILING:
                pairs.append((node, str(peer.get("subnet")), str(peer.get("public_ip")), str(peer.get("state")),
                              str(peer.get("cause"))))
    return pairs


def matrix(nodes: Sequence[Node], tables: Mapping[Node, Sequence[Mapping[str, Any]]]) -> list[str]:
    """From each node (row) to each other (column): '.' ok, U unreachable, X underlay-unreachable,
    M mtu, ? unprobed or not in its table, blank for a node that could not be asked."""
    width = max(len(n.subnet) + len(n.public_ip) for n in nodes) + 7
    lines = [" " * width + " ".join(f"{i:>2}" for i in range(1, len(nodes) + 1))]
    for i, node in enumerate(nodes, 1):
        table = tables.get(node)
        states = {str(p.get("subnet")): str(p.get("state")) for p in table or ()}
        cells = []
        for other in nodes:
            if other is node:
                cells.append(" -")
            elif table is None:
                cells.append("  ")
            else:
                cells.append(f"{CELL.get(states.get(other.subnet, UNPROBED), '?'):>2}")
        label = f"{i:>2} {node.subnet} ({node.public_ip})"
        lines.append(f"{label:<{width}}" + " ".join(cells))
    lines.append("  . ok  U unreachable  X underlay-unreachable  M mtu  ? unprobed  (row: from, column: to)")
    return lines
