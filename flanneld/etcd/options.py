"""How to reach etcd: the connection flags flanneld and flannelctl share.

Kept apart from the etcd client so that parsing flags (and --help, --version) does not load gRPC.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, field

DEFAULT_ENDPOINTS = ("http://127.0.0.1:4001", "http://127.0.0.1:2379")
DEFAULT_PREFIX = "/coreos.com/network"


@dataclass(frozen=True)
class EtcdOptions:
    """How to reach etcd: flanneld's and flannelctl's shared connection flags."""

    endpoints: tuple[str, ...] = DEFAULT_ENDPOINTS
    prefix: str = DEFAULT_PREFIX
    keyfile: str = ""
    certfile: str = ""
    cafile: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    timeout: float = 5.0

    def describe(self) -> str:
        """For logs: endpoints and security mode, never credentials."""
        tls = "mutual TLS" if self.certfile else ("TLS" if self.cafile else "plaintext")
        auth = f", user {self.username!r}" if self.username else ""
        return f"{','.join(self.endpoints)} ({tls}{auth}), prefix {self.prefix}"


class EndpointError(ValueError):
    """An etcd endpoint that is not an http(s)://host[:port] URL; the message says what is wrong."""


def parse_endpoint(url: str) -> tuple[str, int, bool]:
    """(host, port, is TLS) of one endpoint; EndpointError naming the problem.

    An endpoint is ``http://host[:port]`` or ``https://host[:port]`` (port 2379 by default), or
    ``host:port`` meaning http, as etcdctl takes it. Anything else is refused up front: "notaurl"
    would otherwise be dialled as a host name and retried forever.
    """
    text = url.strip()
    if "://" not in text and text.rpartition(":")[2].isdigit():
        text = "http://" + text  # etcdctl's scheme-less host:port
    parts = urllib.parse.urlsplit(text)
    shown = url if parts.password is None else text.replace(f":{parts.password}@", ":***@", 1)  # no secrets
    try:
        port = parts.port
    except ValueError:
        raise EndpointError(f"invalid etcd endpoint {shown!r}: the port must be a number in 1..65535") from None
    problem = ""
    if "://" not in text:
        problem = "not a URL (expected http://host:port or https://host:port)"
    elif parts.scheme not in ("http", "https"):
        problem = f"unsupported scheme {parts.scheme!r} (expected http or https)"
    elif not parts.hostname:
        problem = "no host"
    elif port == 0:
        problem = "the port must be a number in 1..65535"
    elif parts.username is not None or parts.path not in ("", "/") or parts.query or parts.fragment:
        problem = "expected only scheme://host:port (credentials go in --etcd-username/--etcd-password)"
    if problem:
        raise EndpointError(f"invalid etcd endpoint {shown!r}: {problem}")
    assert parts.hostname is not None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return host, port or 2379, parts.scheme == "https"


def quiet_grpc(verbose: bool = False) -> None:
    """Keep gRPC's C-core log lines ("Handshake failed ...") off stderr unless asked for.

    Our own messages already name the reason in one line. C-core reads GRPC_VERBOSITY once, when
    grpc is first imported, so call this at process start; an operator's own setting wins.
    """
    if not verbose:
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
