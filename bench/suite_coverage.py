"""Coverage of the whole test suite, every Python process it starts included.

Runs the README's test command (``python -m pytest``, extra arguments passed on) under coverage
as pyproject's ``[tool.coverage.run]`` sets it up: branch coverage, one data file per process,
subprocesses patched (the daemons started through ``ip netns exec``, flannelctl, the demo), data
saved on SIGTERM. Then combines them and prints a table per subpackage, the total, and one JSON
line. The CNI plugin runs isolated (``python -I -S``, no site hook): its lines count from the unit
tests that import it. The lab (test harness) is left out. Exit status: pytest's.

    python bench/suite_coverage.py -q            # what CI runs
    python bench/suite_coverage.py -q tests/unit # the unit tier alone
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def package_of(path: str) -> str:
    """flanneld/node/daemon.py -> flanneld.node; flanneld/flags.py -> flanneld."""
    parts = os.path.relpath(path, ROOT).split(os.sep)
    if parts[0] == "backends":
        return "backends"
    if parts[0] == "cni":
        return "cni"
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0]


def main(args: list[str]) -> int:
    import coverage

    os.chdir(ROOT)
    shutil.rmtree(".coverage-data", ignore_errors=True)
    os.makedirs(".coverage-data")
    status = subprocess.call([sys.executable, "-m", "coverage", "run", "-m", "pytest", *args])
    cov = coverage.Coverage()
    cov.combine()
    cov.save()
    report = os.path.join(".coverage-data", "report.json")
    cov.json_report(outfile=report)
    with open(report) as fh:
        files = json.load(fh)["files"]
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # package -> [covered, total] (lines + branches)
    for path, data in files.items():
        summary = data["summary"]
        totals[package_of(path)][0] += summary["covered_lines"] + summary.get("covered_branches", 0)
        totals[package_of(path)][1] += summary["num_statements"] + summary.get("num_branches", 0)
    rows = {pkg: round(100 * c / t, 1) if t else 100.0 for pkg, (c, t) in sorted(totals.items())}
    covered = sum(c for c, _ in totals.values())
    total = sum(t for _, t in totals.values())
    print(f"\n{'package':<22} {'covered':>8}")
    for pkg, pct in rows.items():
        print(f"{pkg:<22} {pct:>7.1f}%")
    overall = round(100 * covered / total, 1) if total else 0.0
    print(f"{'TOTAL':<22} {overall:>7.1f}%  (statements and branches, {len(files)} files)")
    print(json.dumps({"bench": "coverage", "total_percent": overall, "packages": rows, "pytest_status": status}))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
