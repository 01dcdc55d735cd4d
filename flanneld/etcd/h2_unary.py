"""Many small unary gRPC calls pipelined over one raw HTTP/2 connection (standard library only).

Why this exists: ``flannelctl subnets list`` needs the TTL of every etcd lease, and etcd 3.4 has
no bulk call for that — one ``LeaseTimeToLive`` per lease. Through grpcio each call costs about
130 µs of client CPU (Python-side call objects and a completion thread), so 5000 leases take
0.7 to 1 s. Written straight onto one socket — a fixed header block, one HEADERS and one DATA frame
per call, every request sent before the first answer is read — the same 5000 calls cost ~70 ms of
client CPU and finish in ~0.3 s, bounded by etcd itself.

Deliberately small: no header decoding (HPACK state does not matter because we never index and
never read the server's headers), no server push, no compression. A call counts as answered only
when its stream ends with a complete uncompressed gRPC message (servers send none with an error
status); every other outcome is ``None`` and the caller falls back to its regular gRPC client.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, SETTINGS, _PUSH_PROMISE, _PING, _GOAWAY, _WINDOW_UPDATE = 0, 1, 3, 4, 5, 6, 7, 8
_END_STREAM, _ACK, _END_HEADERS, _PADDED = 0x1, 0x1, 0x4, 0x8
_SETTINGS_ENABLE_PUSH, _SETTINGS_MAX_CONCURRENT_STREAMS, _SETTINGS_INITIAL_WINDOW_SIZE = 0x2, 0x3, 0x4
_MAX_WINDOW = (1 << 31) - 1
_DEFAULT_WINDOW = 65_535
_MAX_IN_FLIGHT = 1 << 30  # a server without SETTINGS_MAX_CONCURRENT_STREAMS allows "unlimited"


class H2Error(Exception):
    """The connection failed or the peer broke the protocol; the message says how."""


@dataclass(frozen=True)
class Target:
    """Where to send the calls: one gRPC server endpoint."""

    host: str  # bare name or address (no brackets around IPv6)
    port: int
    tls: ssl.SSLContext | None = None  # None: cleartext HTTP/2 with prior knowledge (h2c)
    metadata: tuple[tuple[str, str], ...] = ()  # e.g. etcd's ("token", ...); never logged

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def tls_context(cafile: str = "") -> ssl.SSLContext:
    """A client context verifying the server like grpcio does (CA file or system roots), ALPN h2.

    Add a client certificate with ``load_cert_chain``.
    """
    ctx = ssl.create_default_context(cafile=cafile or None)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def call_many(target: Target, method: str, requests: Sequence[bytes], timeout: float) -> list[bytes | None]:
    """Send each serialized request to `method` (``/pkg.Service/Method``); answers in request order.

    Raises H2Error only when the connection itself fails; a single refused or failed call is None.
    """
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((target.host, target.port), timeout=timeout)
    except OSError as exc:
        raise H2Error(f"cannot connect to {target.authority}: {exc}") from None
    try:
        if target.tls is not None:
            sock = target.tls.wrap_socket(sock, server_hostname=target.host)
            if sock.selected_alpn_protocol() != "h2":
                raise H2Error(f"{target.authority} did not agree to HTTP/2 (ALPN)")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Session(sock, target, method, deadline).run(requests)
    except (OSError, ssl.SSLError) as exc:
        raise H2Error(f"HTTP/2 connection to {target.authority} failed: {exc}") from None
    finally:
        sock.close()


# -- encoding ------------------------------------------------------------------------------------


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """RFC 7541 §5.1 integer with an N-bit prefix; `first` carries the representation's flag bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: str, value: str) -> bytes:
    """Literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2)."""
    raw_name, raw_value = name.encode("latin-1"), value.encode("latin-1")
    return b"\x00" + hpack_int(len(raw_name), 7) + raw_name + hpack_int(len(raw_value), 7) + raw_value


def header_block(target: Target, method: str) -> bytes:
    """The request headers every call shares; never indexed, so no HPACK state to keep."""
    scheme = b"\x87" if target.tls is not None else b"\x86"  # static table: :scheme https / http
    fields = [b"\x83", scheme]  # :method POST
    fields += [_literal(":path", method), _literal(":authority", target.authority),
               _literal("content-type", "application/grpc"), _literal("te", "trailers")]
    fields += [_literal(name.lower(), value) for name, value in target.metadata]
    return b"".join(fields)


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def grpc_message(body: bytes) -> bytes:
    """A length-prefixed, uncompressed gRPC message."""
    return b"\x00" + struct.pack(">I", len(body)) + body


def grpc_body(data: bytes) -> bytes | None:
    """The one uncompressed message in a unary response's DATA, or None when it is not exactly that."""
    if len(data) < 5 or data[0] != 0:
        return None
    size = int.from_bytes(data[1:5], "big")
    return bytes(data[5:]) if len(data) == 5 + size else None


# -- the connection ------------------------------------------------------------------------------


