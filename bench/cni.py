#!/usr/bin/env python3
"""CNI plugin benchmark: ADD and DEL latency of our installed ``flannel`` wrapper against the
bare reference ``bridge`` plugin given the very delegate config flannel would build, same run.

Everything runs inside a private network namespace that plays the node (never the root one);
each pod gets its own namespace. Runs alternate (ours, bare, ours, ...) so drift in machine
load hits both equally. Prints a table and one JSON line. Budget: our ADD overhead over the bare
delegate <= the interpreter's bare start + 3 ms, both measured in the same run.

    .venv/bin/python bench/cni.py [--pods 50] [--ip-masq]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from flanneld import lab
from flanneld.cni import install, plugin

REFERENCE_PLUGINS = "/usr/lib/cni"
SUBNET_ENV = "FLANNEL_NETWORK=198.18.0.0/16\nFLANNEL_SUBNET=198.18.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ={}\n"
BUDGET_OVER_START_MS = 3.0  # our own work on top of starting the interpreter


def invoke(argv: list[str], command: str, conf: bytes, container: str, netns: str, cni_path: str) -> float:
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": command,
           "CNI_CONTAINERID": container, "CNI_NETNS": f"/run/netns/{netns}", "CNI_IFNAME": "eth0",
           "CNI_PATH": cni_path}
    start = time.perf_counter()
    proc = subprocess.run(argv, input=conf, capture_output=True, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{command} via {argv[0]} failed ({proc.returncode}): {proc.stdout.decode()} "
                         f"{proc.stderr.decode()}")
    return elapsed


def start_up_median(argv: list[str], runs: int = 30) -> float:
    """Median wall time of a call that does no network work (a plugin's VERSION, or `python -c pass`)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, input=b"{}", capture_output=True, env={"CNI_COMMAND": "VERSION"}, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=50)
    parser.add_argument("--ip-masq", action="store_true",
                        help="as if flanneld ran with --ip-masq (the bridge then masquerades nothing); "
                             "default: flanneld's default, the bridge masquerades (ipMasq: true)")
    args = parser.parse_args()

    bench_lab = lab.Lab()
    try:
        node = bench_lab.create_control()
        lab.enter_namespace(node)
        work = bench_lab.dir
        subnet_file = os.path.join(work, "subnet.env")
        with open(subnet_file, "w") as fh:
            fh.write(SUBNET_ENV.format(str(args.ip_masq).lower()))
        bin_dir = os.path.join(work, "bin")
        subprocess.run([lab.tool("flanneld"), "install-cni", "--bin-dir", bin_dir, "--conf-dir",
                        os.path.join(work, "net.d")], check=True, capture_output=True)
        wrapper = [os.path.join(bin_dir, "flannel")]
        bridge = [os.path.join(REFERENCE_PLUGINS, "bridge")]
        cni_path = f"{bin_dir}:{REFERENCE_PLUGINS}"
        conf = {"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
                "delegate": {"hairpinMode": True, "isDefaultGateway": True, "bridge": "cni0"},
                "subnetFile": subnet_file, "dataDir": os.path.join(work, "flannel"),
                "ipam": {"dataDir": os.path.join(work, "ipam")}}
        ours_conf = json.dumps(conf).encode()
        bare_conf = plugin.dumps(plugin.build_delegate(conf, plugin.read_subnet_env(subnet_file))).encode()

        timings: dict[tuple[str, str], list[float]] = {(w, c): [] for w in ("ours", "bare") for c in ("ADD", "DEL")}
        # one warm-up pair each, not counted: page cache, bridge creation
        for i in range(-1, args.pods):
            for who, argv, body in (("ours", wrapper, ours_conf), ("bare", bridge, bare_conf)):
                pod = bench_lab.add_namespace(f"{bench_lab.prefix}-p{who[0]}{i + 1}")
                cid = f"bench-{who}-{i + 1}"
                add = invoke(argv, "ADD", body, cid, pod, cni_path)
                delete = invoke(argv, "DEL", body, cid, pod, cni_path)
                lab.ip("netns", "del", pod)
                bench_lab.namespaces.remove(pod)
                if i >= 0:
                    timings[(who, "ADD")].append(add)
                    timings[(who, "DEL")].append(delete)
        floor_ours, floor_bare = start_up_median(wrapper), start_up_median(bridge)
        # what any per-pod Python plugin pays before its first line runs: the wrapper's interpreter, bare
        floor_python = start_up_median([install.interpreter(), "-I", "-S", "-c", "pass"])
        leftovers = os.listdir(os.path.join(work, "ipam", "cbr0"))
    finally:
        bench_lab.close()

    med = {k: statistics.median(v) * 1e3 for k, v in timings.items()}
    ratio = med[("ours", "ADD")] / med[("bare", "ADD")]
    result = {
        "bench": "cni", "pods": args.pods, "flanneld_ip_masq": args.ip_masq,
        "add_median_ms": round(med[("ours", "ADD")], 2), "del_median_ms": round(med[("ours", "DEL")], 2),
        "bare_bridge_add_median_ms": round(med[("bare", "ADD")], 2),
        "bare_bridge_del_median_ms": round(med[("bare", "DEL")], 2),
        "add_ratio": round(ratio, 3), "budget_overhead_over_start_ms": BUDGET_OVER_START_MS,
        "within_budget": med[("ours", "ADD")] - med[("bare", "ADD")] <= floor_python * 1e3 + BUDGET_OVER_START_MS,
        "version_ms": round(floor_ours * 1e3, 2), "bare_bridge_version_ms": round(floor_bare * 1e3, 2),
        "python_start_ms": round(floor_python * 1e3, 2),
        "add_overhead_ms": round(med[("ours", "ADD")] - med[("bare", "ADD")], 2),
        # the ratio a plugin doing no work at all in a per-pod interpreter would reach
        "add_ratio_floor": round((med[("bare", "ADD")] + floor_python * 1e3) / med[("bare", "ADD")], 3),
        "ipam_leftovers": len([f for f in leftovers if not f.startswith(("last_reserved_ip", "lock"))]),
    }
    rows = [
        ("ADD median", result["add_median_ms"], result["bare_bridge_add_median_ms"]),
        ("DEL median", result["del_median_ms"], result["bare_bridge_del_median_ms"]),
        ("VERSION (start-up floor)", result["version_ms"], result["bare_bridge_version_ms"]),
    ]
    print(f"{'measure':<26}{'flannel (ms)':>14}{'bare bridge (ms)':>18}{'ratio':>8}")
    for name, ours, bare in rows:
        print(f"{name:<26}{ours:>14.2f}{bare:>18.2f}{ours / bare:>8.2f}")
    print(f"ADD overhead {result['add_overhead_ms']:.2f} ms, of which the bare interpreter start "
          f"(python -I -S -c pass) is {result['python_start_ms']:.2f} ms: a per-pod Python plugin doing nothing "
          f"would reach {result['add_ratio_floor']:.2f}x")
    limit = result["python_start_ms"] + BUDGET_OVER_START_MS
    print(f"ADD budget: overhead <= interpreter start + {BUDGET_OVER_START_MS:g} ms ({limit:.2f} ms): "
          f"{'met' if result['within_budget'] else 'MISSED'}; "
          f"IPs left allocated: {result['ipam_leftovers']}")
    print(json.dumps(result))
    return 0 if result["within_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())
