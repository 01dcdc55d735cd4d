"""Echo requests to one address at a fixed rate, every probe accounted for.

Run in a pod's network namespace by :class:`flanneld.lab.probes.Pinger` (``python -m
flanneld.lab.icmp_probe DST INTERVAL GRACE``). ping(8) cannot be asked for this: its per-reply
lines say nothing of the probes after the last reply, and on SIGINT the probe in flight counts
as lost. Here closing stdin stops the sending; replies are awaited GRACE seconds more (a probe
that failed to leave at all, ENETUNREACH in a fault, is a lost probe too); then one JSON line:
the send time of every probe (CLOCK_MONOTONIC, shared with the test process) and the sequence
numbers never answered. A 64-bit sequence number in the payload identifies each probe.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import struct
import sys
import time

HEADER = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence (16 bits, wraps)
SEQ = struct.Struct("!Q")
PAD = bytes(range(48))


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def main(dst: str, interval: float, grace: float) -> None:
    v6 = ":" in dst
    if v6:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)  # kernel does the checksum
        request, reply = 128, 129
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        request, reply = 8, 0
    sock.setblocking(False)
    ident = os.getpid() & 0xFFFF
    sent_at: list[float] = []
    answered: set[int] = set()
    duplicates = 0
    stdin = sys.stdin.fileno()
    print("probing", flush=True)
    next_send = time.monotonic()
    stop_at: float | None = None
    while True:
        now = time.monotonic()
        if stop_at is None and now >= next_send:
            seq = len(sent_at)
            body = SEQ.pack(seq) + PAD
            packet = HEADER.pack(request, 0, 0, ident, seq & 0xFFFF) + body
            if not v6:
                packet = HEADER.pack(request, 0, checksum(packet), ident, seq & 0xFFFF) + body
            sent_at.append(now)
            with contextlib.suppress(OSError):  # no route, no neighbour: the probe is lost, and counted so
                sock.sendto(packet, (dst, 0))
            next_send = max(next_send + interval, now)  # late wake-ups do not become a burst
        if stop_at is not None and (now >= stop_at or len(answered) == len(sent_at)):
            break
        wait = max(0.0, (next_send if stop_at is None else stop_at) - now)
        readable, _, _ = select.select([sock] if stop_at is not None else [sock, stdin], [], [], wait)
        if stdin in readable and not os.read(stdin, 4096):
            stop_at = time.monotonic() + grace
        if sock in readable:
            while True:
                try:
                    data = sock.recv(2048)
                except BlockingIOError:
                    break
                icmp = data if v6 else data[(data[0] & 0x0F) * 4:]
                if len(icmp) < HEADER.size + SEQ.size:
                    continue
                kind, _code, _sum, got_ident, _seq16 = HEADER.unpack_from(icmp)
                if kind != reply or got_ident != ident:
                    continue
                seq = SEQ.unpack_from(icmp, HEADER.size)[0]
                if seq in answered:
                    duplicates += 1
                elif seq < len(sent_at):
                    answered.add(seq)
    lost = sorted(set(range(len(sent_at))) - answered)
    print(json.dumps({"sent_at": [round(t, 4) for t in sent_at], "lost": lost, "duplicates": duplicates}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))
