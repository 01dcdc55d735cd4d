"""Machines with systemd as PID 1, for the machines test tier (tests/machines).

flanneld is meant to be installed by an operator and run by systemd; this is that path for real,
minus the VM: a Debian 12 root file system built by mmdebstrap from Debian's archive (cached in
``CACHE_DIR`` and rebuilt when its package list changes), booted by ``systemd-nspawn --boot``
inside a network namespace of a lab (wired to the lab's underlay bridge, never the root
namespace), each machine with its own writable overlay layer on the one read-only image. The
overlay is mounted in a private mount namespace of the nspawn process, so it disappears with it.

A machine configures its own underlay address at boot (systemd-networkd, a ``.network`` file
written into its layer), so ``network-online.target`` means what it means on a real node. A
reboot powers the machine off, replaces its network namespace by a fresh one (the kernel state
of a real reboot is gone: devices, routes, firewall rules) and boots it again with its layer
kept; ``/run`` is a fresh tmpfs, as on a real boot.

Nothing here needs network inside a machine: the project is installed from a wheelhouse built on
the host (``wheelhouse()``), bound into the machine read-only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from flanneld.lab.cluster import Lab
from flanneld.lab.netns import (
    ROUTER_IP,
    UNDERLAY,
    LabError,
    cgroup_dirs,
    in_host_network,
    ip,
    ipbatch,
    remove_cgroups,
    sh,
    tail,
)

SUITE = "bookworm"
MIRRORS = ("deb http://deb.debian.org/debian bookworm main",
           "deb http://deb.debian.org/debian bookworm-updates main",
           "deb http://deb.debian.org/debian-security bookworm-security main")
# vagrant/provision.sh's packages, so that its offline check finds them all, and systemd itself
IMAGE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "iproute2", "iptables", "nftables", "etcd-server", "etcd-client",
                  "containernetworking-plugins", "wireguard-go", "wireguard-tools", "iputils-ping", "iperf3",
                  "tcpdump", "procps", "python3", "python3-venv", "python3-pip")
# the machine brings its underlay up itself at boot (systemd-networkd), and network-online.target
# waits for it (systemd-networkd-wait-online), as on a node whose unit is ordered after the network
IMAGE_HOOKS = ('chroot "$1" systemctl enable systemd-networkd.service systemd-networkd-wait-online.service',
               'echo "net.ipv4.ip_forward=1" > "$1/etc/sysctl.d/90-forwarding.conf"')
CACHE_DIR = os.environ.get("FLANNELD_LAB_CACHE", "/var/cache/flanneld-lab")
IMAGE_MARK = "etc/flanneld-lab-image"  # written last: an image without it is incomplete
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REQUIRED_TOOLS = {"mmdebstrap": "mmdebstrap", "systemd-nspawn": "systemd-container", "nsenter": "util-linux"}


def missing_tools() -> list[str]:
    """The Debian packages of the host tools the tier needs that are not installed."""
    return sorted({package for tool, package in REQUIRED_TOOLS.items() if shutil.which(tool) is None})


def image_key() -> str:
    recipe = json.dumps([SUITE, MIRRORS, IMAGE_PACKAGES, IMAGE_HOOKS])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def image(cache_dir: str = CACHE_DIR) -> tuple[str, float]:
    """The Debian 12 image's directory, built now if the cache lacks it; and the seconds the build took (0 when cached).

    Images of an older recipe are removed: the cache holds one."""
    missing = missing_tools()
    if missing:
        names = " ".join(missing)
        raise LabError(f"the machines tier needs {names} on the host: apt-get install {names}")
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"debian12-{image_key()}")
    with open(os.path.join(cache_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs never build into one directory
        if os.path.exists(os.path.join(path, IMAGE_MARK)):
            return path, 0.0
        for old in os.listdir(cache_dir):
            if old.startswith("debian12-"):
                shutil.rmtree(os.path.join(cache_dir, old), ignore_errors=True)
        building = path + ".building"
        start = time.monotonic()
        # the tests run in a namespace of their own with no way out: downloads go from the host's
        argv, fds = in_host_network([
            "mmdebstrap", "--quiet", "--variant=minbase", "--include=" + ",".join(IMAGE_PACKAGES),
            *[f"--customize-hook={hook}" for hook in IMAGE_HOOKS], SUITE, building, *MIRRORS])
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=1200, pass_fds=fds)
        if proc.returncode != 0:
            shutil.rmtree(building, ignore_errors=True)
            raise LabError(f"mmdebstrap failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        with open(os.path.join(building, IMAGE_MARK), "w") as fh:
            fh.write(image_key() + "\n")
        os.rename(building, path)
        return path, time.monotonic() - start


def wheelhouse(source: str, dest: str, version: str | None = None, deps_from: str | None = None) -> str:
    """The project built from the checkout `source` as a wheel in `dest`, with every dependency's wheel
    (built or fetched from PyPI on the host; machines have no network).

    `version` builds it as that version (an upgrade's newer build); `deps_from`, another wheelhouse,
    supplies the dependencies instead of pip (linked, not fetched again). The checkout is copied
    first: building leaves nothing in it."""
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flanneld-wheel-") as tmp:
        copy = os.path.join(tmp, "src")
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns(
            ".venv", ".git", "__pycache__", ".coverage-data", "build", "*.egg-info", ".pytest_cache", ".ruff_cache",
            ".hypothesis"), symlinks=True)
        if version is not None:
            init = os.path.join(copy, "flanneld", "__init__.py")
            with open(init) as fh:
                text = fh.read()
            lines = [f'__version__ = "{version}"' if line.startswith("__version__ = ") else line
                     for line in text.splitlines()]
            with open(init, "w") as fh:
                fh.write("\n".join(lines) + "\n")
        argv = [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", dest, copy]
        if deps_from is not None:
            argv.insert(-1, "--no-deps")
            for name in os.listdir(deps_from):
                if name.endswith(".whl") and not name.startswith("flanneld_py-"):
                    with contextlib.suppress(FileExistsError):
                        os.link(os.path.join(deps_from, name), os.path.join(dest, name))
        argv, fds = in_host_network(argv)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, pass_fds=fds)
        if proc.returncode != 0:
            raise LabError(f"pip wheel failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return dest


class Machine:
    """One booted Debian machine: systemd as PID 1, in network namespace `ns`, underlay address `ip`.

    `binds` are systemd-nspawn ``--bind``/``--bind-ro`` arguments (the checkout, the wheelhouse).
    """

    def __init__(self, lab: Lab, index: int, image_dir: str, binds: Sequence[str] = ()) -> None:
        self.lab = lab
        self.name = f"node{index}"
        self.index = index
        self.ns = f"{lab.prefix}-m{index}"
        self.ip = f"{UNDERLAY}.{10 + index}"
        self.image = image_dir
        self.binds = tuple(binds)
        self.dir = os.path.join(lab.dir, self.name)
        self.proc: subprocess.Popen[bytes] | None = None
        self.boots = 0
        self._pid1 = 0

    # -- power ------------------------------------------------------------------------------

    def _wire(self) -> None:
        """A fresh network namespace with eth0 on the lab's underlay bridge (no address: the machine
        sets it). eth0's MAC is the machine's own across reboots, as a NIC's is: the peers' ARP
        entries for it stay right."""
        self.lab.add_namespace(self.ns, forwarding=False)
        peer = f"{self.lab.prefix}-m{self.index}"
        mac = f"02:00:c6:33:64:{10 + self.index:02x}"  # locally administered; 198.51.100.x's x in the last byte
        ipbatch([f"link add eth0 address {mac} netns {self.ns} type veth peer name {peer}",
                 f"link set {peer} master br0 up"], ns=self.lab.ul)

    def _first_layer(self) -> None:
        upper = os.path.join(self.dir, "upper")
        network = os.path.join(upper, "etc/systemd/network")
        os.makedirs(network)
        os.makedirs(os.path.join(self.dir, "work"))
        os.makedirs(os.path.join(self.dir, "root"))
        with open(os.path.join(network, "10-underlay.network"), "w") as fh:
            fh.write(f"[Match]\nName=eth0\n\n[Network]\nAddress={self.ip}/24\nGateway={ROUTER_IP}\n"
                     "LinkLocalAddressing=no\nIPv6AcceptRA=no\n")
        with open(os.path.join(upper, "etc/hostname"), "w") as fh:
            fh.write(self.name + "\n")

    def boot(self, timeout: float = 90) -> None:
        """Power on (first boot: a new layer and namespace) and wait until systemd finished booting."""
        if self.boots == 0:
            self._first_layer()
            self._wire()
        d = self.dir
        # a cgroup of its own in each hierarchy: nspawn puts the machine's tree (payload/…) below the
        # cgroup it starts in, and two machines in one would share their units' cgroups (systemd in
        # one sees the other's processes: `systemctl kill` fails on them)
        cgroups = [os.path.join(parent, f"{self.lab.prefix}-{self.name}") for parent in cgroup_dirs()]
        for cgroup in cgroups:
            os.makedirs(cgroup, exist_ok=True)
        join = "".join(f"echo $$ > {cgroup}/cgroup.procs && " for cgroup in cgroups)
        mount = (f"{join}mount -t overlay flanneld-lab -o lowerdir={self.image},upperdir={d}/upper,workdir={d}/work "
                 f"{d}/root")
        nspawn = ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", f"--directory={d}/root",
                  f"--machine={self.lab.prefix}-{self.name}", f"--hostname={self.name}",
                  f"--network-namespace-path=/run/netns/{self.ns}", "--capability=CAP_NET_ADMIN,CAP_NET_RAW",
                  "--bind=/dev/net/tun", "--console=passive", *self.binds]
        log = open(os.path.join(d, "console.log"), "ab")  # noqa: SIM115 - owned by the child process
        env = {"PATH": PATH, "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"}  # the bridge plugin writes /proc/sys/net
        self.proc = subprocess.Popen(["unshare", "--mount", "--propagation=private", "sh", "-c",
                                      f'{mount} && exec "$@"', "sh", *nspawn], stdout=log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        log.close()
        self.boots += 1
        self._pid1 = 0
        deadline = time.monotonic() + timeout
        while not self._find_pid1():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"{self.name} did not start: {tail(os.path.join(d, 'console.log'))}")
            time.sleep(0.05)
        while True:  # "offline" until PID 1 answers; then --wait waits for the boot to finish
            left = deadline - time.monotonic()
            try:
                state = self.run("systemctl", "is-system-running", "--wait", check=False,
                                 timeout=max(left, 1)).stdout.strip()
            except subprocess.TimeoutExpired:
                state, left = "still starting", -1
            if state in ("running", "degraded"):
                return
            if left < 0 or state not in ("offline", ""):
                raise LabError(f"{self.name} did not finish booting: {state or 'no answer'}; {self._boot_state()}")
            time.sleep(0.1)

    def _boot_state(self) -> str:
        """What a boot that did not finish is waiting for and what failed: a CI log's only clue."""
        jobs = self.run("systemctl", "list-jobs", "--no-pager", "--no-legend", check=False, timeout=10).stdout
        failed = self.run("systemctl", "list-units", "--failed", "--no-pager", "--no-legend", "--plain",
                          check=False, timeout=10).stdout
        journal = self.run("journalctl", "-b", "--no-pager", "-n", "40", "-o", "short-monotonic",
                           check=False, timeout=10).stdout
        return f"jobs: {jobs.strip() or 'none'}; failed: {failed.strip() or 'none'}; journal:\n{journal}"

    def _find_pid1(self) -> bool:
        """The machine's PID 1: the process in its namespace that is PID 1 of its own PID namespace."""
        for pid in ip("netns", "pids", self.ns, check=False).stdout.split():
            try:
                with open(f"/proc/{pid}/status") as fh:
                    nspid = next(line for line in fh if line.startswith("NSpid:")).split()
            except (OSError, StopIteration):
                continue
            if len(nspid) > 2 and nspid[-1] == "1":
                self._pid1 = int(pid)
                return True
        return False

    def poweroff(self, timeout: float = 60) -> None:
        """systemd's clean power-off (SIGRTMIN+4 to PID 1): units stopped in order, as `systemctl poweroff`."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid1, signal.SIGRTMIN + 4)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise LabError(f"{self.name} did not power off within {timeout}s") from None
        self.proc = None
        remove_cgroups(f"{self.lab.prefix}-{self.name}")

    def kill(self) -> None:
        """Pull the plug: every process of the machine killed at once."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid1, signal.SIGKILL)  # ends its whole PID namespace
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        remove_cgroups(f"{self.lab.prefix}-{self.name}")

    def reboot(self, timeout: float = 90) -> None:
        """Power off, and boot again with the layer kept and the kernel's network state gone."""
        self.poweroff()
        # both ends now, not once the namespace is freed
        ip("link", "del", f"{self.lab.prefix}-m{self.index}", ns=self.lab.ul)
        ip("netns", "del", self.ns)
        self.lab.namespaces.remove(self.ns)
        self._wire()
        self.boot(timeout)

    # -- inside -----------------------------------------------------------------------------

    def command(self, *argv: str) -> list[str]:
        """`argv` as run inside the machine (every namespace of its PID 1, a clean environment)."""
        if not self._pid1:
            raise LabError(f"{self.name} is not running")
        return ["nsenter", f"--target={self._pid1}", "--all", "--", "env", "-i", f"PATH={PATH}", "LANG=C.UTF-8",
                *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 60, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        return sh(self.command(*argv), check=check, timeout=timeout, input=input)

    def systemctl(self, *args: str, check: bool = True) -> str:
        return self.run("systemctl", *args, check=check).stdout.strip()

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show` properties of a unit."""
        out = self.systemctl("show", unit, *[f"--property={p}" for p in props])
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str = "flanneld", *args: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, *args).stdout

    def read(self, path: str) -> str:
        return self.run("cat", path).stdout


def make_machines(lab: Lab, count: int, image_dir: str, binds: Sequence[str] = ()) -> list[Machine]:
    """`count` machines on the lab's underlay (built here; the lab must have no nodes), all booted."""
    lab.build_underlay(0)
    machines = [Machine(lab, i, image_dir, binds) for i in range(1, count + 1)]
    try:
        for machine in machines:
            machine.boot()
    except BaseException:
        for machine in machines:
            machine.kill()
        raise
    return machines


def close_machines(machines: Sequence[Machine]) -> None:
    """Pull every machine's plug (their processes and mounts go with them)."""
    for machine in machines:
        machine.kill()
