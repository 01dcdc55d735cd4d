#!/usr/bin/env python3
"""flannelctl benchmark: `subnets list` over N leases (each with its own etcd lease, as upstream nodes do).

Runs etcd inside a private network namespace (never the root one). Prints a table and one JSON
line. Baselines, measured in the same run: `etcdctl get --prefix` of the same keys (a bare listing
without TTLs), and the lease-TTL lookup through grpcio alone instead of the pipelined HTTP/2 path.
Budget (issue "flannelctl"): `subnets list` over 5000 leases in under 1 s.

Both HTTP/2 paths are measured in the same run: our own framing (flanneld.etcd.h2_unary) and the same
pipelined calls on python-hyper's h2 library (bench/h2_library.py), in process and end to end
(`subnets list` with the h2-library session swapped in).

    .venv/bin/python bench/ctl.py [--leases 5000] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import h2_library
from benchlib import etcd_in_namespace, report

from flanneld import lab
from flanneld.etcd import client as etcd_client
from flanneld.etcd import h2_unary
from flanneld.etcd.client import EtcdClient
from flanneld.etcd.options import EtcdOptions
from flanneld.model.lease import leases_prefix

PREFIX = "/coreos.com/network"
CONFIG = {"Network": "198.18.0.0/16", "SubnetLen": 30, "Backend": {"Type": "vxlan"}}
BUDGET_S = 1.0


def load(reg: EtcdClient, count: int) -> list[int]:
    head = leases_prefix(PREFIX)
    reg.put(PREFIX + "/config", json.dumps(CONFIG).encode())
    ids = []
    for n in range(count):
        lease_id = reg.grant(86400)
        value = (f'{{"PublicIP":"198.51.{100 + n // 250}.{n % 250 + 1}","PublicIPv6":null,"BackendType":"vxlan",'
                 f'"BackendData":{{"VNI":1,"VtepMAC":"0e:00:00:00:{n // 256:02x}:{n % 256:02x}"}}}}')
        reg.put(f"{head}198.18.{n // 64}.{(n % 64) * 4}-30", value.encode(), lease_id)
        ids.append(lease_id)
    return ids


def timed(argv: list[str], env: dict[str, str], runs: int, lines: int) -> float:
    """Median wall time of `argv`; checks it printed the expected number of lines."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv[:3])} failed: {proc.stderr[-1500:]}")
        samples.append(time.perf_counter() - start)
        if proc.stdout.count("\n") < lines:
            raise SystemExit(f"{argv[0]} printed {proc.stdout.count(chr(10))} lines, expected {lines}")
    return statistics.median(samples)


def ttl_lookup(reg: EtcdClient, ids: list[int], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        ttls = reg.time_to_live_many(ids)
        samples.append(time.perf_counter() - start)
        if len(ttls) != len(ids) or min(ttls.values()) <= 0:
            raise SystemExit("a lease TTL lookup came back incomplete")
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leases", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    with etcd_in_namespace("bench") as (server, _ctl_ns):
        reg = EtcdClient(EtcdOptions(endpoints=(server.endpoint,), prefix=PREFIX))
        ids = load(reg, args.leases)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "FLANNELCTL_ETCD_ENDPOINTS": server.endpoint,
               "FLANNELCTL_ETCD_PREFIX": PREFIX, "ETCDCTL_API": "3"}
        ctl = lab.tool("flannelctl")
        list_s = timed([ctl, "subnets", "list"], env, args.runs, args.leases)
        swapped = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('h2_library', "
                   "sys.argv.pop(1)); h2_library = importlib.util.module_from_spec(spec); "
                   "spec.loader.exec_module(h2_library); from flanneld.etcd import h2_unary; "
                   "h2_unary.call_many = h2_library.call_many_h2; from flanneld.ctl.cli import main; "
                   "sys.argv[0] = 'flannelctl'; main()")
        list_h2lib_s = timed([sys.executable, "-c", swapped, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              "h2_library.py"), "subnets", "list"], env, args.runs, args.leases)
        json_s = timed([ctl, "subnets", "list", "-o", "json"], env, args.runs, args.leases)
        etcdctl_s = timed(["etcdctl", f"--endpoints={server.endpoint}", "get", "--prefix", leases_prefix(PREFIX)],
                          env, args.runs, args.leases)
        if len(reg._pipelined_ttls(ids)) != len(ids):
            raise SystemExit("our pipelined lookup left calls unanswered")
        pipelined_s = ttl_lookup(reg, ids, args.runs)
        own_call_many = h2_unary.call_many
        h2_unary.call_many = h2_library.call_many_h2
        if len(reg._pipelined_ttls(ids)) != len(ids):
            raise SystemExit("the h2-library lookup left calls unanswered (the timing would be grpcio's)")
        pipelined_h2lib_s = ttl_lookup(reg, ids, args.runs)
        h2_unary.call_many = own_call_many
        etcd_client.PIPELINE_MIN_CALLS = len(ids) + 1  # the same lookup through grpcio alone
        grpcio_s = ttl_lookup(reg, ids, args.runs)
        reg.close()

    result = {
        "bench": "ctl",
        "leases": args.leases,
        "subnets_list_s": round(list_s, 3),
        "subnets_list_h2_library_s": round(list_h2lib_s, 3),
        "subnets_list_json_s": round(json_s, 3),
        "baseline_etcdctl_get_prefix_s": round(etcdctl_s, 3),
        "ttl_lookup_pipelined_s": round(pipelined_s, 3),
        "ttl_lookup_pipelined_h2_library_s": round(pipelined_h2lib_s, 3),
        "baseline_ttl_lookup_grpcio_s": round(grpcio_s, 3),
        "budget_s": BUDGET_S,
        "within_budget": list_s < BUDGET_S,
    }
    rows = [
        (f"flannelctl subnets list ({args.leases} leases, median of {args.runs})", f"{list_s:.3f} s"),
        ("flannelctl subnets list, TTLs via the h2 library", f"{list_h2lib_s:.3f} s"),
        ("flannelctl subnets list -o json", f"{json_s:.3f} s"),
        ("baseline: etcdctl get --prefix (no TTLs)", f"{etcdctl_s:.3f} s"),
        ("lease TTLs: pipelined HTTP/2, our framing (in process)", f"{pipelined_s:.3f} s"),
        ("lease TTLs: pipelined HTTP/2, h2 library (in process)", f"{pipelined_h2lib_s:.3f} s"),
        ("baseline: lease TTLs through grpcio alone", f"{grpcio_s:.3f} s"),
        ("budget: subnets list", f"< {BUDGET_S:.1f} s ({'met' if list_s < BUDGET_S else 'MISSED'})"),
    ]
    report(rows, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
