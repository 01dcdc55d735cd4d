"""subnet.env has one writer (the daemon's) and two readers: the daemon's (flanneld.model.subnetenv)
and the CNI plugin's own (it may import the standard library only). These tests make them one
contract: what the daemon writes the plugin reads back unchanged, the two readers accept and
reject the same files and read the same values, and one constant names the default path."""

from __future__ import annotations

import collections
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flanneld.cni import install, plugin
from flanneld.ctl import cli as ctl_cli
from flanneld.model import subnetenv
from flanneld.model.lease import Lease
from flanneld.node import cli as node_cli


def _option_default(command, name: str) -> object:
    return next(p.default for p in command.params if p.name == name)


def test_one_constant_names_the_default_path() -> None:
    assert plugin.DEFAULT_SUBNET_FILE == subnetenv.DEFAULT_PATH
    assert _option_default(node_cli.flanneld_command, "subnet_file") == subnetenv.DEFAULT_PATH
    assert _option_default(ctl_cli.doctor, "subnet_file") == subnetenv.DEFAULT_PATH
    assert subnetenv.DEFAULT_PATH in next(p.help for p in install.install_command.params if p.name == "subnet_file")


def _as_plugin_reads(env: subnetenv.SubnetEnv) -> dict[str, object]:
    """The daemon's reading, in the shape the plugin returns."""
    return {"networks": [str(n) for n in env.networks], "ipv6_networks": [str(n) for n in env.ipv6_networks],
            "subnet": str(env.subnet.network) if env.subnet else None,
            "ipv6_subnet": str(env.ipv6_subnet.network) if env.ipv6_subnet else None,
            "mtu": env.mtu, "ipmasq": env.ipmasq}


def _plugin_reads(path, text: str) -> dict[str, object] | None:
    path.write_text(text, encoding="utf-8")
    try:
        return plugin.read_subnet_env(str(path))
    except plugin.CniError:
        return None


def _daemon_reads(text: str) -> dict[str, object] | None:
    try:
        return _as_plugin_reads(subnetenv.parse(text))
    except subnetenv.SubnetEnvError:
        return None


v4_net = st.builds(lambda a, p: ipaddress.IPv4Network((a, p), strict=False), st.integers(0, 2**32 - 1),
                   st.integers(8, 30))
v6_net = st.builds(lambda a, p: ipaddress.IPv6Network((a, p), strict=False), st.integers(0, 2**128 - 1),
                   st.integers(16, 124))


@st.composite
def written_env(draw) -> subnetenv.SubnetEnv:
    """What the daemon writes for some lease: IPv4, IPv6 or dual-stack."""
    family = draw(st.sampled_from(["v4", "v6", "dual"]))
    network = draw(v4_net) if family != "v6" else None
    network6 = draw(v6_net) if family != "v4" else None
    subnet = next(network.subnets(new_prefix=min(network.prefixlen + 4, 32))) if network else None
    subnet6 = next(network6.subnets(new_prefix=min(network6.prefixlen + 8, 128))) if network6 else None
    return subnetenv.for_lease(Lease(subnet, subnet6), network, network6, draw(st.integers(68, 9000)),
                               draw(st.booleans()))


@settings(max_examples=200, deadline=None)
@given(written_env())
def test_what_the_daemon_writes_the_plugin_reads_unchanged(tmp_path_factory, env) -> None:
    path = tmp_path_factory.mktemp("env") / "subnet.env"
    subnetenv.write(str(path), env)
    assert plugin.read_subnet_env(str(path)) == _as_plugin_reads(env)


V4_VALUES = ["10.5.0.1/16", "010.5.0.0/16", "10.5.0.0/016", "10.5.0.0", "10.5.0.0/33", "10.5.0.256/24",
             "\u0661\u0660.5.0.0/16", "10.5.0.0/\u0661\u0666", "10.5.0.0/16,", "10.5.0.0/16,10.6.0.0/16",
             "2001:db8::/56"]
