"""What the benchmarks share: a private namespace with etcd in it, and the table + JSON report."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from flanneld import lab


@contextmanager
def etcd_in_namespace(name: str) -> Iterator[tuple[lab.EtcdServer, str]]:
    """(etcd, control namespace): this process moves into a fresh namespace (never the root one)
    running a throwaway etcd; both are removed afterwards, also on errors."""
    lab.cleanup_stale()
    bench_lab = lab.Lab()
    try:
        ctl = bench_lab.create_control()
        lab.enter_namespace(ctl)
        server = lab.EtcdServer(name)
        server.start()
        try:
            yield server, ctl
        finally:
            server.destroy()
    finally:
        bench_lab.close()


def report(rows: Sequence[tuple[str, str]], result: dict[str, Any]) -> None:
    """A two-column table (measure, value), then the one JSON line."""
    width = max(len(name) for name, _ in rows)
    print(f"{'measure'.ljust(width)}  value")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    print(json.dumps(result))
