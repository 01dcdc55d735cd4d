"""The wireguard backend without root: options, lease bytes as upstream writes them, the planner,
keys, wireguard-go's UAPI codec and the kernel's netlink messages (compared to pyroute2's bytes)."""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import json
import os
import stat
import struct

import pytest

from flanneld.backends.wireguard import WireguardOptions
from flanneld.dataplane.wireguard import genl as wggenl
from flanneld.dataplane.wireguard.uapi import DeviceState, PeerChange, encode_set, parse_get
from flanneld.model.config import ConfigError, parse_config
from flanneld.model.lease import LeaseAttrs, decode_lease, encode_value
from flanneld.model.wgkeys import Key, WgKeyError, generate_private, load_or_create, public_of
from flanneld.plan.backend import NodeSettings, create_backend, lookup
from flanneld.plan.state import Address, Route, WgPeer
from tests.unit.underlay import DUAL, EXT, V4

A = ipaddress.ip_address
N = ipaddress.ip_network
# RFC 7748 section 6.1: Alice's private and public key
PRIVATE = Key(bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"))
PUBLIC = base64.b64encode(bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")).decode()
PEER_KEY = "hA3o0ZdPN1S3fPYGyIqhJDqLRcmCN0VwVtHyyWy6ykM="
PSK = "q1L+cxcb2uGRDovd8rjzgeiyCzVCBjAYfEbu5YVTtms="


@pytest.fixture(autouse=True)
def key_file(tmp_path, monkeypatch):
    path = tmp_path / "wgkey"
    path.write_text(PRIVATE.base64 + "\n")
    monkeypatch.setenv("WIREGUARD_KEY_FILE", str(path))
    return path


def make(net: dict, **options):
    config = parse_config(json.dumps({**net, "Backend": {"Type": "wireguard", **options}}))
    return create_backend(config, EXT, NodeSettings())


def wg_lease(n: int, public: str, key: str = PEER_KEY, port: int | None = 51820, v6: str | None = None):
    data = {"PublicKey": key, **({"Port": port} if port is not None else {})}
    text = json.dumps(data, separators=(",", ":"))
    attrs = LeaseAttrs(A(public), A(v6) if v6 else None, "wireguard", text, text if v6 else None)
    return attrs.lease(N(f"198.18.{n}.0/24"), N(f"2001:db8:1800:{n:x}::/64") if v6 else None)


# -- options ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "words"), [
    ({"PSK": "c2hvcnQ="}, "Backend.PSK is not a WireGuard key (decodes to 5 bytes"),
    ({"PSK": "not base64!"}, "Backend.PSK is not a WireGuard key (not valid base64)"),
    ({"PSK": 7}, "Backend.PSK must be a string"),
    ({"ListenPort": 0}, "Backend.ListenPort must be an integer in 1..65535, got 0"),
    ({"ListenPortV6": 70000}, "Backend.ListenPortV6 must be an integer in 1..65535, got 70000"),
    ({"ListenPort": "51820"}, "Backend.ListenPort must be an integer"),
    ({"Mode": "both"}, "Backend.Mode must be one of separate, auto, ipv4, ipv6, got 'both'"),
    ({"PersistentKeepaliveInterval": -1}, "Backend.PersistentKeepaliveInterval must be an integer in 0..65535"),
    ({"MTU": 1300}, "Backend.MTU 1300 is too small for WireGuard (minimum 1360)"),
    ({"ListenPort": 5000, "ListenPortV6": 5000}, "in separate mode each device needs its own port"),
])
def test_bad_options_are_refused_naming_the_option(options, words):
    config = parse_config(json.dumps({**V4, "Backend": {"Type": "wireguard", **options}}))
    with pytest.raises(ConfigError) as info:
        lookup("wireguard").parse(config.backend)
    assert words in str(info.value)
    if "PSK" in options and isinstance(options["PSK"], str):
        assert options["PSK"] not in str(info.value)  # a secret is never echoed


def test_defaults_as_upstream():
    opts = WireguardOptions.parse(parse_config(json.dumps({**V4, "Backend": {"Type": "wireguard"}})).backend)
    assert (opts.listen_port, opts.listen_port_v6, opts.psk, opts.keepalive, opts.mode, opts.mtu) == \
        (51820, 51821, None, 0, "separate", 0)
    opts = WireguardOptions.parse(parse_config(json.dumps({**V4, "Backend": {
        "Type": "wireguard", "PSK": PSK, "PersistentKeepaliveInterval": 25, "Mode": "auto", "MTU": 9000}})).backend)
    assert opts.psk == Key.from_base64(PSK) and repr(opts).count("<key>") == 1 and PSK not in repr(opts)


# -- lease bytes (golden: as upstream's json.Marshal writes them) ---------------------------------------

