"""The same pipelined unary calls as flanneld.etcd.h2_unary, on python-hyper's h2 (sans-IO) library.

Only for bench/ctl.py, which measures both in one run to decide whether a maintained protocol
implementation can replace our own framing within flannelctl's budget (README: Performance).
"""
from __future__ import annotations

import socket
import time
from collections.abc import Sequence

import h2.config
import h2.connection
import h2.events
import h2.settings

from flanneld.etcd.h2_unary import H2Error, Target, grpc_body, grpc_message


def call_many_h2(target: Target, method: str, requests: Sequence[bytes], timeout: float) -> list[bytes | None]:
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((target.host, target.port), timeout=timeout)
    try:
        if target.tls is not None:
            sock = target.tls.wrap_socket(sock, server_hostname=target.host)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0, h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        conn.initiate_connection()
        conn.increment_flow_control_window(2**31 - 1 - 65535)
        headers = [(":method", "POST"), (":scheme", "https" if target.tls else "http"), (":path", method),
                   (":authority", target.authority), ("content-type", "application/grpc"), ("te", "trailers"),
                   *((k.lower(), v) for k, v in target.metadata)]
        answers: list[bytes | None] = [None] * len(requests)
        bodies = [grpc_message(r) for r in requests]
        data: dict[int, bytearray] = {}
        index: dict[int, int] = {}
        nxt = done = 0
        settled = False
        while done < len(requests):
            if settled:
                # in flight counted here: h2's open_outbound_streams walks every stream (O(n) per call)
                while nxt < len(bodies) and nxt - done < conn.remote_settings.max_concurrent_streams:
                    body = bodies[nxt]
                    if min(conn.outbound_flow_control_window, conn.remote_settings.initial_window_size) < len(body):
                        break
                    sid = conn.get_next_available_stream_id()
                    conn.send_headers(sid, headers)
                    conn.send_data(sid, body, end_stream=True)
                    index[sid], data[sid] = nxt, bytearray()
                    nxt += 1
            out = conn.data_to_send()
            if out:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.sendall(out)
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise H2Error("closed")
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.RemoteSettingsChanged):
                    settled = True
                elif isinstance(ev, h2.events.DataReceived):
                    data[ev.stream_id].extend(ev.data)
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    answers[index[ev.stream_id]] = grpc_body(data.pop(ev.stream_id))
                    done += 1
                elif isinstance(ev, h2.events.StreamReset):
                    data.pop(ev.stream_id, None)
                    done += 1
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    raise H2Error("goaway")
        return answers
    finally:
        sock.close()
