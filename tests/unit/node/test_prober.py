"""The prober's logic on a fake network: states, confirmation, the size search, the schedule."""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable

import pytest

from flanneld.model.config import parse_config
from flanneld.node.metrics import Metrics
from flanneld.node.prober import ECHO, PROBE_ID, Prober, ProbeUpdate, echo_head, padding, reply_filter, reply_number
from flanneld.plan.probes import Target

CONFIG = parse_config('{"Network": "198.18.0.0/16", "Backend": {"Type": "vxlan"}}')


class FakeNetwork:
    """Answers echo requests as `path(dst, size)` says; counts what was sent."""

    def __init__(self, path: Callable[[str, int], bool]) -> None:
        self.path = path
        self.sent: list[tuple[str, int]] = []

    def socket(self, version: int, ident: int) -> FakeSocket:
        return FakeSocket(self)


class FakeSocket:
    def __init__(self, network: FakeNetwork) -> None:
        self.network = network
        self.replies: list[bytes] = []

    def sendmsg(self, buffers, ancillary, flags: int, address: tuple[str, int]) -> int:
        packet = b"".join(bytes(b) for b in buffers)
        size = len(packet) + 20
        self.network.sent.append((address[0], size))
        if self.network.path(address[0], size):
            _kind, _code, _sum, ident, seq = ECHO.unpack_from(packet)
            self.replies.append(bytes([0x45]) + bytes(19) + ECHO.pack(0, 0, 0, ident, seq) + packet[ECHO.size:])
        return len(packet)

    def recvmsg_into(self, buffers, ancillary: int):
        if not self.replies:
            raise BlockingIOError
        reply = self.replies.pop(0)[:len(buffers[0])]
        buffers[0][:len(reply)] = reply
        return len(reply), [], 0, None

    def close(self) -> None:
        pass


def peers(count: int) -> list[Target]:
    return [Target(f"198.18.{i}.0-24", f"198.51.100.{i}", f"198.18.{i}.0", 4)
            for i in range(1, count + 1)]


def make(path: Callable[[str, int], bool], targets: list[Target], interval: float = 1.0,
         kind_config=CONFIG) -> tuple[Prober, FakeNetwork]:
    network = FakeNetwork(path)
    prober = Prober(interval, Metrics("test"), threading.Event(), sockets=network.socket)
    prober.configure(kind_config, 1450)
    prober.socks = {4: network.socket(4, prober.ident)}
    prober.send(ProbeUpdate(tuple((t, True) for t in targets)))
    return prober, network


def run(prober: Prober, seconds: float, start: float = 0.0, tick: float = 0.1) -> float:
    now = start
    for _ in range(round(seconds / tick)):
        now += tick
        prober.step(now, tick)
    return now


def state(prober: Prober, key: str = "198.18.1.0-24") -> str:
    return prober.peers[key].state


def test_a_peer_that_answers_both_probes_is_ok_with_its_round_trip():
    prober, network = make(lambda dst, size: True, peers(1))
    run(prober, 1.5)
    assert state(prober) == "ok" and prober.peers["198.18.1.0-24"].rtt is not None
    assert {size for _, size in network.sent} == {64, 1450}  # small and full-size; no underlay probe


def test_encapsulation_blocked_is_unreachable_with_the_cause_after_a_confirming_look(caplog):
    blocked = {"on": False}
    prober, network = make(lambda dst, size: not (blocked["on"] and dst.startswith("198.18.")), peers(2))
    now = run(prober, 1.5)
    assert state(prober) == "ok"
    blocked["on"] = True
    with caplog.at_level(logging.INFO):
        now = run(prober, 1.2, now)  # the failed look: not yet a state change
        assert state(prober) == "ok"
        run(prober, 2.0, now)
    assert state(prober) == "unreachable"
    lines = [r.getMessage() for r in caplog.records if "198.18.1.0/24" in r.getMessage()]
    assert lines == ["peer 198.18.1.0/24 (198.51.100.1): ok → unreachable: underlay reaches 198.51.100.1 but VXLAN "
                     "on UDP 8472 gets no answer — a firewall or switch between the nodes?"]
    row = next(row for row in prober.table_rows() if row["lease"] == "198.18.1.0-24")
    assert row["cause"] == lines[0].split(": ", 1)[1].split(": ", 1)[1]  # the table says what the log said
    assert ("198.51.100.1", 64) in network.sent  # asked the underlay only once the overlay failed
    blocked["on"] = False  # a failing path that answers again is ok once a full-size look passes
    with caplog.at_level(logging.INFO):
        run(prober, 3.0, now + 2.0)
    assert state(prober) == "ok"
    assert "peer 198.18.1.0/24 (198.51.100.1): unreachable → ok" in [r.getMessage() for r in caplog.records]


def test_one_lost_probe_never_flaps_the_state():
    lost = {"once": True}

    def path(dst: str, size: int) -> bool:
        if dst == "198.18.1.0" and size == 64 and lost["once"]:
            lost["once"] = False
            return False
        return True

    prober, _ = make(lambda dst, size: True, peers(1))
    now = run(prober, 1.5)
    assert state(prober) == "ok"
    prober.socks[4].network.path = path
    seen = set()
    for _ in range(50):
        now = run(prober, 0.1, now)
        seen.add(state(prober))
    assert seen == {"ok"} and not lost["once"]  # the probe was lost, and the state never left ok


