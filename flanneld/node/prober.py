"""The overlay self-test's prober: a thread that proves the data path to every peer, one peer at
a time, and says which peer fails and why (the pure half: :mod:`flanneld.plan.probes`).

Cost is bounded at any scale: each peer gets one look per ``--probe-interval``, the looks spread
evenly over the interval (a tick every 250 ms visits the peers whose turn it is: at 5000 peers
and 30 s, 42 looks a tick), whatever changes. The tick is not shorter because waking a thread is
what costs: an idle Python thread woken 10 times a second takes 0.14 % of a core on the lab's VM,
4 times 0.06 %; the prober thread at 5000 peers 0.90 % with a 100 ms tick, 0.67 % with 200 ms.

A look is two ICMP echo requests over the overlay (a small one and one of the overlay MTU with
don't-fragment set); only a look that fails is retried at once, this time with one over the
underlay to the peer's public address, so one lost packet never flaps a state; a confirmed
``mtu`` is followed by two rounds of sizes between what passes and what does not to name the
size that passes. Echo replies come from the peer's kernel: a peer whose daemon is stopped with
its data plane intact still answers, as its pods do.

The thread owns the probe table; the event loop sends it the peers that came, went or changed
(:class:`ProbeUpdate`) and the overlay MTU; the health server asks it for the table
(:class:`TableRequest`). Raw ICMP sockets (CAP_NET_RAW) carry a BPF filter that lets through only
echo replies to our identifier: the peers' own probes of this node never wake the thread.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import heapq
import itertools
import logging
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flanneld.model.config import NetworkConfig
from flanneld.plan.probes import (
    MTU,
    OK,
    STATES,
    UNDERLAY,
    UNPROBED,
    UNREACHABLE,
    Answers,
    Target,
    cause,
    classify,
    device_address,
    ladder,
    payload_size,
    subnet_of,
)

log = logging.getLogger(__name__)

TICK = 0.25
ANSWER_WAIT = 1.0  # an echo request unanswered this long is lost
RETRY_AFTER = 0.2  # a failed look is looked at again this soon, before its state changes
LADDER_STEPS = 12  # sizes per round of the search for the size that passes (two rounds)
# A peer not even the underlay reaches (a node down, its lease not yet expired) is looked at after
# 1, 2, 4, then every 8 intervals: probing it costs ARP requests for an absent address, broadcast
# to the whole segment, from every node. Its lease written again (a node back) ends the backoff.
MAX_BACKOFF = 8
SMALL = 64  # bytes of the small probe's IP packet
MAGIC = b"FLP\x01"
ECHO = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence
PROBE_ID = struct.Struct("!4sI")  # MAGIC, the probe's number: the first payload bytes (the rest zeros)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SO_ATTACH_FILTER = 26
IP_MTU_DISCOVER, IP_PMTUDISC_PROBE = 10, 3  # don't fragment, and send even above a PMTU the kernel has cached
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_PROBE = 23, 3


@dataclass(frozen=True)
class ProbeUpdate:
    """From the event loop: peers that came or changed (with whether they are programmed), peers
    gone, and peers whose programming changed alone (an overlap ended)."""

    upserts: tuple[tuple[Target, bool], ...] = ()
    removed: tuple[str, ...] = ()
    programmed: tuple[tuple[str, bool], ...] = ()


@dataclass(frozen=True)
class ProbeMtu:
    mtu: int


@dataclass(frozen=True)
class TableRequest:
    reply: queue.SimpleQueue[list[dict[str, Any]]]


def checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


ZEROS = memoryview(bytes(65536))  # every probe's padding, sent from here (scatter-gather: no copy per probe)


def echo_head(version: int, ident: int, number: int) -> bytes:
    """An echo request's first 16 bytes (header and probe number). The payload after them is
    zeros, so the checksum is over these only (the kernel's, for ICMPv6)."""
    head = PROBE_ID.pack(MAGIC, number)
    if version == 4:
        head_sum = checksum(ECHO.pack(8, 0, 0, ident, number & 0xFFFF) + head)
        return ECHO.pack(8, 0, head_sum, ident, number & 0xFFFF) + head
    return ECHO.pack(128, 0, 0, ident, number & 0xFFFF) + head


def padding(version: int, size: int) -> memoryview:
    """The zeros after the head that make an IP packet of `size` bytes."""
    return ZEROS[:payload_size(size, version) - PROBE_ID.size]


def reply_number(packet: bytes | bytearray, version: int, ident: int) -> int | None:
    """The probe number an echo reply to our identifier carries (None for anything else)."""
    offset = (packet[0] & 0x0F) * 4 if version == 4 else 0
    if len(packet) < offset + ECHO.size + PROBE_ID.size:
        return None
    kind, _code, _sum, got_ident, _seq = ECHO.unpack_from(packet, offset)
    if kind != (0 if version == 4 else 129) or got_ident != ident:
        return None
    magic, number = PROBE_ID.unpack_from(packet, offset + ECHO.size)
    return number if magic == MAGIC else None


def reply_filter(version: int, ident: int) -> bytes:
    """A classic BPF program passing only echo replies to `ident` (raw IPv4 sockets see the IP
    header first; raw ICMPv6 sockets start at the ICMPv6 header)."""
    def op(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)

    if version == 4:
        program = [op(0xB1, 0, 0, 0),  # ldxb 4*([0]&0xf): X = the IP header's length
                   op(0x50, 0, 0, 0),  # ldb [x+0]: the ICMP type
                   op(0x15, 0, 3, 0),  # jeq #0 (echo reply)
                   op(0x48, 0, 0, 4),  # ldh [x+4]: the identifier
                   op(0x15, 0, 1, ident),
                   op(0x06, 0, 0, 0xFFFF), op(0x06, 0, 0, 0)]
    else:
        program = [op(0x30, 0, 0, 0), op(0x15, 0, 3, 129), op(0x28, 0, 0, 4), op(0x15, 0, 1, ident),
                   op(0x06, 0, 0, 0xFFFF), op(0x06, 0, 0, 0)]
    return b"".join(program)


def open_socket(version: int, ident: int) -> socket.socket:
    if version == 4:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
    else:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_PROBE)
    program = reply_filter(version, ident)
    buffer = ctypes.create_string_buffer(program)
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.setblocking(False)
    return sock


