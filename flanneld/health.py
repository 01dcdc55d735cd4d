"""Observability: /healthz, /readyz, /metrics (Prometheus text) and systemd notification.

``/healthz`` tells the truth (upstream always answers 200): 503 with the reason while etcd or
the lease watch is down or the event loop is stuck. ``/readyz`` is 503 until subnet.env is
written and the firewall rules are in place. sd_notify speaks the NOTIFY_SOCKET datagram
protocol directly, no libsystemd needed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Metrics:
    """A minimal thread-safe registry of counters and gauges with labels."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._meta: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}

    def describe(self, name: str, kind: str, text: str) -> None:
        with self._lock:
            self._meta[name] = (kind, text)
            self._values.setdefault(name, {})

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values.setdefault(name, {})
            series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values.setdefault(name, {})[tuple(sorted(labels.items()))] = float(value)

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name in sorted(self._values):
                kind, text = self._meta.get(name, ("untyped", ""))
                if text:
                    lines.append(f"# HELP {name} {text}")
                lines.append(f"# TYPE {name} {kind}")
                for labels, value in sorted(self._values[name].items()):
                    label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                    shown = int(value) if value.is_integer() else value
                    lines.append(f"{name}{{{label_text}}} {shown}" if label_text else f"{name} {shown}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class HealthServer:
    """Serves the three endpoints (GET only, HTTP/1.0) from a background thread.

    Built on socketserver rather than http.server, which would drag in the email and
    http.client packages: a couple of MB of RSS for three fixed routes.
    """

    def __init__(self, host: str, port: int, health: Callable[[], tuple[bool, str]],
                 readiness: Callable[[], tuple[bool, str]], metrics: Metrics) -> None:
        self.health, self.readiness, self.metrics = health, readiness, metrics
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 5

            def handle(self) -> None:
                try:
                    request = self.rfile.readline(4096).decode("latin-1").split()
                    while self.rfile.readline(4096).strip():  # skip headers
                        pass
                except (OSError, UnicodeDecodeError):
                    return
                if len(request) < 2 or request[0] not in ("GET", "HEAD"):
                    self._reply(405, "only GET is supported\n")
                    return
                code, body, ctype = outer.route(request[1].split("?", 1)[0])
                self._reply(code, body, ctype, head=request[0] == "HEAD")

            def _reply(self, code: int, body: str, ctype: str = "text/plain; charset=utf-8",
                       head: bool = False) -> None:
                data = body.encode()
                reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}[code]
                header = (f"HTTP/1.0 {code} {reason}\r\nContent-Type: {ctype}\r\n"
                          f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
                with contextlib.suppress(OSError):
                    self.wfile.write(header.encode() + (b"" if head else data))

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self.server = Server((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="health", daemon=True)

    def route(self, path: str) -> tuple[int, str, str]:
        text = "text/plain; charset=utf-8"
        if path == "/healthz":
            ok, why = self.health()
            return (200, "flanneld is running\n", text) if ok else (503, f"unhealthy: {why}\n", text)
        if path == "/readyz":
            ok, why = self.readiness()
            return (200, "ready\n", text) if ok else (503, f"not ready: {why}\n", text)
        if path == "/metrics":
            return 200, self.metrics.render(), "text/plain; version=0.0.4"
        return 404, "not found: try /healthz, /readyz or /metrics\n", text

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def sd_notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd if it asked for notifications."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", state.split("=")[0], exc)
        return False
    return True
