"""Network namespaces and commands run in them: the lab's lowest layer.

Everything a lab creates is found again by its prefix: ``cleanup(prefix)`` kills processes
inside the namespaces and deletes them; ``cleanup_stale()`` does that for labs whose owning
process has died (a crashed test run). The root namespace is never modified.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

__all__ = ["CTL_IP", "OUTSIDE", "OUTSIDE_HOST_IP", "REMOTE_GW", "REMOTE_NET", "ROUTER_IP", "STATE_DIR", "UNDERLAY",
           "UNDERLAY6", "LabError", "cgroup_dirs", "cleanup", "cleanup_stale", "enter_namespace", "free_port",
           "in_host_network", "ip", "ipbatch", "list_namespaces", "new_prefix", "remove_cgroups", "sh", "tail", "tool"]

STATE_DIR = "/run/flanneld-lab"
UNDERLAY = "198.51.100"
UNDERLAY6 = "2001:db8:51"
OUTSIDE = "203.0.113"
CTL_IP = f"{UNDERLAY}.2"
REMOTE_NET, REMOTE_GW = f"{OUTSIDE}.64/26", f"{OUTSIDE}.65"  # a second L2 segment, routed
ROUTER_IP = f"{UNDERLAY}.1"
OUTSIDE_HOST_IP = f"{OUTSIDE}.10"
CLONE_NEWNET = 0x40000000


class LabError(RuntimeError):
    pass


def sh(args: Sequence[str], *, ns: str | None = None, check: bool = True, input: str | None = None,
       timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command (inside namespace `ns` if given); raise LabError with stderr on failure."""
    argv = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh(["ip", *args], ns=ns, check=check)


def ipbatch(commands: Sequence[str], ns: str | None = None) -> None:
    """Many `ip` commands in one process (ip -batch), for speed."""
    if commands:
        sh(["ip", "-force", "-batch", "-"], ns=ns, input="\n".join(commands) + "\n")


def new_prefix() -> str:
    return "fl" + secrets.token_hex(2)


_host_network: int | None = None  # the namespace this process started in (enter_namespace keeps it open)


def enter_namespace(name: str) -> None:
    """Move the calling thread (call it before starting any thread) into namespace `name`."""
    global _host_network
    if _host_network is None:
        _host_network = os.open("/proc/self/ns/net", os.O_RDONLY)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LabError(f"setns({name}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_host_network(argv: Sequence[str]) -> tuple[list[str], tuple[int, ...]]:
    """`argv` run in the network namespace this process started in (for downloads: Debian's
    archive, PyPI), and the file descriptor to pass it (subprocess's pass_fds)."""
    if _host_network is None:
        return list(argv), ()
    return ["nsenter", f"--net=/proc/self/fd/{_host_network}", "--", *argv], (_host_network,)


def list_namespaces() -> list[str]:
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def cleanup(prefix: str) -> list[str]:
    """Kill processes in, and delete, every namespace whose name starts with `prefix`."""
    names = [n for n in list_namespaces() if n.startswith(prefix)]
    for name in names:
        pids = ip("netns", "pids", name, check=False).stdout.split()
        for pid in pids:
            if pid == str(os.getpid()):
                continue  # the controlling process lives in its control namespace
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    for name in names:
        for _ in range(50):
            if ip("netns", "del", name, check=False).returncode == 0 or name not in list_namespaces():
                break
            time.sleep(0.05)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(STATE_DIR, prefix))
    _remove_dirs(f"{prefix}-")
    remove_cgroups(f"{prefix}-")
    return names


def _remove_dirs(start: str) -> None:
    """The labs' directories (logs, the machines tier's overlay layers): a Lab.dir is mkdtemp(prefix=...)."""
    tmp = tempfile.gettempdir()
    for entry in os.listdir(tmp):
        if entry.startswith(start) and os.path.isdir(os.path.join(tmp, entry)):
            shutil.rmtree(os.path.join(tmp, entry), ignore_errors=True)


def cgroup_dirs() -> list[str]:
    """This process's cgroup directories in the hierarchies systemd uses (the unified one, and
    systemd's named v1 one on a hybrid host): where a machine of the lab gets a cgroup of its own."""
    mounts: dict[str, str] = {}
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            sep = fields.index("-")
            fstype, options = fields[sep + 1], fields[sep + 3].split(",")
            if fstype == "cgroup2":
                mounts.setdefault("", fields[4])
            elif fstype == "cgroup" and "name=systemd" in options:
                mounts.setdefault("name=systemd", fields[4])
    dirs = []
    with open("/proc/self/cgroup") as fh:
        for line in fh:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers in mounts:
                dirs.append(mounts[controllers] + path.rstrip("/"))
    return dirs


def remove_cgroups(start: str) -> None:
    """Remove the cgroups (and what systemd made inside them) whose names begin with `start`; a
    cgroup that still holds a process stays."""
    for parent in cgroup_dirs():
        with contextlib.suppress(OSError):
            for entry in os.listdir(parent):
                top = os.path.join(parent, entry)
                if not entry.startswith(start) or not os.path.isdir(top):
                    continue
                for path, _dirs, _files in os.walk(top, topdown=False):
                    with contextlib.suppress(OSError):
                        os.rmdir(path)


def cleanup_stale() -> list[str]:
    """cleanup() every lab whose owning process is gone."""
    removed: list[str] = []
    if not os.path.isdir(STATE_DIR):
        return removed
    for prefix in os.listdir(STATE_DIR):
        try:
            with open(os.path.join(STATE_DIR, prefix)) as fh:
                owner = int(fh.read().strip() or 0)
        except (OSError, ValueError):
            owner = 0
        if owner and os.path.exists(f"/proc/{owner}"):
            continue
        removed += cleanup(prefix)
        _remove_dirs(prefix)  # its clusters' too (prefix + "c1-…")
        remove_cgroups(prefix)
    return removed



def tail(path: str, lines: int = 20) -> str:
    """The last `lines` lines of a log file ('' if there is none)."""
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return ""


def tool(name: str) -> str:
    """A console script of this installation (next to the running interpreter), else from PATH."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.exists(candidate) else name


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