@dataclass(slots=True)
class Look:
    """One look at a peer in flight: the probes sent (number → what) and what answered."""

    retry: bool
    sent: dict[int, int | str] = field(default_factory=dict)  # number -> "small"/"full"/"underlay" or a size
    answered: set[int | str] = field(default_factory=set)
    small_at: float = 0.0  # wall clock, as the kernel's receive timestamps
    rtt: float | None = None
    search: tuple[int, int] | None = None  # a round of the size search: (passes, lost)
    rounds: int = 0


@dataclass(slots=True)
class Peer:
    """One peer's probing state. The target's fields are kept flat, and the probed address only
    when it is not the device address the key names: at 5000 peers every object and string counts."""

    key: str
    public: str
    aim: str | None  # the address probed, when not device_address(key): host-gw's gateway; '' for none
    version: int
    programmed: bool
    state: str = UNPROBED
    # the words only when they cannot be derived (ok, unprobed's reasons); None for a failure, whose
    # words come from its state and target when asked: 5000 failing peers would otherwise keep
    # 5000 strings of ~110 characters (0.8 MB)
    cause: str | None = "not probed yet"
    since: float = 0.0
    rtt: float | None = None
    passing: int | None = None
    ever_answered: bool = False
    confirm: bool = False  # a failed look awaits a second one (whichever comes first: the retry or its turn)
    backoff: int = 0  # intervals between looks while underlay-unreachable (MAX_BACKOFF)
    skip: int = 0  # turns still to skip
    look: Look | None = None

    @classmethod
    def of(cls, target: Target, programmed: bool, since: float) -> Peer:
        aim = None if target.overlay == device_address(target.key, target.version) else target.overlay
        return cls(target.key, target.public, aim, target.version, programmed, since=since)

    @property
    def overlay(self) -> str:
        return device_address(self.key, self.version) if self.aim is None else self.aim

    @property
    def target(self) -> Target:
        return Target(self.key, self.public, self.overlay, self.version)

    def row(self, cause: str) -> dict[str, Any]:
        return {"lease": self.key, "subnet": subnet_of(self.target), "public_ip": self.public,
                "probed": self.overlay or None, "state": self.state, "cause": cause,
                "since": round(self.since, 3), "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
                "passing_size": self.passing}


