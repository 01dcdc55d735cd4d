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
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

__all__ = ["CTL_IP", "OUTSIDE", "OUTSIDE_HOST_IP", "REMOTE_GW", "REMOTE_NET", "ROUTER_IP", "STATE_DIR", "UNDERLAY",
           "UNDERLAY6", "LabError", "cleanup", "cleanup_stale", "enter_namespace", "free_port", "ip", "ipbatch",
           "list_namespaces", "new_prefix", "sh", "tail", "tool"]

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


def enter_namespace(name: str) -> None:
    """Move the calling thread (call it before starting any thread) into namespace `name`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LabError(f"setns({name}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)


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
    return names


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


