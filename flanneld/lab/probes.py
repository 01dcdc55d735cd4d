"""Traffic between pods, and waiting for the kernel: the probes tests and benchmarks use."""

from __future__ import annotations

import bisect
import json
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from flanneld.lab.cluster import Pod
from flanneld.lab.netns import sh, tool


def eventually(check: Callable[[], Any], timeout: float = 1.0, interval: float = 0.01, what: str = "") -> float:
    """Poll until check() is truthy; return the seconds it took (AssertionError after timeout)."""
    start = time.monotonic()
    while True:
        result = check()
        elapsed = time.monotonic() - start
        if result:
            return elapsed
        if elapsed > timeout:
            raise AssertionError(f"not within {timeout}s: {what or check}")
        time.sleep(interval)


class Tally(NamedTuple):
    """Every probe a Pinger sent: how many, how many never answered, and when each was sent
    (time.monotonic()), so a test can tell that probing ran through a fault, not just around it."""

    sent: int
    lost: int
    sent_at: tuple[float, ...]
    lost_at: tuple[float, ...]
    duplicates: int = 0

    def merged(self, other: Tally) -> Tally:
        """Both directions' probes as one tally."""
        return Tally(self.sent + other.sent, self.lost + other.lost, tuple(sorted(self.sent_at + other.sent_at)),
                     tuple(sorted(self.lost_at + other.lost_at)), self.duplicates + other.duplicates)

    def sent_between(self, start: float, end: float) -> int:
        return bisect.bisect_right(self.sent_at, end) - bisect.bisect_left(self.sent_at, start)

    def assert_through(self, start: float, end: float, interval: float = 0.01) -> None:
        """No probe lost, and probes went out before `start`, after `end` and all along between
        (at least half the rate: a stalled prober proves nothing)."""
        assert self.sent and self.sent_at[0] < start, f"probing began only after the window opened ({self.sent} sent)"
        assert self.sent_at[-1] > end, f"probing stopped {end - self.sent_at[-1]:.2f}s before the window closed"
        within = self.sent_between(start, end)
        assert within >= (end - start) / interval / 2, \
            f"only {within} probes in the {end - start:.1f}s window (one per {interval}s wanted)"
        if self.lost:
            spans = ", ".join(f"{t - start:+.2f}s" for t in self.lost_at[:10])
            raise AssertionError(f"{self.lost} of {self.sent} probes lost, sent at (from the window's start) {spans}")


class Pinger:
    """Echo requests from a pod every `interval` seconds until stop(), which returns the Tally:
    every probe sent is counted, a tail still unanswered when stopping included (after `grace`
    seconds for replies in flight). See :mod:`flanneld.lab.icmp_probe`.

    `src` is a pod of a namespace cluster, or the command that runs the prober inside a pod
    elsewhere (a machine's: ``[..., "python3", ".../icmp_probe.py"]``)."""

    def __init__(self, src: Pod | Sequence[str], dst: str, interval: float = 0.01, grace: float = 1.0) -> None:
        if isinstance(src, Pod):
            self.what = f"{src.name} -> {dst}"
            prober = ["ip", "netns", "exec", src.name, tool("python3"), "-m", "flanneld.lab.icmp_probe"]
        else:
            self.what, prober = f"{' '.join(src)} -> {dst}", list(src)
        self.proc = subprocess.Popen([*prober, dst, str(interval), str(grace)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        started = self.proc.stdout.readline()
        if started.strip() != "probing":
            self.proc.kill()
            raise AssertionError(f"the prober {self.what} did not start: {started}{self.proc.communicate()[1]}")

    def stop(self) -> Tally:
        out, err = self.proc.communicate(timeout=30)  # closes its stdin: the prober's signal to stop
        if self.proc.returncode != 0:
            raise AssertionError(f"the prober {self.what} failed ({self.proc.returncode}): {err[-2000:]}")
        result = json.loads(out.splitlines()[-1])
        sent_at = tuple(result["sent_at"])
        return Tally(len(sent_at), len(result["lost"]), sent_at, tuple(sent_at[i] for i in result["lost"]),
                     result["duplicates"])


class BothWays:
    """A Pinger from each pod to the other: a fault may break one direction's path only."""

    def __init__(self, a: Pod, b: Pod, interval: float = 0.01) -> None:
        self.pingers = (Pinger(a, b.addr, interval), Pinger(b, a.addr, interval))

    def stop(self) -> Tally:
        first, second = (p.stop() for p in self.pingers)
        return first.merged(second)


def ping(src: Pod, dst: str, count: int = 2, interval: float = 0.2, timeout: int = 2
         ) -> subprocess.CompletedProcess[str]:
    return sh(["ping", "-c", str(count), "-i", str(interval), "-W", str(timeout), dst], ns=src.name, check=False,
                  timeout=count * interval + timeout + 10)


def tcp_exchange(client: Pod, server: Pod, port: int = 5201, ipv6: bool = False) -> str:
    """Open a TCP connection from client to server (over IPv6 if asked) and echo a message back."""
    addr = server.ip6.split("/")[0] if ipv6 and server.ip6 else server.addr
    family = "socket.AF_INET6" if ":" in addr else "socket.AF_INET"
    srv = subprocess.Popen(
        ["ip", "netns", "exec", server.name, "python3", "-c",
         f"import socket;s=socket.socket({family});s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
         f"s.bind(('{addr}',{port}));s.listen(1);c,_=s.accept();c.sendall(c.recv(100)[::-1]);c.close()"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            out = sh(["python3", "-c",
                          "import socket,sys;s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=2);"
                          "s.sendall(b'flannel over tcp');print(s.recv(100).decode())", addr, str(port)],
                         ns=client.name, check=False)
            if out.returncode == 0:
                return out.stdout.strip()
            time.sleep(0.05)
        raise AssertionError(f"TCP to {addr}:{port} failed: {out.stderr}")
    finally:
        srv.kill()
        srv.wait()