def test_lease_bytes_ipv4_and_dual_stack_separate():
    be = make(V4)
    value = encode_value(be.lease_attrs({}).lease(N("198.18.1.0/24"), None))
    assert value == (b'{"PublicIP":"198.51.100.11","PublicIPv6":null,"BackendType":"wireguard",'
                     b'"BackendData":{"PublicKey":"' + PUBLIC.encode() + b'","Port":51820}}')
    be = make(DUAL)
    value = encode_value(be.lease_attrs({}).lease(N("198.18.1.0/24"), N("2001:db8:1800:1::/64")))
    assert value == (b'{"PublicIP":"198.51.100.11","PublicIPv6":"2001:db8:51::11","BackendType":"wireguard",'
                     b'"BackendData":{"PublicKey":"' + PUBLIC.encode() + b'","Port":51820},'
                     b'"BackendV6Data":{"PublicKey":"' + PUBLIC.encode() + b'","Port":51821}}')
    assert make(DUAL, Mode="auto").lease_attrs({}).backend_v6_data == f'{{"PublicKey":"{PUBLIC}","Port":51820}}'


def test_an_upstream_lease_without_port_decodes_and_means_our_listen_port():
    raw = (b'{"PublicIP":"198.51.100.12","PublicIPv6":null,"BackendType":"wireguard",'
           b'"BackendData":{"PublicKey":"' + PEER_KEY.encode() + b'"}}')
    lease = decode_lease("198.18.2.0-24", raw)
    assert encode_value(LeaseAttrs.of(lease).lease(lease.subnet, None)) == raw  # kept byte for byte
    be = make(V4, ListenPort=51900)
    plan = be.plan_peer(lease)
    assert plan.wg_peers == [WgPeer("flannel-wg", PEER_KEY, "198.51.100.12:51900", ("198.18.2.0/24",))]


# -- the planner -------------------------------------------------------------------------------------

def test_devices_addresses_route_and_one_peer_per_lease():
    be = make(V4, PSK=PSK, PersistentKeepaliveInterval=25)
    own = be.lease_attrs({}).lease(N("198.18.1.0/24"), None)
    plan = be.plan(own, [own, wg_lease(2, "198.51.100.12"), wg_lease(3, "198.51.100.13", key="not-a-key")])
    (link,) = plan.desired.links
    assert (link.name, link.mtu, link.listen_port, link.private_key, link.public_key) == \
        ("flannel-wg", 1420, 51820, PRIVATE, PUBLIC)
    assert "<key>" in repr(link) and PRIVATE.base64 not in repr(link)
    assert plan.desired.addresses == {Address("flannel-wg", "198.18.1.0/32")}
    assert plan.desired.routes == {Route("198.18.0.0/16", dev="flannel-wg")}
    assert plan.desired.wg_peers == {WgPeer("flannel-wg", PEER_KEY, "198.51.100.12:51820", ("198.18.2.0/24",), 25,
                                            Key.from_base64(PSK))}
    assert dict(plan.skipped)["198.18.3.0-24"] == "its BackendData has no valid IPv4 PublicKey"
    assert be.mtu() == 1420 and make(V4, MTU=9000).mtu() == 8920


def test_skips_name_why():
    be = make(V4)
    own = be.lease_attrs({}).lease(N("198.18.1.0/24"), None)
    vx = LeaseAttrs(A("198.51.100.14"), None, "vxlan", '{"VNI":1,"VtepMAC":"0a:00:00:00:00:01"}').lease(
        N("198.18.4.0/24"), None)
    outside = LeaseAttrs(A("198.51.100.16"), None, "wireguard", f'{{"PublicKey":"{PEER_KEY}"}}').lease(
        N("10.9.0.0/24"), None)
    plan = be.plan(own, [vx, wg_lease(5, "198.51.100.11"), outside])
    reasons = dict(plan.skipped)
    assert reasons["198.18.4.0-24"] == "backend type 'vxlan' is not wireguard"
    assert "our own public address 198.51.100.11" in reasons["198.18.5.0-24"]
    assert reasons["10.9.0.0-24"] == "subnet 10.9.0.0/24 is outside the network 198.18.0.0/16"
    assert plan.desired.wg_peers == frozenset()


