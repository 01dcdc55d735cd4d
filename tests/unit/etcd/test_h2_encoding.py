"""Encoding pieces of the pipelined HTTP/2 client (RFC 7541 / 7540 / gRPC framing)."""

from __future__ import annotations

import pytest

from flanneld.etcd.h2_unary import Target, frame, grpc_body, grpc_message, header_block, hpack_int


@pytest.mark.parametrize(("value", "bits", "encoded"), [
    (10, 5, b"\x0a"),  # RFC 7541 C.1.1
    (1337, 5, b"\x1f\x9a\x0a"),  # RFC 7541 C.1.2
    (42, 8, b"\x2a"),  # RFC 7541 C.1.3
    (127, 7, b"\x7f\x00"),  # exactly the prefix limit needs a continuation byte
])
def test_hpack_integers_match_the_rfc_examples(value, bits, encoded):
    assert hpack_int(value, bits) == encoded


def test_frame_header_layout():
    assert frame(1, 4, 3, b"abc") == b"\x00\x00\x03\x01\x04\x00\x00\x00\x03abc"


def test_grpc_message_roundtrip_and_rejections():
    assert grpc_message(b"xy") == b"\x00\x00\x00\x00\x02xy"
    assert grpc_body(grpc_message(b"xy")) == b"xy"
    assert grpc_body(b"") is None  # no message at all (an error status)
    assert grpc_body(b"\x01\x00\x00\x00\x02xy") is None  # compressed: not ours to decode
    assert grpc_body(b"\x00\x00\x00\x00\x05xy") is None  # truncated


def test_header_block_is_literal_and_carries_metadata():
    block = header_block(Target("::1", 2379, metadata=(("Token", "t0k"),)), "/a.B/C")
    assert block.startswith(b"\x83\x86")  # :method POST, :scheme http from the static table
    assert b"\x00\x05:path\x06/a.B/C" in block
    assert b"\x00\x0a:authority\x0a[::1]:2379" in block
    assert b"\x00\x05token\x03t0k" in block  # header names are lower case on the wire
    assert b"\x00\x02te\x08trailers" in block
