"""Traffic between pods, and waiting for the kernel: the probes tests and benchmarks use."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

from flanneld.lab.cluster import Pod
from flanneld.lab.netns import sh


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


class Pinger:
    """Pings from a pod every `interval` seconds until stop(), which returns (sent, lost).

    Lost counts the sequence numbers with no reply up to the last one answered, so the probe
    still in flight when we stop is not counted as lost.
    """

    def __init__(self, src: Pod, dst: str, interval: float = 0.01) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", src.name, "ping", "-n", "-i", str(interval), "-W", "1",
                                      dst], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(0.3)

    def stop(self) -> tuple[int, int]:
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=15)
        answered = {int(m) for m in re.findall(r"icmp_seq=(\d+) ttl=", out)}
        assert answered, f"no ping was answered: {out[-500:]}"
        return max(answered), max(answered) - len(answered)


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
