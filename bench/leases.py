#!/usr/bin/env python3
"""Lease benchmark: 1000 nodes acquiring subnets, and watch-event latency.

Runs etcd inside a private network namespace (never the root one). Prints a table and one JSON
line. Baseline, measured in the same run: a bare etcd put round trip.

    .venv/bin/python bench/leases.py [--nodes 1000] [--workers 20] [--events 500]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from benchlib import etcd_in_namespace, report

from flanneld.etcd.client import EtcdClient
from flanneld.etcd.options import EtcdOptions
from flanneld.leases.manager import LeaseManager
from flanneld.leases.watcher import LeaseWatcher
from flanneld.model.config import parse_config
from flanneld.model.lease import LeaseAttrs, backend_json, encode_value, leases_prefix

PREFIX = "/coreos.com/network"
CONFIG = {"Network": "198.18.0.0/16", "SubnetLen": 26, "Backend": {"Type": "vxlan"}}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def attrs(n: int) -> LeaseAttrs:
    return LeaseAttrs(ipaddress.IPv4Address(0xC6336400 + n + 1), None, "vxlan",
                      backend_json({"VNI": 1, "VtepMAC": f"0e:00:00:00:{n >> 8:02x}:{n & 255:02x}"}))


def bench_acquire(endpoint: str, nodes: int, workers: int) -> dict[str, float]:
    cfg = parse_config(json.dumps(CONFIG))
    local = threading.local()

    def acquire(n: int) -> float:
        if not hasattr(local, "reg"):
            local.reg = EtcdClient(EtcdOptions(endpoints=(endpoint,), prefix=PREFIX))
        start = time.perf_counter()
        LeaseManager(local.reg, cfg, PREFIX, rng=random.Random(n)).acquire(attrs(n))
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        durations = list(pool.map(acquire, range(nodes)))
    total = time.perf_counter() - start
    return {"total_s": total, "p50_ms": pct(durations, 0.5) * 1e3, "p99_ms": pct(durations, 0.99) * 1e3}


def bench_watch(reg: EtcdClient, events: int) -> tuple[list[float], list[float]]:
    """Latency from put() returning to the watcher delivering the event; and bare put latency."""
    watcher = LeaseWatcher(reg, PREFIX)
    watcher.resync()
    arrived: dict[str, float] = {}
    done = threading.Event()

    def sink(batch):
        now = time.perf_counter()
        for ev in batch:
            arrived.setdefault(ev.lease.key, now)
        if len(arrived) >= events:
            done.set()

    thread = threading.Thread(target=watcher.run, args=(sink,), daemon=True)
    thread.start()
    time.sleep(0.5)
    sent: dict[str, float] = {}
    puts: list[float] = []
    head = leases_prefix(PREFIX)
    for n in range(events):
        lease = attrs(5000 + n).lease(ipaddress.ip_network(f"198.19.{n // 64}.{(n % 64) * 4}/30"), None)
        t0 = time.perf_counter()
        reg.put(head + lease.key, encode_value(lease))
        t1 = time.perf_counter()
        sent[lease.key] = t0
        puts.append(t1 - t0)
        time.sleep(0.002)
    done.wait(30)
    watcher.stop()
    thread.join(5)
    latencies = [arrived[k] - t for k, t in sent.items() if k in arrived]
    if len(latencies) != events:
        raise SystemExit(f"watch missed {events - len(latencies)} events")
    return latencies, puts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--events", type=int, default=500)
    args = parser.parse_args()

    with etcd_in_namespace("bench") as (server, _ctl_ns):
        reg = EtcdClient(EtcdOptions(endpoints=(server.endpoint,), prefix=PREFIX))
        reg.put(PREFIX + "/config", json.dumps(CONFIG).encode())
        acquire = bench_acquire(server.endpoint, args.nodes, args.workers)
        latencies, puts = bench_watch(reg, args.events)
        reg.close()

    result = {
        "bench": "leases",
        "nodes": args.nodes,
        "workers": args.workers,
        "acquire_total_s": round(acquire["total_s"], 3),
        "acquire_per_node_p50_ms": round(acquire["p50_ms"], 2),
        "acquire_per_node_p99_ms": round(acquire["p99_ms"], 2),
        "watch_events": args.events,
        "watch_latency_p50_ms": round(pct(latencies, 0.5) * 1e3, 3),
        "watch_latency_p99_ms": round(pct(latencies, 0.99) * 1e3, 3),
        "baseline_etcd_put_p50_ms": round(statistics.median(puts) * 1e3, 3),
    }
    rows = [
        ("acquire: 1000 nodes, total", f"{result['acquire_total_s']:.2f} s"),
        ("acquire: per node p50 / p99", f"{result['acquire_per_node_p50_ms']:.1f} / "
                                        f"{result['acquire_per_node_p99_ms']:.1f} ms"),
        ("watch: put -> event p50 / p99", f"{result['watch_latency_p50_ms']:.2f} / "
                                          f"{result['watch_latency_p99_ms']:.2f} ms"),
        ("baseline: bare etcd put p50", f"{result['baseline_etcd_put_p50_ms']:.2f} ms"),
    ]
    rows[0] = (f"acquire: {args.nodes} nodes ({args.workers} at a time), total", rows[0][1])
    report(rows, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
