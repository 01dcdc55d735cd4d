"""The README's main command: the demo cluster comes up, passes its checks and cleans up."""

import re
import signal
import subprocess

from flanneld import lab


def test_demo_check_mode_passes_and_leaves_nothing_behind():
    before = set(lab.list_namespaces())
    result = subprocess.run([lab.tool("flanneld-demo"), "--check", "--nodes", "2"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "all checks passed" in result.stderr
    assert result.stderr.count(" ok (") == 3  # 2 pod pings + the masqueraded outside ping
    # each pod pair shows what ping measured (a round trip well under a millisecond here), not the
    # wall time of three probes 0.2 s apart
    rtts = [float(m) for m in re.findall(r" ok \((\d+\.\d+) ms round trip, 3/3 replies\)", result.stderr)]
    assert len(rtts) == 2 and all(rtt < 50 for rtt in rtts), result.stderr
    assert set(lab.list_namespaces()) == before


def test_sigterm_stops_a_waiting_demo_and_it_removes_its_namespaces():
    # the same ending as Ctrl-C: a SIGTERM used to kill the demo before its clean-up ran
    before = set(lab.list_namespaces())
    proc = subprocess.Popen([lab.tool("flanneld-demo"), "--nodes", "2"], stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        assert any("The cluster is up" in line for line in seen), "".join(seen)
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, rest
    assert "removed the demo namespaces" in rest
    assert set(lab.list_namespaces()) == before