def test_dual_stack_separate_and_single_device_modes():
    peer = wg_lease(2, "198.51.100.12", v6="2001:db8:51::12")
    sep = make(DUAL)
    assert {(p.dev, p.endpoint, p.allowed_ips) for p in sep.plan_peer(peer).wg_peers} == {
        ("flannel-wg", "198.51.100.12:51820", ("198.18.2.0/24",)),
        ("flannel-wg-v6", "[2001:db8:51::12]:51820", ("2001:db8:1800:2::/64",))}  # the peer's own Port
    assert [link.name for link in sep.links()] == ["flannel-wg", "flannel-wg-v6"]
    own = sep.lease_attrs({}).lease(N("198.18.1.0/24"), N("2001:db8:1800:1::/64"))
    assert sep.base_state(own).routes == {Route("198.18.0.0/16", dev="flannel-wg"),
                                          Route("2001:db8:1800::/56", dev="flannel-wg-v6", metric=1024)}
    for mode, endpoint in (("ipv4", "198.51.100.12:51820"), ("ipv6", "[2001:db8:51::12]:51820"),
                           ("auto", "198.51.100.12:51820")):  # auto: both public, IPv4 first as upstream
        (wg,) = make(DUAL, Mode=mode).plan_peer(peer).wg_peers
        assert (wg.dev, wg.endpoint, wg.allowed_ips) == ("flannel-wg", endpoint,
                                                         ("198.18.2.0/24", "2001:db8:1800:2::/64"))
    private_v4 = wg_lease(3, "10.1.2.3", v6="2001:db8:51::13")
    (wg,) = make(DUAL, Mode="auto").plan_peer(private_v4).wg_peers
    assert wg.endpoint == "[2001:db8:51::13]:51820"  # a private IPv4 is not reachable: its IPv6 is


def test_published_by_us_is_our_public_key():
    be = make(V4)
    assert be.published_by_us(wg_lease(7, "198.51.100.99", key=PUBLIC), {})
    assert not be.published_by_us(wg_lease(7, "198.51.100.99"), {})


def test_doctor_reads_keys_without_creating_them(key_file):
    key_file.unlink()
    config = parse_config(json.dumps({**V4, "Backend": {"Type": "wireguard"}}))
    with pytest.raises(ConfigError, match="is missing"):
        create_backend(config, EXT, NodeSettings(create_identity=False))
    assert not key_file.exists()
    be = create_backend(config, EXT, NodeSettings())
    assert key_file.exists() and stat.S_IMODE(os.stat(key_file).st_mode) == 0o400
    assert create_backend(config, EXT, NodeSettings()).public_key == be.public_key  # reused, not regenerated


# -- keys --------------------------------------------------------------------------------------------

def test_public_key_and_key_file(tmp_path):
    assert public_of(PRIVATE).base64 == PUBLIC  # RFC 7748's test vector
    k = generate_private()
    assert k.raw[0] & 7 == 0 and k.raw[31] & 0xC0 == 0x40
    path = str(tmp_path / "sub" / "wgkey")
    key, created = load_or_create(path)
    assert created and load_or_create(path) == (key, False)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
    (tmp_path / "bad").write_text("garbage")
    with pytest.raises(WgKeyError) as info:
        load_or_create(str(tmp_path / "bad"))
    assert "holds no valid key" in str(info.value) and "garbage" not in str(info.value)
    assert str(key) == repr(key) == "<key>"


# -- wireguard-go's UAPI -----------------------------------------------------------------------------------

def test_uapi_set_names_only_the_changes():
    peer = Key.from_base64(PEER_KEY)
    text = encode_set(PRIVATE, 51820, [
        PeerChange(PEER_KEY, endpoint="198.51.100.12:51820", allowed_ips=("198.18.2.0/24",), keepalive=25,
                   psk=Key.from_base64(PSK)),
        PeerChange(PUBLIC, remove=True)]).decode()
    assert text == (f"set=1\nprivate_key={PRIVATE.hex}\nlisten_port=51820\n"
                    f"public_key={peer.hex}\npreshared_key={Key.from_base64(PSK).hex}\n"
                    "endpoint=198.51.100.12:51820\npersistent_keepalive_interval=25\nreplace_allowed_ips=true\n"
                    f"allowed_ip=198.18.2.0/24\npublic_key={Key.from_base64(PUBLIC).hex}\nremove=true\n\n")
    assert "replace_peers" not in text


def test_uapi_get_reply_parses():
    peer = Key.from_base64(PEER_KEY)
    reply = (f"private_key={PRIVATE.hex}\nlisten_port=51820\npublic_key={peer.hex}\npreshared_key={'0' * 64}\n"
             "protocol_version=1\nendpoint=[2001:db8:51:0::12]:51821\nlast_handshake_time_sec=0\n"
             "last_handshake_time_nsec=0\ntx_bytes=92\nrx_bytes=0\npersistent_keepalive_interval=0\n"
             "allowed_ip=2001:db8:1800:2::/64\nallowed_ip=198.18.2.0/24\n")
    state = parse_get(reply)
    assert state.private_key == PRIVATE and state.listen_port == 51820
    p = state.peers[PEER_KEY]
    assert (p.endpoint, p.allowed_ips, p.psk, p.tx_bytes) == (
        "[2001:db8:51::12]:51821", ("198.18.2.0/24", "2001:db8:1800:2::/64"), None, 92)


