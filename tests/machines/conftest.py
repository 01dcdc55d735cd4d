"""The machines tier: Debian 12 machines booted with systemd as PID 1 (systemd-nspawn), each in a
network namespace on a lab underlay, provisioned by vagrant/provision.sh the way an operator
installs flanneld. Deselected from the README's command (marker ``machines``); run the whole tier
with ``.venv/bin/python -m pytest -m machines tests/machines`` (see the README for its run time).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from flanneld.lab.cluster import Lab
from flanneld.lab.machines import Machine, close_machines, image, make_machines, wheelhouse
from flanneld.lab.probes import Pinger

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VERSION_NEXT = "99.0.0"  # the upgrade's newer build
_labs = itertools.count(1)


@pytest.fixture(scope="session")
def machine_image() -> str:
    path, seconds = image()
    if seconds:
        print(f"\nbuilt the machines' Debian 12 image in {seconds:.0f}s: {path}")
    return path


@pytest.fixture(scope="session")
def wheelhouses(tmp_path_factory) -> str:
    """The wheelhouse directory bound into every machine at /wheelhouse: ``current`` (this checkout,
    with its dependencies) and, once asked for (``newer_wheelhouse``), ``newer`` (a newer version)."""
    root = tmp_path_factory.mktemp("wheelhouses")
    start = time.monotonic()
    wheelhouse(REPO, str(root / "current"))
    print(f"\nbuilt the wheelhouse in {time.monotonic() - start:.0f}s")
    return str(root)


@pytest.fixture(scope="session")
def newer_wheelhouse(wheelhouses: str) -> str:
    path = os.path.join(wheelhouses, "newer")
    wheelhouse(REPO, path, version=VERSION_NEXT, deps_from=os.path.join(wheelhouses, "current"))
    return "/wheelhouse/newer"


class Provisioned:
    """Machines node1…nodeN provisioned by vagrant/provision.sh: node1 also runs etcd (as in the Vagrantfile)."""

    def __init__(self, machines: list[Machine], shared: str) -> None:
        self.machines = machines
        self.shared = shared

    @property
    def etcd(self) -> str:
        return f"http://{self.machines[0].ip}:2379"

    def provision(self, machine: Machine, network: str = "/flanneld-src/vagrant/network.json") -> str:
        return machine.run("/flanneld-src/vagrant/provision.sh", machine.name, machine.ip, self.machines[0].ip,
                           "--wheelhouse", "/wheelhouse/current", "--network", network, timeout=300).stdout

    def pod_ip(self, machine: Machine) -> str:
        with open(os.path.join(self.shared, f"pod-ip-{machine.name}")) as fh:
            return fh.read().strip()

    def new_pod(self, machine: Machine) -> str:
        """vagrant/pod.sh run again (as after a reboot): the pod's new address."""
        address = machine.run("/flanneld-src/vagrant/pod.sh").stdout.strip()
        with open(os.path.join(self.shared, f"pod-ip-{machine.name}"), "w") as fh:
            fh.write(address + "\n")
        return address

    def pinger(self, machine: Machine, dst: str) -> Pinger:
        """Echo requests every 10 ms from the machine's pod to `dst` (the lab's prober, run in the machine)."""
        return Pinger(machine.command("ip", "netns", "exec", "pod", "python3",
                                      "/flanneld-src/flanneld/lab/icmp_probe.py"), dst)

    @staticmethod
    def daemon_journal(machine: Machine) -> str:
        """What the running flanneld process wrote to the journal."""
        pid = machine.show("flanneld", "MainPID")["MainPID"]
        return machine.run("journalctl", "--no-pager", "-o", "cat", f"_PID={pid}").stdout

    def subnet_env(self, machine: Machine) -> dict[str, str]:
        text = machine.read("/run/flannel/subnet.env")
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def ctl(self, machine: Machine, *args: str) -> str:
        return machine.run("/opt/flanneld/venv/bin/flannelctl", "--etcd-endpoints", self.etcd, *args).stdout

    def close(self) -> None:
        close_machines(self.machines)


@pytest.fixture(scope="module")
def provisioned(session_lab, machine_image, wheelhouses, tmp_path_factory):
    """A factory: `count` machines booted and provisioned with the network config `network` (a dict)."""
    made: list[tuple[Lab, Provisioned]] = []

    def make(count: int, network: dict) -> Provisioned:
        lab = Lab(prefix=f"{session_lab.prefix}m{next(_labs)}", ctl=session_lab.ctl)
        shared = tmp_path_factory.mktemp("vagrant-shared")
        (shared / "network.json").write_text(json.dumps(network))
        binds = [f"--bind-ro={REPO}:/flanneld-src", f"--bind-ro={wheelhouses}:/wheelhouse",
                 f"--bind={shared}:/vagrant-shared"]
        try:
            machines = make_machines(lab, count, machine_image, binds)
        except BaseException:
            lab.close()
            raise
        cluster = Provisioned(machines, str(shared))
        made.append((lab, cluster))
        cluster.provision(machines[0], "/vagrant-shared/network.json")  # etcd first
        with ThreadPoolExecutor(len(machines) - 1 or 1) as pool:
            list(pool.map(cluster.provision, machines[1:]))
        return cluster

    yield make
    for lab, cluster in made:
        cluster.close()
        lab.close()
