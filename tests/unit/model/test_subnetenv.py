"""subnet.env: upstream format and order, parsing, atomic replacement."""

import ipaddress
import os
import stat

import pytest

from flanneld.model import subnetenv
from flanneld.model.lease import Lease

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
    subnetenv.parse(env.render())  # whatever we accept, we can write back readably


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


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_names = st.sampled_from(["FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET",
                          "FLANNEL_MTU", "FLANNEL_IPMASQ", "OTHER", "#", ""])
_values = st.sampled_from(["198.18.0.0/16", "198.18.5.1/24", "2001:db8::/56", "2001:db8:0:1::1/64", "1450", "true",
                           "x", "", "10.0.0.0/33", "1,2", "198.18.0.0/16,10.0.0.0/8"]) | st.text(max_size=10)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_names, st.sampled_from(["=", " = ", ""]), _values), max_size=8) | st.text(max_size=80))
def test_fuzzed_subnet_env_only_raises_subnet_env_error(lines):
    text = lines if isinstance(lines, str) else "\n".join(n + sep + v for n, sep, v in lines)
    try:
        env = subnetenv.parse(text)
    except subnetenv.SubnetEnvError:
        return
    subnetenv.parse(env.render())  # whatever we accept, we can write back readably