# -- the kernel's generic netlink messages, byte for byte as pyroute2 encodes them --------------------------

def _pyroute2_set(ifname: str, private: str | None, port: int | None, peers: list[dict]) -> bytes:
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    from pyroute2.netlink.generic.wireguard import WG_CMD_SET_DEVICE, AsyncWireGuard, wgmsg

    msg = wgmsg()
    msg["attrs"].append(["WGDEVICE_A_IFNAME", ifname])
    if private:
        msg["attrs"].append(["WGDEVICE_A_PRIVATE_KEY", private])
    if port:
        msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", port])
    for peer in peers:
        AsyncWireGuard._wg_set_peer(AsyncWireGuard.__new__(AsyncWireGuard), msg, peer)
    msg["cmd"], msg["version"] = WG_CMD_SET_DEVICE, 1
    msg["header"].update({"type": 0x1B, "flags": NLM_F_REQUEST | NLM_F_ACK, "sequence_number": 9, "pid": 0})
    msg.encode()
    return bytes(msg.data)


@pytest.mark.parametrize("endpoint", ["198.51.100.12:51820", "[2001:db8:51::12]:51821"])
def test_kernel_set_device_bytes_match_pyroute2(endpoint):
    host, _, port = endpoint.rpartition(":")
    ours = wggenl.set_device(9, 0x1B, "flannel-wg", PRIVATE, 51820, [PeerChange(
        PEER_KEY, endpoint=endpoint, allowed_ips=("198.18.2.0/24", "2001:db8:1800:2::/64"), keepalive=25,
        psk=Key.from_base64(PSK))])
    theirs = _pyroute2_set("flannel-wg", PRIVATE.base64, 51820, [{
        "public_key": PEER_KEY, "endpoint_addr": host.strip("[]"), "endpoint_port": int(port),
        "preshared_key": PSK, "persistent_keepalive": 25, "replace_allowed_ips": True,
        "allowed_ips": ["198.18.2.0/24", "2001:db8:1800:2::/64"]}])
    assert ours == theirs


def test_kernel_remove_bytes_match_pyroute2_and_a_get_reply_parses():
    ours = wggenl.set_device(9, 0x1B, "flannel-wg", changes=[PeerChange(PEER_KEY, remove=True)])
    assert ours == _pyroute2_set("flannel-wg", None, None, [{"public_key": PEER_KEY, "remove": True}])
    # a GET_DEVICE reply is laid out like a SET request: parse pyroute2's encoding of one
    reply = _pyroute2_set("flannel-wg", PRIVATE.base64, 51820, [{
        "public_key": PEER_KEY, "endpoint_addr": "198.51.100.12", "endpoint_port": 51820, "persistent_keepalive": 0,
        "replace_allowed_ips": True, "allowed_ips": ["198.18.2.0/24"]}])
    state = wggenl.parse_device([memoryview(reply)[16:]])
    assert state == DeviceState(PRIVATE, 51820, {PEER_KEY: state.peers[PEER_KEY]})
    p = state.peers[PEER_KEY]
    assert (p.endpoint, p.allowed_ips, p.keepalive, p.psk) == ("198.51.100.12:51820", ("198.18.2.0/24",), 0, None)


def test_kernel_family_lookup_message():
    msg = wggenl.get_family(3)
    length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, seq) == (len(msg), wggenl.GENL_ID_CTRL, 3) and b"wireguard\0" in msg


def test_two_leases_with_one_public_key_become_one_peer():
    """An upstream node that moved keeps its old lease until it expires: one key, two subnets."""
    be = make(V4)
    own = be.lease_attrs({}).lease(N("198.18.1.0/24"), None)
    for order in ((2, 3), (3, 2)):
        peers = [wg_lease(n, f"198.51.100.{10 + n}") for n in order]
        (peer,) = be.plan(own, peers).desired.wg_peers
        assert peer.allowed_ips == ("198.18.2.0/24", "198.18.3.0/24") and peer.endpoint == "198.51.100.12:51820"


def test_an_interface_mtu_that_leaves_wireguard_below_1280_is_refused():
    """WireGuard carries IPv6 inside, which needs 1280: a 1300-byte underlay would give 1220 silently."""
    small = dataclasses.replace(EXT, mtu=1300)
    config = parse_config(json.dumps({**V4, "Backend": {"Type": "wireguard"}}))
    with pytest.raises(ConfigError, match=r"MTU would be 1220 \(interface eth0's MTU 1300 minus 80\), below IPv6's "
                                          r"minimum 1280: set Backend.MTU to at least 1360"):
        create_backend(config, small, NodeSettings())
    assert create_backend(config, dataclasses.replace(EXT, mtu=1360), NodeSettings()).mtu() == 1280