def test_no_underlay_either_is_underlay_unreachable():
    prober, _ = make(lambda dst, size: False, peers(1))
    run(prober, 3.5)
    assert state(prober) == "underlay-unreachable"


def test_a_peer_the_underlay_does_not_reach_either_is_looked_at_less_and_less_until_its_lease_is_written():
    back = {"on": False}
    prober, network = make(lambda dst, size: back["on"], peers(1), interval=1.0)
    now = run(prober, 3.5)
    assert state(prober) == "underlay-unreachable"
    start = len(network.sent)
    now = run(prober, 30.0, now)
    looks = sum(1 for dst, size in network.sent[start:] if dst == "198.18.1.0")
    assert 3 <= looks <= 6, looks  # after 1, 2, 4, then every 8 intervals: not 30 looks
    back["on"] = True
    (target,) = peers(1)
    prober.send(ProbeUpdate(((target, True),)))  # the node is back and renews its lease
    run(prober, 2.5, now)
    assert state(prober) == "ok"


def test_full_size_lost_is_mtu_naming_the_size_that_passes():
    prober, _ = make(lambda dst, size: size <= 1400, peers(1))
    run(prober, 6.0)
    peer = prober.peers["198.18.1.0-24"]
    assert peer.state == "mtu" and 1390 <= peer.passing <= 1400, peer.passing
    assert prober.words(peer) == (f"packets of 1450 bytes are lost, {peer.passing} pass: the path MTU is below "
                                  "the overlay MTU; set Backend.MTU")


def test_a_host_gw_peer_whose_gateway_never_answered_is_unprobed_not_failing():
    config = parse_config('{"Network": "198.18.0.0/16", "Backend": {"Type": "host-gw"}}')
    target = Target("198.18.1.0-24", "198.51.100.1", "198.18.1.1", 4)
    prober, _ = make(lambda dst, size: dst == "198.51.100.1", [target], kind_config=config)
    run(prober, 3.5)
    peer = prober.peers["198.18.1.0-24"]
    assert peer.state == "unprobed" and "no pod there?" in peer.cause


def test_each_peer_is_looked_at_once_per_interval_spread_evenly():
    prober, network = make(lambda dst, size: True, peers(200), interval=10.0)
    per_tick = []
    now = 0.0
    for _ in range(200):  # 20 s: two intervals
        before = len(network.sent)
        now += 0.1
        prober.step(now, 0.1)
        per_tick.append((len(network.sent) - before) // 2)
    looks = {}
    for dst, size in network.sent:
        if size == 64 and dst.startswith("198.18."):
            looks[dst] = looks.get(dst, 0) + 1
    assert set(looks.values()) == {2}, looks  # every peer, twice in two intervals
    assert max(per_tick) <= 3  # 2 a tick on average: never a burst


def test_peers_gone_are_no_longer_probed_and_counted_by_state():
    prober, network = make(lambda dst, size: True, peers(3))
    now = run(prober, 1.5)
    prober.send(ProbeUpdate(removed=("198.18.2.0-24",)))
    run(prober, 0.1, now)
    before = len(network.sent)
    run(prober, 2.0, now + 0.1)
    assert all(dst != "198.18.2.0" for dst, _ in network.sent[before:])
    assert prober.counts["ok"] == 2 and sum(prober.counts.values()) == 2
    assert [row["lease"] for row in prober.table_rows()] == ["198.18.1.0-24", "198.18.3.0-24"]
    # a peer that goes while a look at it is in flight leaves nothing behind
    prober.socks[4].network.path = lambda dst, size: False
    now = run(prober, 0.4, now + 2.1)
    in_flight = {peer.key for _, peer, look in prober.in_flight if peer.look is look}
    prober.send(ProbeUpdate(removed=tuple(in_flight)))
    run(prober, 1.5, now)
    assert in_flight and not set(prober.pending.values()) & in_flight


@pytest.mark.parametrize("version", [4, 6])
def test_echo_requests_carry_their_number_and_the_filter_is_a_valid_program(version):
    packet = echo_head(version, 0x1234, 77) + bytes(padding(version, 1450))
    assert len(packet) + (20 if version == 4 else 40) == 1450
    reply = bytes([0x45]) + bytes(19) if version == 4 else b""
    reply += ECHO.pack(0 if version == 4 else 129, 0, 0, 0x1234, 77) + packet[ECHO.size:]
    assert reply_number(reply, version, 0x1234) == 77 and reply_number(reply, version, 0x4321) is None
    if version == 4:  # the checksum of a request is right: summing it all gives 0xffff
        words = struct.unpack(f"!{len(packet) // 2}H", packet)
        total = sum(words)
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        assert total == 0xFFFF
    assert len(reply_filter(version, 0x1234)) % 8 == 0 and PROBE_ID.size == 8
