"""subnet.env: upstream format and order, parsing, atomic replacement."""

import collections
import ipaddress
import os
import stat

import pytest
from hypothesis import given, settings

from flanneld.model import subnetenv
from flanneld.model.lease import Lease
from tests.unit.subnetenv_files import perturbed_file

N = ipaddress.ip_network


def test_render_upstream_format_dual_stack():
    lease = Lease(N("10.5.72.0/24"), N("2001:db8:0:1::/64"))
    env = subnetenv.for_lease(lease, N("10.5.0.0/16"), N("2001:db8::/56"), 1450, False)
    assert env.render() == (
        "FLANNEL_NETWORK=10.5.0.0/16\n"
        "FLANNEL_SUBNET=10.5.72.1/24\n"
        "FLANNEL_IPV6_NETWORK=2001:db8::/56\n"
        "FLANNEL_IPV6_SUBNET=2001:db8:0:1::1/64\n"
        "FLANNEL_MTU=1450\n"
        "FLANNEL_IPMASQ=false\n"
    )
    assert subnetenv.parse(env.render()) == env


def test_render_ipv4_only_with_masq():
    env = subnetenv.for_lease(Lease(N("198.18.3.0/24")), N("198.18.0.0/16"), None, 1400, True)
    assert env.render() == ("FLANNEL_NETWORK=198.18.0.0/16\nFLANNEL_SUBNET=198.18.3.1/24\n"
                            "FLANNEL_MTU=1400\nFLANNEL_IPMASQ=true\n")
    assert env.lease_subnet == N("198.18.3.0/24")


def test_parse_accepts_comma_lists_and_ignores_unknown():
    env = subnetenv.parse("# c\nFLANNEL_NETWORK=10.5.0.0/16,10.6.0.0/16\nFLANNEL_SUBNET=10.5.1.1/24\nOTHER=x\n"
                          "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    assert env.networks == (N("10.5.0.0/16"), N("10.6.0.0/16")) and env.ipmasq and env.mtu == 1450


@pytest.mark.parametrize("text", ["FLANNEL_SUBNET", "FLANNEL_SUBNET=banana\n", "FLANNEL_MTU=big\n"])
def test_parse_errors(text):
    with pytest.raises(subnetenv.SubnetEnvError):
        subnetenv.parse(text)


def test_write_is_atomic_and_0644(tmp_path):
    path = tmp_path / "run" / "flannel" / "subnet.env"
    env = subnetenv.for_lease(Lease(N("198.18.3.0/24")), N("198.18.0.0/16"), None, 1450, False)
    subnetenv.write(str(path), env)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert subnetenv.read(str(path)) == env
    env2 = subnetenv.for_lease(Lease(N("198.18.4.0/24")), N("198.18.0.0/16"), None, 1450, False)
    subnetenv.write(str(path), env2)
    assert subnetenv.read(str(path)) == env2
    assert sorted(os.listdir(path.parent)) == ["subnet.env"]  # no temp files left


def test_read_missing_and_bad(tmp_path):
    assert subnetenv.read(str(tmp_path / "nope")) is None
    bad = tmp_path / "bad.env"
    bad.write_bytes(b"FLANNEL_SUBNET=1.2.3\n")
    with pytest.raises(subnetenv.SubnetEnvError, match=r"bad.env"):
        subnetenv.read(str(bad))


def test_a_file_with_a_network_but_no_subnet_of_that_family_renders_as_it_was_read():
    env = subnetenv.parse("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_IPV6_NETWORK=2001:db8::/56\n"
                          "FLANNEL_IPV6_SUBNET=2001:db8:0:1::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    assert env.networks and env.subnet is None
    assert subnetenv.parse(env.render()) == env  # render() dropped FLANNEL_NETWORK here


def test_fuzzed_files_parse_to_what_renders_back_the_same_or_raise_subnet_env_error() -> None:
    outcomes: collections.Counter[str] = collections.Counter()

    @settings(max_examples=400, deadline=None, database=None)
    @given(perturbed_file())
    def round_trip(text: str) -> None:
        try:
            env = subnetenv.parse(text)
        except subnetenv.SubnetEnvError:
            outcomes["refused"] += 1
            return
        assert subnetenv.parse(env.render()) == env
        outcomes["parsed"] += 1

    round_trip()
    assert outcomes["parsed"] > 0.5 * sum(outcomes.values()) and outcomes["refused"] > 40, outcomes
