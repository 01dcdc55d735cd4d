"""Health endpoints: /healthz, /readyz, /metrics (prometheus-client's exposition), /probes (the
overlay prober's per-peer table, JSON) and systemd notification.

``/healthz`` is liveness, as upstream's: 503 only when the daemon is stuck (its event loop has
not run), never for an etcd outage: a liveness probe restarting every node when etcd goes away
cannot fix etcd, and restarts them all at once when it returns. ``/readyz`` is readiness: 503
until subnet.env is written and the rules are in place, and while the lease watch is down
(peers' changes do not reach us). Both give their reasons; ``?verbose`` lists every check with
its state, in the Kubernetes ``/livez`` ``/readyz`` form. sd_notify speaks the NOTIFY_SOCKET
datagram protocol directly, no libsystemd needed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
from collections.abc import Callable
from typing import NamedTuple

from flanneld.node.threads import named_thread

log = logging.getLogger(__name__)


class Check(NamedTuple):
    """One named check of /healthz or /readyz: its state and why (shown with ?verbose)."""

    name: str
    ok: bool
    detail: str = ""


class HealthServer:
    """Serves the three endpoints (GET only, HTTP/1.0) from a background thread.

    A few lines on socketserver: three fixed routes need no web framework, and /metrics is
    rendered by prometheus-client itself.
    """

    def __init__(self, host: str, port: int, health: Callable[[], list[Check]],
                 readiness: Callable[[], list[Check]], metrics: Callable[[], str],
                 probes: Callable[[], list[dict[str, object]] | None] = lambda: None) -> None:
        self.health, self.readiness, self.metrics, self.probes = health, readiness, metrics, probes
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
                path, _, query = request[1].partition("?")
                code, body, ctype = outer.route(path, verbose="verbose" in query.split("&"))
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
        self.thread = named_thread(self.server.serve_forever, "health")

    def route(self, path: str, verbose: bool = False) -> tuple[int, str, str]:
        text = "text/plain; charset=utf-8"
        for endpoint, checks, good, bad in (("/healthz", self.health, "flanneld is running", "unhealthy"),
                                            ("/readyz", self.readiness, "ready", "not ready")):
            if path == endpoint:
                results = checks()
                failed = [c for c in results if not c.ok]
                if verbose:
                    lines = [f"[+]{c.name} ok{f' ({c.detail})' if c.detail else ''}" if c.ok else
                             f"[-]{c.name} failed: {c.detail}" for c in results]
                    name = endpoint[1:]
                    lines.append(f"{name} check failed" if failed else f"{name} check passed")
                    return (503 if failed else 200), "\n".join(lines) + "\n", text
                if failed:
                    return 503, f"{bad}: {'; '.join(c.detail for c in failed)}\n", text
                return 200, f"{good}\n", text
        if path == "/metrics":
            return 200, self.metrics(), "text/plain; version=0.0.4; charset=utf-8"
        if path == "/probes":
            table = self.probes()
            if table is None:
                return 503, "the prober is not running (--probe-interval=0, or not ready yet)\n", text
            return 200, json.dumps({"peers": table}) + "\n", "application/json"
        return 404, "not found: try /healthz, /readyz, /metrics or /probes\n", text

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
