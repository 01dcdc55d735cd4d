"""One flanneld per subnet file and per node identity: a second one refuses to start.

Two daemons owning one kernel state and one etcd key fight without end (upstream lets a second
daemon start and replace the key's etcd lease). Two locks, each held for the process's life and
released by the kernel however it ends (kill -9 included), so nothing stale ever blocks a start:

- the subnet file: ``flock`` on ``<subnet file>.lock`` (the file system is what two daemons
  writing one file share); the holder's PID is written in it for the refusal to name;
- the node identity (etcd prefix and public address): an abstract Unix socket named after it,
  bound and listening. Abstract names belong to the network namespace, as a node's addresses do;
  the refusal connects and asks the kernel for the holder's PID (SO_PEERCRED).

Two daemons for different networks (another --subnet-file and --etcd-prefix, as upstream's
running.md describes) take different locks and both run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct


class InstanceError(Exception):
    """The lock cannot be taken; the message says why (one line)."""


class AlreadyRunning(InstanceError):
    """Another flanneld holds the lock; the message names it and what to do."""


class InstanceLock:
    """The locks this process holds; kept referenced for the process's life."""

    def __init__(self) -> None:
        self._held: list[object] = []

    def subnet_file(self, path: str) -> None:
        lock_path = path + ".lock"
        try:
            os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise InstanceError(f"cannot lock {lock_path} (--subnet-file): {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(f"another flanneld (PID {holder}) runs for the subnet file {path}: stop it first "
                                 "(systemctl stop flanneld), or give this one its own --subnet-file and "
                                 "--etcd-prefix") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._held.append(fd)

    def node(self, prefix: str, addresses: str) -> None:
        name = f"\0flanneld node {prefix} {addresses}"[:108].encode()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(name)
        except OSError:
            sock.close()
            raise AlreadyRunning(f"another flanneld (PID {_holder(name)}) runs as this node ({addresses}) on the "
                                 f"network at {prefix}: two would fight over one lease; stop it first") from None
        sock.listen(1)
        self._held.append(sock)


def running_for(path: str) -> str | None:
    """The PID of the flanneld holding the subnet file's lock (None when none does); creates
    nothing, for a look that must change nothing (``cleanup --dry-run``)."""
    try:
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)  # our lock, if we took it, goes with the descriptor
    return None


def _holder(name: bytes) -> str:
    """The PID of the process listening on an abstract socket (what the kernel says it is)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        probe.connect(name)
        pid, _uid, _gid = struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return str(pid)
    return "unknown"