class _Session:
    """One client connection: sends calls as flow control and the stream limit allow, reads answers."""

    def __init__(self, sock: socket.socket, target: Target, method: str, deadline: float) -> None:
        self.sock = sock
        self.headers = header_block(target, method)
        self.deadline = deadline
        self.send_window = _DEFAULT_WINDOW  # connection-level, grown by the server's WINDOW_UPDATEs
        self.stream_window = _DEFAULT_WINDOW  # the server's initial per-stream window
        self.max_streams = _MAX_IN_FLIGHT
        self.settled = False  # the server's first SETTINGS arrived
        self.last_allowed = _MAX_WINDOW  # lowest last-stream-id of a GOAWAY
        self.received = 0  # DATA bytes since our last WINDOW_UPDATE
        self.open: dict[int, tuple[int, bytearray]] = {}  # stream id -> (request index, DATA so far)
        self.out = bytearray()

    def run(self, requests: Sequence[bytes]) -> list[bytes | None]:
        answers: list[bytes | None] = [None] * len(requests)
        bodies = [grpc_message(r) for r in requests]
        # Our windows at their maximum: the server never waits for us to read.
        self.out += PREFACE + frame(SETTINGS, 0, 0, struct.pack(
            ">HIHI", _SETTINGS_ENABLE_PUSH, 0, _SETTINGS_INITIAL_WINDOW_SIZE, _MAX_WINDOW))
        self.out += frame(_WINDOW_UPDATE, 0, 0, struct.pack(">I", _MAX_WINDOW - _DEFAULT_WINDOW))
        nxt, done, buf = 0, 0, bytearray()
        while done < len(requests):
            if self.settled:
                nxt = self._start(bodies, nxt)
            self._flush()
            if not self.open and (nxt == len(requests) or self.last_allowed < 2 * nxt + 1):
                break  # GOAWAY: the server will take no more calls on this connection
            chunk = self._recv()
            buf += chunk
            pos = 0
            while len(buf) - pos >= 9:
                size = int.from_bytes(buf[pos:pos + 3], "big")
                if len(buf) - pos - 9 < size:
                    break
                kind, flags = buf[pos + 3], buf[pos + 4]
                stream = int.from_bytes(buf[pos + 5:pos + 9], "big") & _MAX_WINDOW
                payload = bytes(buf[pos + 9:pos + 9 + size])
                pos += 9 + size
                done += self._on_frame(kind, flags, stream, payload, answers)
            del buf[:pos]
        return answers

    def _start(self, bodies: list[bytes], nxt: int) -> int:
        """Open streams for the next requests while the limits allow; returns the next index."""
        while nxt < len(bodies) and len(self.open) < self.max_streams:
            stream, body = 2 * nxt + 1, bodies[nxt]
            if stream > self.last_allowed or len(body) > min(self.send_window, self.stream_window):
                break
            self.out += frame(_HEADERS, _END_HEADERS, stream, self.headers)
            self.out += frame(_DATA, _END_STREAM, stream, body)
            self.send_window -= len(body)
            self.open[stream] = (nxt, bytearray())
            nxt += 1
        return nxt

    def _on_frame(self, kind: int, flags: int, stream: int, payload: bytes, answers: list[bytes | None]) -> int:
        """Handle one frame; returns how many calls it finished."""
        if kind == _DATA and stream in self.open:
            if flags & _PADDED:
                payload = payload[1:len(payload) - payload[0]] if payload else b""
            self.open[stream][1].extend(payload)
            self._credit(len(payload))
        elif kind == SETTINGS and not flags & _ACK:
            self._settings(payload)
            self.out += frame(SETTINGS, _ACK, 0)
            self.settled = True
        elif kind == _PING and not flags & _ACK:
            self.out += frame(_PING, _ACK, 0, payload)
        elif kind == _WINDOW_UPDATE and stream == 0:
            self.send_window += int.from_bytes(payload[:4], "big") & _MAX_WINDOW
        elif kind == _GOAWAY:
            self.last_allowed = min(self.last_allowed, int.from_bytes(payload[:4], "big") & _MAX_WINDOW)
            return self._abandon_after(self.last_allowed)
        elif kind == _PUSH_PROMISE:
            raise H2Error("server push although we disabled it")
        elif kind == _RST_STREAM and stream in self.open:
            del self.open[stream]
            return 1
        if kind in (_DATA, _HEADERS) and flags & _END_STREAM and stream in self.open:
            index, data = self.open.pop(stream)
            answers[index] = grpc_body(data)
            return 1
        return 0

    def _settings(self, payload: bytes) -> None:
        for pos in range(0, len(payload) - len(payload) % 6, 6):
            key, value = struct.unpack(">HI", payload[pos:pos + 6])
            if key == _SETTINGS_MAX_CONCURRENT_STREAMS:
                self.max_streams = value
            elif key == _SETTINGS_INITIAL_WINDOW_SIZE:
                self.stream_window = value

    def _abandon_after(self, last: int) -> int:
        """Calls on streams above a GOAWAY's last stream id were never processed: they stay None."""
        gone = [s for s in self.open if s > last]
        for stream in gone:
            del self.open[stream]
        return len(gone)

    def _credit(self, size: int) -> None:
        """Give the server its receive window back long before it could run out."""
        self.received += size
        if self.received > _MAX_WINDOW // 2:
            self.out += frame(_WINDOW_UPDATE, 0, 0, struct.pack(">I", self.received))
            self.received = 0

    def _flush(self) -> None:
        if self.out:
            self.sock.settimeout(self._left())
            self.sock.sendall(self.out)
            self.out.clear()

    def _recv(self) -> bytes:
        self.sock.settimeout(self._left())
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise H2Error("the server closed the connection")
        return chunk

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise H2Error("timed out")
        return left
