"""The single-instance locks: a second holder is refused naming the first's PID; a dead holder
(kill -9) leaves nothing behind that blocks the next."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest

from flanneld.node.instance import AlreadyRunning, InstanceLock

HOLD = """
import sys, time
from flanneld.node.instance import InstanceLock
lock = InstanceLock()
lock.subnet_file(sys.argv[1])
lock.node(sys.argv[2], "198.51.100.11")
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    path, prefix = str(tmp_path / "run" / "subnet.env"), f"/test/{uuid.uuid4().hex}"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, path, prefix], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc, path, prefix
    proc.kill()
    proc.wait()


def test_a_second_holder_is_refused_naming_the_first(holder) -> None:
    proc, path, prefix = holder
    with pytest.raises(AlreadyRunning, match=rf"another flanneld \(PID {proc.pid}\) runs for the subnet file {path}"):
        InstanceLock().subnet_file(path)
    with pytest.raises(AlreadyRunning, match=rf"another flanneld \(PID {proc.pid}\) runs as this node "
                                             rf"\(198.51.100.11\) on the network at {prefix}"):
        InstanceLock().node(prefix, "198.51.100.11")
    InstanceLock().node(prefix, "198.51.100.12")  # another node (address) on that network: fine
    InstanceLock().node(prefix + "-other", "198.51.100.11")  # this node on another network: fine


def test_the_locks_die_with_a_killed_holder(holder) -> None:
    proc, path, prefix = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(path + ".lock")  # the file stays; the lock on it does not
    lock = InstanceLock()
    lock.subnet_file(path)
    lock.node(prefix, "198.51.100.11")
    with open(path + ".lock") as fh:
        assert fh.read().strip() == str(os.getpid())
