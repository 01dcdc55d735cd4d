"""How to reach etcd: the connection flags flanneld and flannelctl share.

Kept apart from the registry so that parsing flags (and --help, --version) does not load gRPC.
"""

from __future__ import annotations

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
