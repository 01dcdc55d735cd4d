"""subnet.env has one writer (the daemon's) and two readers: the daemon's (flanneld.model.subnetenv)
and the CNI plugin's own (it may import the standard library only). These tests make them one
contract: what the daemon writes the plugin reads back unchanged, the two readers accept and
reject the same files and read the same values (and raise nothing but their own errors: anything
else fails the comparison), and one constant names the default path."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given, settings

from flanneld.cni import install, plugin
from flanneld.ctl import cli as ctl_cli
from flanneld.model import subnetenv
from flanneld.node import cli as node_cli
from tests.unit.subnetenv_files import ANY_VALUE, TRICKY, perturbed_file, written_env


def _option_default(command, name: str) -> object:
    return next(p.default for p in command.params if p.name == name)


def test_one_constant_names_the_default_path() -> None:
    assert plugin.DEFAULT_SUBNET_FILE == subnetenv.DEFAULT_PATH
    assert _option_default(node_cli.flanneld_command, "subnet_file") == subnetenv.DEFAULT_PATH
    assert _option_default(ctl_cli.doctor, "subnet_file") == subnetenv.DEFAULT_PATH
    assert subnetenv.DEFAULT_PATH in next(p.help for p in install.install_command.params if p.name == "subnet_file")


def test_one_mtu_range() -> None:
    assert (plugin.MIN_MTU, plugin.MAX_MTU) == (subnetenv.MIN_MTU, subnetenv.MAX_MTU)


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


@settings(max_examples=200, deadline=None)
@given(written_env())
def test_what_the_daemon_writes_the_plugin_reads_unchanged(tmp_path_factory, env) -> None:
    path = tmp_path_factory.mktemp("env") / "subnet.env"
    subnetenv.write(str(path), env)
    assert plugin.read_subnet_env(str(path)) == _as_plugin_reads(env)


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
