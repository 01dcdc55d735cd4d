"""The README's main command: the demo cluster comes up, passes its checks and cleans up."""

import subprocess

from flanneld import lab


def test_demo_check_mode_passes_and_leaves_nothing_behind():
    before = set(lab.list_namespaces())
    result = subprocess.run([lab._tool("flanneld-demo"), "--check", "--nodes", "2"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "all checks passed" in result.stderr
    assert result.stderr.count(" ok (") == 3  # 2 pod pings + the masqueraded outside ping
    assert set(lab.list_namespaces()) == before
