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
        super().__init__("watch revision compacted" + (f" (etcd keeps history from revision {compact_revision})"
                                                        if compact_revision > 0 else ""))
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


# etcd's words, in every version we meet, for a token it will not take any more; Go's client
# logs in again on each (clientv3 shouldRefreshToken). "revision of auth store is old": a JWT
# (etcd's recommended token type) issued before any change to users or roles, which every
# unary call and watch is then refused with; simple tokens never say it.
_STALE_TOKEN_WORDS = ("auth token", "revision of auth store is old", "user name is empty")


def token_rejected(text: str, *, watch: bool = False) -> bool:
    """etcd refused our token: it expired, etcd restarted and forgot it, or users or roles changed
    since it was issued. A watch's cancel reason is also "permission denied" for a stale token on
    servers before 3.4.22 / 3.5.6; one fresh login then tells a stale token from a real denial."""
    return any(words in text for words in _STALE_TOKEN_WORDS) or (watch and "permission denied" in text)


def is_auth_expired(exc: BaseException) -> bool:
    return (
        isinstance(exc, grpc.RpcError)
        and hasattr(exc, "code")
        and exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT)
        and token_rejected(exc.details() or "")
    )


def is_unreachable(exc: BaseException) -> bool:
    """The endpoint did not answer (refused, reset, or no answer in time): another member may."""
    if isinstance(exc, etcd_exc.ConnectionFailedError | etcd_exc.ConnectionTimeoutError
                  | etcd_exc.NoServerAvailableError):
        return True
    return isinstance(exc, grpc.RpcError) and hasattr(exc, "code") and exc.code() in (
        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
