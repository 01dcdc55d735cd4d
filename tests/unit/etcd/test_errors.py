"""Which of etcd's answers mean "log in again": every version's words for a token it will not take."""

from __future__ import annotations

import grpc
import pytest

from flanneld.etcd.errors import is_auth_expired, token_rejected


class RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(("code", "details"), [
    (grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token"),  # forgotten (restart) or expired
    (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: revision of auth store is old"),  # a JWT from before a change
    (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: user name is empty"),  # a token cleared server-side
])
def test_a_token_etcd_will_not_take_means_log_in_again(code, details) -> None:
    assert is_auth_expired(RpcError(code, details))


@pytest.mark.parametrize(("code", "details"), [
    (grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied"),  # a real denial: no loop of logins
    (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: authentication failed, invalid user ID or password"),
    (grpc.StatusCode.UNAVAILABLE, "etcdserver: request timed out"),
])
def test_other_refusals_are_not_taken_for_a_stale_token(code, details) -> None:
    assert not is_auth_expired(RpcError(code, details))


def test_a_watch_denied_permission_logs_in_once_more_as_older_servers_word_a_stale_token_so() -> None:
    reason = "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
    assert token_rejected(reason, watch=True) and not token_rejected(reason)
    assert token_rejected("rpc error: code = InvalidArgument desc = etcdserver: revision of auth store is old")