class Prober:
    """Created before start-up (the initial listing's peers queue up in its inbox), configured
    and run once the daemon is ready."""

    def __init__(self, interval: float, metrics: Any, stop: threading.Event,
                 sockets: Callable[[int, int], socket.socket] = open_socket) -> None:
        self.interval, self.metrics, self.stop = interval, metrics, stop
        self.inbox: queue.SimpleQueue[ProbeUpdate | ProbeMtu | TableRequest] = queue.SimpleQueue()
        self.config: NetworkConfig | None = None
        self.kind = ""
        self.mtu = 0
        self.running = False
        self.ident = os.getpid() & 0xFFFF
        self._open = sockets
        self.socks: dict[int, socket.socket] = {}
        self.peers: dict[str, Peer] = {}
        self.order: list[str] = []  # the rotation (keys of removed peers are skipped, then compacted)
        self.cursor = 0
        self.credit = 0.0
        self.numbers = itertools.count(1)
        self.pending: dict[int, str] = {}  # probe number -> peer key
        self.retries: list[tuple[float, str]] = []  # heap of (when, key)
        # looks in flight, oldest first: every look waits ANSWER_WAIT, so deadlines come in the order
        # the looks began and a tick reads only those that are due (not every look in flight)
        self.in_flight: collections.deque[tuple[float, Peer, Look]] = collections.deque()
        self.answered: list[tuple[Peer, Look]] = []  # looks all of whose probes answered: concluded at once
        self.sent = 0  # echo requests sent, added to the metric once a tick
        self.buffer = bytearray(128)  # a reply's IP header, echo header and probe number fit
        self.counts = dict.fromkeys(STATES, 0)

    def configure(self, config: NetworkConfig, mtu: int) -> None:
        """Before run(), on the thread that made the prober (its state is that thread's until run()
        starts): the network (families, backend, its port for the words), the overlay MTU, and
        the initial listing's peers taken in now, so that the daemon's release of start-up
        garbage, which follows, also frees the messages that carried them."""
        self.config, self.kind, self.mtu = config, config.backend.type, mtu
        self._inbox()

    # -- from other threads ---------------------------------------------------------------

    def send(self, message: ProbeUpdate | ProbeMtu | TableRequest) -> None:
        self.inbox.put(message)

    def table(self, timeout: float = 2.0) -> list[dict[str, Any]] | None:
        """The per-peer table, failing peers first (asked of the prober's thread; None if it does not answer)."""
        reply: queue.SimpleQueue[list[dict[str, Any]]] = queue.SimpleQueue()
        self.inbox.put(TableRequest(reply))
        try:
            return reply.get(timeout=timeout)
        except queue.Empty:
            return None

    # -- the thread ------------------------------------------------------------------------

    def run(self) -> None:
        assert self.config is not None
        for version in (4, 6):
            if self.config.ipv4 if version == 4 else self.config.ipv6:
                try:
                    self.socks[version] = self._open(version, self.ident)
                except OSError as exc:
                    log.error("the overlay prober cannot open a raw ICMP socket (IPv%d): %s; it is off", version,
                              exc)
                    return
        self.running = True
        log.info("probing every peer's data path every %gs", self.interval)
        last = time.monotonic()
        try:
            while not self.stop.wait(max(0.0, last + TICK - time.monotonic())):
                now = time.monotonic()
                self.step(now, now - last)
                last = now
        except Exception:  # a bug here must not pass unseen; the daemon itself goes on
            log.exception("the overlay prober failed; it is off until flanneld restarts")
        finally:
            self.running = False
            for sock in self.socks.values():
                sock.close()

    def step(self, now: float, elapsed: float) -> None:
        """One tick: messages, answers, concluded looks, then the looks whose turn it is."""
        self._inbox()
        self._receive()
        self._conclude(now)
        self.credit = min(self.credit + len(self.peers) * elapsed / self.interval, len(self.peers) + 1.0)
        self._visit(now)
        if self.sent:
            self.metrics.probes_sent.inc(self.sent)
            self.sent = 0

    def _inbox(self) -> None:
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, ProbeUpdate):
                self._update(message)
            elif isinstance(message, ProbeMtu):
                self.mtu = message.mtu
            else:
                message.reply.put(self.table_rows())

    def _update(self, update: ProbeUpdate) -> None:
        for key in update.removed:
            peer = self.peers.pop(key, None)
            if peer is not None:
                self.counts[peer.state] -= 1
        since = time.time()  # one float for all the peers of an update
        for target, programmed in update.upserts:
            peer = self.peers.get(target.key)
            if peer is None:
                self.peers[target.key] = Peer.of(target, programmed, since)
                self.order.append(target.key)
                self.counts[UNPROBED] += 1
            elif peer.target != target:  # a changed lease is a new peer to the prober
                self.counts[peer.state] -= 1
                self.counts[UNPROBED] += 1
                self.peers[target.key] = Peer.of(target, programmed, since)
            else:
                peer.programmed = programmed
                peer.skip = 0  # its lease was written again: a node down may be back
        for key, programmed in update.programmed:
            if (peer := self.peers.get(key)) is not None:
                peer.programmed = programmed
        if len(self.order) > 2 * len(self.peers) + 64:
            self.order = [key for key in self.order if key in self.peers]
            self.cursor = 0
        self._publish_counts()

    def table_rows(self) -> list[dict[str, Any]]:
        """The table's rows, failing peers first (on the prober's thread)."""
        order = {state: i for i, state in enumerate(("unreachable", "underlay-unreachable", "mtu", "unprobed", "ok"))}
        peers = sorted(self.peers.values(), key=lambda p: (order[p.state], p.key))
        return [p.row(self.words(p)) for p in peers]

    def words(self, peer: Peer) -> str:
        """A peer's cause in words (a failure's are derived, not kept)."""
        return peer.cause if peer.cause is not None else self._cause(peer.state, peer.target, peer.passing)

    # -- looking -----------------------------------------------------------------------------

    def _visit(self, now: float) -> None:
        while self.retries and self.retries[0][0] <= now:
            _, key = heapq.heappop(self.retries)
            peer = self.peers.get(key)
            if peer is not None and peer.look is None:
                self._look(peer, now, retry=True)
        while self.credit >= 1 and self.order:
            self.credit -= 1
            if self.cursor >= len(self.order):
                self.cursor = 0
            key = self.order[self.cursor]
            self.cursor += 1
            peer = self.peers.get(key)
            if peer is not None and peer.skip:
                peer.skip -= 1
            elif peer is not None and peer.look is None:
                self._look(peer, now, retry=False)

    def _look(self, peer: Peer, now: float, retry: bool, search: tuple[int, int] | None = None,
              rounds: int = 0) -> None:
        overlay = peer.overlay
        if not overlay or not peer.programmed or peer.version not in self.socks:
            self._settle(peer, UNPROBED, "nothing to probe" if not overlay else
                         "not programmed (see flannelctl doctor)" if not peer.programmed else "no socket")
            return
        retry, peer.confirm = retry or peer.confirm, False
        look = Look(retry, search=search, rounds=rounds)
        peer.look = look
        self.in_flight.append((now + ANSWER_WAIT, peer, look))
        if search is not None:
            for size in ladder(search[0], search[1], LADDER_STEPS):
                self._send(peer, overlay, size, size)
            return
        self._send(peer, overlay, SMALL, "small")
        if retry or peer.state in (OK, MTU, UNPROBED):  # a path known to fail is not asked for full size
            self._send(peer, overlay, self.mtu, "full")
        if (retry or peer.state != OK) and peer.public:  # why the overlay fails, once it may
            self._send(peer, peer.public, SMALL, "underlay")

    def _send(self, peer: Peer, dst: str, size: int, what: int | str) -> None:
        number = next(self.numbers) & 0xFFFFFFFF
        look = peer.look
        assert look is not None
        look.sent[number] = what
        self.pending[number] = peer.key
        head = echo_head(peer.version, self.ident, number)
        self.sent += 1
        with contextlib.suppress(OSError):  # unreachable, too big for the device: a lost probe, counted so
            self.socks[peer.version].sendmsg((head, padding(peer.version, size)), (), 0, (dst, 0))
        if what == "small":
            look.small_at = time.time()

    def _receive(self) -> None:
        buffer = self.buffer
        for version, sock in self.socks.items():
            while True:
                try:  # into one buffer: only the first bytes of a reply are read, and nothing is allocated
                    _size, ancillary, _flags, _addr = sock.recvmsg_into((buffer,), 64)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                number = reply_number(buffer, version, self.ident)
                key = self.pending.pop(number, None) if number is not None else None
                peer = self.peers.get(key) if key is not None else None
                look = peer.look if peer is not None else None
                if look is None or number not in look.sent:
                    continue
                what = look.sent[number]
                look.answered.add(what)
                if what == "small":
                    stamp = next((struct.unpack("qq", data[:16]) for level, kind, data in ancillary
                                  if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS), None)
                    received = stamp[0] + stamp[1] / 1e9 if stamp else time.time()
                    look.rtt = max(0.0, received - look.small_at)
                if (look.search is None and {"small", "full"} <= look.answered) or \
                        (look.search is not None and len(look.answered) == len(look.sent)):
                    self.answered.append((peer, look))  # all in: concluded at once

    def _conclude(self, now: float) -> None:
        due, self.answered = self.answered, []
        while self.in_flight and self.in_flight[0][0] <= now:
            _, peer, look = self.in_flight.popleft()
            due.append((peer, look))
        for peer, look in due:
            if peer.look is not look:  # concluded already (all answered before its deadline)
                continue
            peer.look = None
            for number in look.sent:
                self.pending.pop(number, None)
            if self.peers.get(peer.key) is not peer:  # the peer went (or its lease changed)
                continue
            if look.search is not None:
                self._searched(peer, look, now)
            else:
                self._judge(peer, look, now)

    def _judge(self, peer: Peer, look: Look, now: float) -> None:
        """A look's answers: ok at once; a failure only once a second look (with the underlay) agrees."""
        asked = set(look.sent.values())
        small = "small" in look.answered
        full = ("full" in look.answered) if "full" in asked else None
        underlay = ("underlay" in look.answered) if "underlay" in asked else None
        if small and look.rtt is not None:
            peer.rtt = look.rtt
            self.metrics.probe_rtt.observe(look.rtt)
        peer.ever_answered = peer.ever_answered or small
        state = classify(Answers(small, bool(full), underlay), peer.ever_answered, self.kind)
        if small and full is None:  # a failing path answers again: the confirming look asks full size too
            peer.confirm = True
            heapq.heappush(self.retries, (now + RETRY_AFTER, peer.key))
        elif state == OK:
            self._settle(peer, OK, "")
        elif underlay is None or (state != peer.state and not look.retry):
            peer.confirm = True
            heapq.heappush(self.retries, (now + RETRY_AFTER, peer.key))
        elif state == peer.state:
            # the same failure again: its words (the target's and the config's) were said when it
            # began; only unprobed has words that change (why it is not probed)
            if state == UNPROBED:
                self._settle(peer, state, self._cause(state, peer.target, None))
        elif state == MTU:
            self._look(peer, now, retry=True, search=(SMALL, self.mtu), rounds=1)
        else:
            self._settle(peer, state, self._cause(state, peer.target, None))
        if state == peer.state == UNDERLAY:
            peer.backoff = min(max(1, 2 * peer.backoff), MAX_BACKOFF)
            peer.skip = peer.backoff - 1
        elif peer.state != UNDERLAY:
            peer.backoff = peer.skip = 0

    def _searched(self, peer: Peer, look: Look, now: float) -> None:
        assert look.search is not None
        low, high = look.search
        passed = [size for size in look.sent.values() if isinstance(size, int) and size in look.answered]
        lost = [size for size in look.sent.values() if isinstance(size, int) and size not in look.answered]
        best = max(passed, default=low)
        above = min((size for size in lost if size > best), default=high)
        if look.rounds < 2 and above - best > 1:
            self._look(peer, now, retry=True, search=(best, above), rounds=look.rounds + 1)
            return
        passing = best if best > SMALL or passed else None
        peer.passing = passing
        self._settle(peer, MTU, self._cause(MTU, peer.target, passing))

    def _cause(self, state: str, target: Target, passing: int | None) -> str:
        assert self.config is not None
        return cause(state, target, self.config, self.mtu, passing)

    def _settle(self, peer: Peer, state: str, why: str) -> None:
        before = peer.state
        peer.cause = None if state in (UNREACHABLE, UNDERLAY, MTU) else why
        if state == before:
            return
        self.counts[before] -= 1
        self.counts[state] += 1
        peer.state, peer.since = state, time.time()
        if state != MTU:
            peer.passing = None
        self.metrics.probe_state_changes.labels(to=state).inc()
        self._publish_counts()
        t = peer.target
        line = "peer %s (%s): %s → %s%s"
        subnet = subnet_of(t)
        args = (subnet, t.public, before, state, f": {why}" if why else "")
        if state in (OK, UNPROBED) and before in (OK, UNPROBED):
            log.debug(line, *args)
        elif state == OK:
            log.info(line, *args, extra={"peer": t.public, "lease": subnet})
        else:
            log.warning(line, *args, extra={"peer": t.public, "lease": subnet})

    def _publish_counts(self) -> None:
        for state, count in self.counts.items():
            self.metrics.probe_peers.labels(state=state).set(count)


