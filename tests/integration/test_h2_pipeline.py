"""The pipelined HTTP/2 unary client against real etcd servers, and its failure modes."""

from __future__ import annotations

import socket
import threading

import pytest
from pyetcd import etcdrpc

from flanneld import lab
from flanneld.etcd import h2_unary
from flanneld.etcd.client import EtcdClient
from flanneld.etcd.options import EtcdOptions

TTL_METHOD = "/etcdserverpb.Lease/LeaseTimeToLive"


def _target(server: lab.EtcdServer) -> h2_unary.Target:
    host, port = server.endpoint.removeprefix("http://").rsplit(":", 1)
    return h2_unary.Target(host, int(port))


def _ttl_requests(ids):
    return [etcdrpc.LeaseTimeToLiveRequest(ID=lid).SerializeToString() for lid in ids]


def test_answers_come_back_in_request_order(etcd_client, etcd):
    ids = [etcd_client.grant(300 + n) for n in range(300)]
    ids.insert(150, 0x7E57)  # unknown lease: a normal answer with TTL -1
    answers = h2_unary.call_many(_target(etcd), TTL_METHOD, _ttl_requests(ids), timeout=10)
    decoded = [etcdrpc.LeaseTimeToLiveResponse.FromString(a) for a in answers]
    assert [d.ID for d in decoded] == ids
    assert decoded[150].TTL == -1
    granted = [d.grantedTTL for d in decoded[:150] + decoded[151:]]
    assert granted == list(range(300, 600))


def test_respects_the_servers_stream_limit(session_lab):
    server = lab.EtcdServer("streams", extra_args=["--max-concurrent-streams", "4"])
    server.start()
    try:
        reg = EtcdClient(EtcdOptions(endpoints=(server.endpoint,)))
        ids = [reg.grant(600) for _ in range(200)]
        answers = h2_unary.call_many(_target(server), TTL_METHOD, _ttl_requests(ids), timeout=10)
        assert all(a is not None for a in answers)  # a refused stream would have been None
        reg.close()
    finally:
        server.destroy()


def test_unknown_method_is_none_not_an_exception(etcd):
    answers = h2_unary.call_many(_target(etcd), "/etcdserverpb.Lease/NoSuchCall", [b"", b""], timeout=5)
    assert answers == [None, None]


def _one_shot_server(reply: bytes) -> tuple[int, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(reply)
        conn.close()
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def test_a_server_that_is_not_http2_is_a_clear_error():
    port, thread = _one_shot_server(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
    with pytest.raises(h2_unary.H2Error, match=r"^the server closed the connection$"):
        h2_unary.call_many(h2_unary.Target("127.0.0.1", port), TTL_METHOD, [b""], timeout=5)
    thread.join()


def test_nothing_listening_is_a_clear_error():
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with pytest.raises(h2_unary.H2Error, match=rf"^cannot connect to 127.0.0.1:{port}: "):
        h2_unary.call_many(h2_unary.Target("127.0.0.1", port), TTL_METHOD, [b""], timeout=2)


def test_registry_falls_back_to_grpc_when_pipelining_fails(etcd_client, monkeypatch):
    ids = [etcd_client.grant(600) for _ in range(40)]

    def broken(*_args, **_kw):
        raise h2_unary.H2Error("injected")

    monkeypatch.setattr(h2_unary, "call_many", broken)
    ttls = etcd_client.time_to_live_many(ids)
    assert sorted(ttls) == sorted(ids) and all(590 <= t <= 600 for t in ttls.values())
