"""flanneld's command line as a unit or env file written for upstream gives it."""

from __future__ import annotations

import os
import subprocess
import sys

FLANNELD = [sys.executable, "-c", "from flanneld.node.cli import main; main()"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLANNELD, *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def test_the_kubernetes_subnet_manager_is_refused_in_one_line() -> None:
    for spelling in (["--kube-subnet-mgr"], ["-kube-subnet-mgr=true"]):
        proc = run(*spelling, "--etcd-endpoints=http://127.0.0.1:1")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("flanneld: error: --kube-subnet-mgr: this build keeps leases in etcd only")


def test_a_subnet_file_that_cannot_be_written_fails_before_any_upstream_only_flag_is_noted(tmp_path) -> None:
    """klog's and the kube flags at their off values are accepted (upstream's units carry them);
    each klog flag is noted once; FLANNELD_V sets -v. The start then fails on the node's own account."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run("-logtostderr", "-alsologtostderr=false", "-vmodule=main=3", "-log_dir", "/tmp", "-stderrthreshold=2",
               "-log_backtrace_at=main.go:1", "--kube-subnet-mgr=false", "--kube-api-url=", "--kubeconfig-file=",
               f"--subnet-file={blocker}/sub/subnet.env", "--etcd-endpoints=http://127.0.0.1:1",
               env={"FLANNELD_V": "2", "FLANNELD_NET_CONFIG_PATH": "/etc/kube-flannel/net-conf.json"})
    assert proc.returncode == 1, proc.stderr
    for name in ("logtostderr", "alsologtostderr", "vmodule", "log_dir", "stderrthreshold", "log_backtrace_at"):
        assert proc.stderr.count(f"-{name} is klog's flag") == 1, proc.stderr
    assert "--net-config-path has no effect" in proc.stderr and "--kube-api-url" not in proc.stderr
    assert "cannot write the subnet file" in proc.stderr and "Traceback" not in proc.stderr
    assert "D flanneld: log verbosity 2 (-v, FLANNELD_V)" in proc.stderr
