"""etcd's failures, classified and put in words: every caller sees EtcdError with one line.

Which failures mean "try the next endpoint" (unreachable) or "log in again" (the token etcd
forgot) is decided here, once, for every call and the watch.
"""

from __future__ import annotations

import grpc
from pyetcd import exceptions as etcd_exc


class EtcdError(Exception):
    """An etcd operation failed; the message says which and why (never with secrets)."""


class Compacted(EtcdError):
    """The watch start revision is older than etcd's compaction horizon."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch revision compacted (etcd keeps history from revision {compact_revision})")
        self.compact_revision = compact_revision


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        name = code.name if code is not None else "ERROR"
        return f"{name}: {details}"
    if isinstance(exc, etcd_exc.NoServerAvailableError):
        return "no etcd endpoint available"
    if isinstance(exc, etcd_exc.Etcd3Exception):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def token_rejected(text: str) -> bool:
    """etcd's words for a token it no longer knows (expired, or etcd restarted and forgot it)."""
    return "auth token" in text


def is_auth_expired(exc: BaseException) -> bool:
    return (
        isinstance(exc, grpc.RpcError)
        and hasattr(exc, "code")
        and exc.code() == grpc.StatusCode.UNAUTHENTICATED
        and token_rejected(exc.details() or "")
    )


def is_unreachable(exc: BaseException) -> bool:
    """The endpoint did not answer (refused, reset, or no answer in time): another member may."""
    if isinstance(exc, etcd_exc.ConnectionFailedError | etcd_exc.ConnectionTimeoutError
                  | etcd_exc.NoServerAvailableError):
        return True
    return isinstance(exc, grpc.RpcError) and hasattr(exc, "code") and exc.code() in (
        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