V6_VALUES = ["2001:db8::1/129", "::ffff:10.5.0.1/120", "fe80::1%eth0/64", ":1::2/64", "1::2:/64", "1:::2/64",
             "1::2:3:4:5:6:7:8/64", "1:2:3:4:5:6:7::/64", "::/0", "2001:DB8::1/64", "10.5.0.0/16"]
MTU_VALUES = ["1450", " 1450 ", "-1", "+1450", "1_450", "0x10", "\u0661\u0664\u0665\u0660"]
BOOL_VALUES = ["true", "TRUE", "True", "false", "1"]
TRICKY = {"FLANNEL_NETWORK": V4_VALUES, "FLANNEL_SUBNET": V4_VALUES, "FLANNEL_IPV6_NETWORK": V6_VALUES,
          "FLANNEL_IPV6_SUBNET": V6_VALUES, "FLANNEL_MTU": MTU_VALUES, "FLANNEL_IPMASQ": BOOL_VALUES}
ANY_VALUE = ["", " ", ",", *V4_VALUES, *V6_VALUES, *MTU_VALUES, *BOOL_VALUES]
JUNK_LINES = ["", "#", "# comment", "OTHER=1", "garbage", "FLANNEL_MTU", "FLANNEL_SUBNET", "=", "FLANNEL_IPMASQ="]


@st.composite
def perturbed_file(draw) -> str:
    """A file the daemon wrote, then changed in zero to three ways an operator, a tool or a bug might."""
    lines = [line.partition("=")[::2] for line in draw(written_env()).render().splitlines()]
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        how = draw(st.sampled_from(["drop", "repeat", "space-name", "space-value", "value", "value", "value",
                                    "cidr-ish", "junk"]))
        if not lines and how != "junk":
            continue
        if how == "drop":
            del lines[i]
        elif how == "repeat":
            lines.insert(i + 1, (lines[i][0], draw(st.sampled_from(ANY_VALUE))))
        elif how == "space-name":
            lines[i] = (draw(st.sampled_from([" ", "\t"])) + lines[i][0], lines[i][1])
        elif how == "space-value":
            lines[i] = (lines[i][0], draw(st.sampled_from([" ", "\t", "  "])) + (lines[i][1] or "") + " ")
        elif how == "value":
            fitting = TRICKY.get(lines[i][0], ANY_VALUE)
            lines[i] = (lines[i][0], draw(st.sampled_from(fitting) | st.sampled_from(ANY_VALUE)))
        elif how == "cidr-ish":
            lines[i] = (lines[i][0], draw(st.text(alphabet="0123456789abcdef:./%, ", max_size=24)))
        else:
            lines.insert(i, (draw(st.sampled_from(JUNK_LINES)), None))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return newline.join(name if value is None else f"{name}={value}" for name, value in lines) + newline


DUAL_STACK = ("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.3.1/24\nFLANNEL_IPV6_NETWORK=2001:db8::/56\n"
              "FLANNEL_IPV6_SUBNET=2001:db8:0:3::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")


@pytest.mark.parametrize("name", sorted(TRICKY))
@pytest.mark.parametrize("value", ANY_VALUE)
def test_the_two_readers_agree_on_each_tricky_value(tmp_path, name: str, value: str) -> None:
    text = "".join(f"{name}={value}\n" if line.startswith(name + "=") else line + "\n"
                   for line in DUAL_STACK.splitlines())
    assert _daemon_reads(text) == _plugin_reads(tmp_path / "subnet.env", text)


def test_the_two_readers_agree_on_every_file(tmp_path) -> None:
    outcomes: collections.Counter[str] = collections.Counter()

    @settings(max_examples=600, deadline=None, database=None)
    @given(perturbed_file())
    def agree(text: str) -> None:
        daemon, cni = _daemon_reads(text), _plugin_reads(tmp_path / "subnet.env", text)
        assert daemon == cni, text
        outcomes["accepted" if daemon is not None else "rejected"] += 1

    agree()
    # most examples are files both readers accept and compare field by field, and many are refused
    assert outcomes["accepted"] > 0.5 * sum(outcomes.values()) and outcomes["rejected"] > 50, outcomes
