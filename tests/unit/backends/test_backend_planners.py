"""host-gw, alloc and extension planners, the backend table's refusals, and lease bytes as upstream writes them."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import time

import pytest

from flanneld.backends.extension import ExtensionOptions, argv_for, run_hook
from flanneld.model.config import ConfigError, parse_config
from flanneld.model.lease import LeaseAttrs, encode_value
from flanneld.plan.backend import External, NodeSettings, create_backend, lookup, supported, validate_backend
from flanneld.plan.state import Route
from tests.unit.underlay import DUAL, EXT, V4

A = ipaddress.ip_address
N = ipaddress.ip_network
V6 = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "2001:db8:1800::/56"}


def make(btype: str, net: dict, blackhole: bool = False, **options):
    config = parse_config(json.dumps({**net, "Backend": {"Type": btype, **options}}))
    return create_backend(config, EXT, NodeSettings(blackhole_route=blackhole))


def hostgw_peer(n: int, public: str, v6: str | None = None, btype: str = "host-gw", subnet6: bool = False):
    attrs = LeaseAttrs(A(public) if public else ipaddress.IPv4Address(0), A(v6) if v6 else None, btype)
    return attrs.lease(N(f"198.18.{n}.0/24") if public else None, N(f"2001:db8:1800:{n:x}::/64") if subnet6 else None)


def test_host_gw_routes_each_peer_via_its_public_ip_on_the_external_interface():
    be = make("host-gw", V4)
    own = hostgw_peer(1, "198.51.100.11")
    plan = be.plan(own, [own, hostgw_peer(2, "198.51.100.12"), hostgw_peer(3, "198.51.100.13")])
    assert plan.desired.routes == {Route("198.18.2.0/24", "198.51.100.12", "eth0"),
                                   Route("198.18.3.0/24", "198.51.100.13", "eth0")}
    assert plan.desired.links == () and plan.skipped == () and be.mtu() == 1500
    assert encode_value(be.lease_attrs({}).lease(N("198.18.1.0/24"), None)) == \
        b'{"PublicIP":"198.51.100.11","PublicIPv6":null,"BackendType":"host-gw"}'


def test_host_gw_skips_a_peer_off_our_segment_naming_why_and_keeps_the_rest():
    be = make("host-gw", V4)
    plan = be.plan(hostgw_peer(1, "198.51.100.11"), [hostgw_peer(2, "198.51.100.12"), hostgw_peer(4, "203.0.113.70"),
                                                    hostgw_peer(5, "198.51.100.15", btype="vxlan")])
    assert plan.desired.routes == {Route("198.18.2.0/24", "198.51.100.12", "eth0")}
    reasons = dict(plan.skipped)
    assert "203.0.113.70 is not on our L2 segment (198.51.100.0/24)" in reasons["198.18.4.0-24"]
    assert reasons["198.18.5.0-24"] == "backend type 'vxlan' is not host-gw"


def test_host_gw_plans_again_once_the_interface_reaches_a_peer_and_not_before() -> None:
    be = make("host-gw", V4)
    remote = hostgw_peer(4, "203.0.113.70")
    assert be.plan_peer(remote).routes == []
    assert be.underlay_changed((*EXT.onlink, N("203.0.113.64/26"))) is True  # an on-link route came
    assert be.plan_peer(remote).routes == [Route("198.18.4.0/24", "203.0.113.70", "eth0")]
    assert be.underlay_changed((*EXT.onlink, N("203.0.113.64/26"))) is False  # nothing new: no replanning
    assert be.underlay_changed(EXT.onlink) is True and be.plan_peer(remote).routes == []


def test_only_backends_whose_plans_ask_what_is_on_link_replan_when_it_changes() -> None:
    more = (*EXT.onlink, N("203.0.113.64/26"))
    assert make("vxlan", V4, DirectRouting=True).underlay_changed(more) is True
    assert make("vxlan", V4).underlay_changed(more) is False
    assert make("alloc", V4).underlay_changed(more) is False


def test_host_gw_ipv6_only_and_dual_stack():
    be6 = make("host-gw", V6)
    own6 = hostgw_peer(1, "", "2001:db8:51::11", subnet6=True)
    peer6 = hostgw_peer(2, "", "2001:db8:51::12", subnet6=True)
    assert be6.plan(own6, [peer6]).desired.routes == {Route("2001:db8:1800:2::/64", "2001:db8:51::12", "eth0",
                                                            metric=1024)}
    attrs = be6.lease_attrs({})
    assert int(attrs.public_ip) == 0 and str(attrs.public_ipv6) == "2001:db8:51::11"
    dual = make("host-gw", DUAL, blackhole=True)
    peer = hostgw_peer(2, "198.51.100.12", "2001:db8:51::12", subnet6=True)
    own = hostgw_peer(1, "198.51.100.11", "2001:db8:51::11", subnet6=True)
    routes = dual.plan(own, [peer]).desired.routes
    assert Route("198.18.2.0/24", "198.51.100.12", "eth0") in routes
    assert Route("2001:db8:1800:2::/64", "2001:db8:51::12", "eth0", metric=1024) in routes
    assert Route("198.18.1.0/24", blackhole=True, metric=4000) in routes


def test_host_gw_refuses_a_public_ip_that_is_not_on_the_interface():
    config = parse_config(json.dumps({**V4, "Backend": {"Type": "host-gw"}}))
    natted = External("eth0", 2, 1500, A("198.51.100.11"), A("203.0.113.5"), onlink=(N("198.51.100.0/24"),))
    with pytest.raises(ConfigError, match="host-gw cannot work behind NAT"):
        create_backend(config, natted, NodeSettings())


def test_alloc_is_a_lease_and_nothing_else():
    be = make("alloc", V4)
    attrs = be.lease_attrs({})
    assert encode_value(attrs.lease(N("198.18.1.0/24"), None)) == b'{"PublicIP":"198.51.100.11","PublicIPv6":null}'
    plan = be.plan(hostgw_peer(1, "198.51.100.11"), [hostgw_peer(2, "198.51.100.12", btype="")])
    assert plan.desired.routes == frozenset() and plan.desired.owned_networks == () and be.links() == ()


@pytest.mark.parametrize(("btype", "words"), [
    ("udp", "upstream deprecated the udp backend"), ("ipip", "not implemented"), ("ipsec", "not implemented"),
    ("bogus", "unknown backend type"),
])
def test_unsupported_types_are_refused_with_what_this_build_supports(btype, words):
    with pytest.raises(ConfigError) as info:
        validate_backend(parse_config(json.dumps({**V4, "Backend": {"Type": btype}})).backend)
    assert words in str(info.value)
    assert "this build supports: alloc, extension, host-gw, vxlan, wireguard" in str(info.value)
    assert supported() == ["alloc", "extension", "host-gw", "vxlan", "wireguard"]
    assert lookup("host-gw").name == "host-gw"


def test_extension_options_and_argument_expansion_without_a_shell():
    config = parse_config(json.dumps({**V4, "Backend": {"Type": "extension", "SubnetAddCommand": "ip route add "
                                                        "$SUBNET via ${PUBLIC_IP}", "CommandTimeout": 2}}))
    options = ExtensionOptions.parse(config.backend)
    assert options.subnet_add.startswith("ip route") and options.timeout == 2.0
    env = {"SUBNET": "198.18.2.0/24", "PUBLIC_IP": "198.51.100.12; rm -rf /"}
    assert argv_for(options.subnet_add, env) == ["ip", "route", "add", "198.18.2.0/24", "via",
                                                 "198.51.100.12; rm -rf /"]  # one argument, never shell syntax
    for bad, message in (({"PreStartupCommand": 5}, "must be a string"),
                         ({"SubnetAddCommand": "echo 'unclosed"}, "cannot be split"),
                         ({"CommandTimeout": 0}, "CommandTimeout must be")):
        cfg = parse_config(json.dumps({**V4, "Backend": {"Type": "extension", **bad}}))
        with pytest.raises(ConfigError, match=message):
            validate_backend(cfg.backend)


def test_extension_hooks_report_failures_and_time_out(tmp_path, caplog):
    assert run_hook("SubnetAddCommand", "sh -c 'cat; echo $X'", {"X": "env"}, "stdin", 5) == "stdin\nenv"
    assert run_hook("SubnetAddCommand", "sh -c 'echo oops >&2; exit 3'", {}, "", 5) is None
    assert "failed with exit status 3: oops" in caplog.text
    assert run_hook("SubnetAddCommand", "sleep 5", {}, "", 0.2) is None and "timed out after 0.2s" in caplog.text
    assert run_hook("SubnetAddCommand", "/nonexistent/hook", {}, "", 1) is None and "could not run" in caplog.text


def test_a_timed_out_hook_leaves_no_process_of_its_pipeline_behind():
    marker = "31.4159265"  # a sleep no other process on this machine runs
    start = time.monotonic()
    assert run_hook("SubnetAddCommand", f"sh -c 'sleep {marker} | sleep {marker}'", {}, "", 0.3) is None
    assert time.monotonic() - start < 3  # survivors would hold its output open: the hook runner would hang
    time.sleep(0.2)
    left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True).stdout.split()
    for pid in left:
        os.kill(int(pid), signal.SIGKILL)
    assert left == []


def test_a_failing_pre_startup_command_is_refused_not_published_empty():
    be = make("extension", V4, PreStartupCommand="sh -c 'echo no vtep yet >&2; exit 4'")
    with pytest.raises(ConfigError, match=r"PreStartupCommand .* failed with exit status 4: no vtep yet"):
        be.prepare()
    assert be.lease_attrs({}).backend_data is None


def test_extension_publishes_pre_startup_output_as_a_json_string():
    be = make("extension", V4, PreStartupCommand="echo <vtep>")
    be.prepare()
    lease = be.lease_attrs({}).lease(N("198.18.1.0/24"), None)
    assert encode_value(lease) == (b'{"PublicIP":"198.51.100.11","PublicIPv6":null,"BackendType":"extension",'
                                   b'"BackendData":"\\u003cvtep\\u003e"}')
    assert make("extension", V4).lease_attrs({}).backend_data is None  # no PreStartupCommand: no BackendData


def test_extension_hooks_get_upstreams_variable_names_beside_ours():
    """Upstream's PostStartupCommand sees NETWORK, SUBNET, IPV6SUBNET, PUBLIC_IP, PUBLIC_IPV6: a hook
    written for it must find them here; ours (IPV6_SUBNET, IPV6_NETWORK) stay for hooks using them."""
    be = make("extension", DUAL)
    own = LeaseAttrs(A("198.51.100.11"), A("2001:db8:51::11"), "extension").lease(
        N("198.18.1.0/24"), N("2001:db8:1800:1::/64"))
    env = be._env(own, with_networks=True)
    assert env == {"NETWORK": "198.18.0.0/16", "SUBNET": "198.18.1.0/24", "PUBLIC_IP": "198.51.100.11",
                   "IPV6_NETWORK": "2001:db8:1800::/56", "IPV6SUBNET": "2001:db8:1800:1::/64",
                   "IPV6_SUBNET": "2001:db8:1800:1::/64", "PUBLIC_IPV6": "2001:db8:51::11"}
    assert "NETWORK" not in be._env(own, with_networks=False)  # peer hooks: as upstream, no NETWORK
