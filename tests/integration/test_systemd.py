"""The shipped unit: installable, verified by systemd, and the daemon works with only its two capabilities."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from flanneld import lab
from flanneld.lab.flannel import NETWORK
from flanneld.lab.probes import eventually
from flanneld.lab.readers import routes


def test_install_unit_writes_a_unit_systemd_accepts(tmp_path):
    unit_dir, defaults = tmp_path / "system", tmp_path / "default-flanneld"
    unit_dir.mkdir()
    argv = [lab.tool("flanneld"), "install-unit", f"--unit-dir={unit_dir}", f"--defaults={defaults}"]
    subprocess.run(argv, check=True, capture_output=True, text=True)
    unit = (unit_dir / "flanneld.service").read_text()
    assert f"ExecStart={lab.tool('flanneld')}\n" in unit and "Type=notify" in unit
    assert "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW\n" in unit and "ProtectSystem=strict" in unit
    assert "#FLANNELD_ETCD_ENDPOINTS=" in defaults.read_text()
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: .ci/setup installs systemd")
    verify = subprocess.run(["systemd-analyze", "verify", str(unit_dir / "flanneld.service")], capture_output=True,
                            text=True)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    # an operator's edit is kept unless --force; the defaults file is never overwritten
    (unit_dir / "flanneld.service").write_text(unit.replace("RestartSec=5", "RestartSec=9"))
    defaults.write_text("FLANNELD_IFACE=eth1\n")
    refused = subprocess.run(argv, capture_output=True, text=True)
    assert refused.returncode == 1 and "exists and differs" in refused.stderr
    subprocess.run([*argv, "--force"], check=True, capture_output=True)
    assert (unit_dir / "flanneld.service").read_text() == unit and defaults.read_text() == "FLANNELD_IFACE=eth1\n"


def test_the_daemon_needs_only_net_admin_and_net_raw(make_cluster):
    """What the unit's CapabilityBoundingSet allows: the whole start-up, masquerading and peers."""
    cluster = make_cluster(2, NETWORK)
    node1, node2 = cluster.nodes
    argv = ["setpriv", "--bounding-set=-all,+net_admin,+net_raw", "--", lab.tool("flanneld"),
            f"--etcd-endpoints={cluster.endpoint}", f"--etcd-prefix={cluster.prefix}",
            f"--subnet-file={node1.subnet_file}", "--healthz-port=8471", "--ip-masq", "--iptables-resync=1"]
    node1.popen(argv, "flanneld")
    node1.wait_ready()
    status = node1.sh("sh", "-c", f"grep CapBnd /proc/{node1.procs[-1].pid}/status").stdout
    assert int(status.split()[1], 16) == (1 << 12) | (1 << 13)  # CAP_NET_ADMIN | CAP_NET_RAW
    cluster.start(node2)
    eventually(lambda: cluster.subnet(node2) in routes(node1), timeout=3, what="peer programmed")
    assert "FLANNEL-POSTRTG" in node1.sh("iptables-save", "-t", "nat").stdout
    assert "Traceback" not in node1.log() and not [line for line in node1.log().splitlines() if " E " in line]
