"""Health endpoints: /healthz, /readyz, /metrics (prometheus-client's exposition) and systemd notification.

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


class HealthServer:
    """Serves the three endpoints (GET only, HTTP/1.0) from a background thread.

    A few lines on socketserver: three fixed routes need no web framework, and /metrics is
    rendered by prometheus-client itself.
    """

    def __init__(self, host: str, port: int, health: Callable[[], tuple[bool, str]],
                 readiness: Callable[[], tuple[bool, str]], metrics: Callable[[], str]) -> None:
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
            return 200, self.metrics(), "text/plain; version=0.0.4; charset=utf-8"
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
