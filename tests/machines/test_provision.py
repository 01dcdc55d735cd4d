"""vagrant/provision.sh refuses bad ground with one line, exit status 1, and nothing installed:
run without root, where PID 1 is not systemd, with a Debian package missing, or with a wheelhouse
that lacks a dependency. On one booted, unprovisioned machine (its own image layer)."""

from __future__ import annotations

import os
import shutil

import pytest

from flanneld.lab.cluster import Lab
from flanneld.lab.machines import Machine, close_machines, make_machines
from tests.machines.conftest import REPO

pytestmark = pytest.mark.machines

PROVISION = "/flanneld-src/vagrant/provision.sh"


@pytest.fixture(scope="module")
def machine(session_lab, machine_image, wheelhouses):
    partial = os.path.join(wheelhouses, "partial")  # the current wheelhouse but for netaddr's wheel
    os.makedirs(partial, exist_ok=True)
    for name in os.listdir(os.path.join(wheelhouses, "current")):
        if not name.startswith("netaddr-") and not os.path.exists(os.path.join(partial, name)):
            os.link(os.path.join(wheelhouses, "current", name), os.path.join(partial, name))
    lab = Lab(prefix=f"{session_lab.prefix}p", ctl=session_lab.ctl)
    try:
        machines = make_machines(lab, 1, machine_image, [f"--bind-ro={REPO}:/flanneld-src",
                                                         f"--bind-ro={wheelhouses}:/wheelhouse"])
        yield machines[0]
        close_machines(machines)
    finally:
        lab.close()
        shutil.rmtree(partial, ignore_errors=True)


def provision(machine: Machine, *wrapper: str, wheelhouse: str = "/wheelhouse/current") -> tuple[int, str]:
    out = machine.run(*wrapper, PROVISION, "node1", machine.ip, machine.ip, "--wheelhouse", wheelhouse, check=False,
                      timeout=120)
    return out.returncode, out.stderr


def assert_nothing_installed(machine: Machine, etcd_defaults: str) -> None:
    for path in ("/opt/flanneld", "/etc/systemd/system/flanneld.service", "/etc/default/flanneld",
                 "/etc/cni/net.d/10-flannel.conflist", "/opt/cni/bin/flannel"):
        assert machine.run("test", "-e", path, check=False).returncode != 0, f"{path} was installed"
    assert machine.read("/etc/default/etcd") == etcd_defaults


@pytest.fixture
def etcd_defaults(machine) -> str:
    return machine.read("/etc/default/etcd")


def test_without_root(machine, etcd_defaults):
    status, err = provision(machine, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    assert status == 1
    assert err == "provision.sh: run as root (it installs packages, a systemd unit and the CNI plugin)\n"
    assert_nothing_installed(machine, etcd_defaults)


def test_where_pid_1_is_not_systemd(machine, etcd_defaults):
    status, err = provision(machine, "unshare", "--pid", "--fork", "--mount-proc")
    assert status == 1 and err == ("provision.sh: PID 1 is 'bash', not systemd: flanneld is installed as a "
                                   "systemd service\n")
    assert_nothing_installed(machine, etcd_defaults)


def test_with_a_wheelhouse_that_lacks_a_dependency(machine, etcd_defaults):
    status, err = provision(machine, wheelhouse="/wheelhouse/partial")
    assert status == 1 and err.count("\n") == 1, err
    assert err.startswith("provision.sh: the wheelhouse /wheelhouse/partial cannot install flanneld-py: "), err
    assert "netaddr" in err
    assert_nothing_installed(machine, etcd_defaults)


def test_with_a_debian_package_missing(machine, etcd_defaults):
    """Last: the package stays removed (the machine has no network to put it back)."""
    machine.run("dpkg", "--purge", "iperf3")
    status, err = provision(machine)
    assert status == 1 and err == ("provision.sh: Debian packages missing: iperf3 (--wheelhouse: no network, install "
                                   "them first)\n")
    assert_nothing_installed(machine, etcd_defaults)
