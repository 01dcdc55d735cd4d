"""The CNI plugin's pure parts and its error handling (run as a process, no root needed)."""

import collections
import ipaddress
import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flanneld.cni import plugin

PLUGIN = plugin.__file__

FENV = {"networks": ["198.18.0.0/16"], "ipv6_networks": [], "subnet": "198.18.53.0/24", "ipv6_subnet": None,
        "mtu": 1450, "ipmasq": False}


def test_delegate_is_byte_identical_to_upstreams():
    conf = {"cniVersion": "0.3.1", "name": "cbr0", "type": "flannel",
            "delegate": {"hairpinMode": True, "isDefaultGateway": True}}
    assert plugin.dumps(plugin.build_delegate(conf, FENV)) == (
        '{"cniVersion":"0.3.1","hairpinMode":true,"ipMasq":true,"ipam":{"ranges":[[{"subnet":"198.18.53.0/24"}]],'
        '"routes":[{"dst":"198.18.0.0/16"}],"type":"host-local"},"isDefaultGateway":true,"isGateway":true,'
        '"mtu":1450,"name":"cbr0","type":"bridge"}')


def test_delegate_defaults_and_overrides():
    fenv = {**FENV, "ipv6_networks": ["2001:db8:1800::/56"], "ipv6_subnet": "2001:db8:1800:5::/64", "ipmasq": True}
    conf = {"cniVersion": "1.0.0", "name": "net", "ipam": {"routes": [{"dst": "203.0.113.0/24"}], "dataDir": "/x"},
            "delegate": {"type": "ipvlan", "mtu": 1400}, "runtimeConfig": {"portMappings": []}}
    d = plugin.build_delegate(conf, fenv)
    assert d["type"] == "ipvlan" and "isGateway" not in d and d["mtu"] == 1400 and d["ipMasq"] is False
    assert d["ipam"] == {"type": "host-local", "dataDir": "/x",
                         "ranges": [[{"subnet": "198.18.53.0/24"}], [{"subnet": "2001:db8:1800:5::/64"}]],
                         "routes": [{"dst": "203.0.113.0/24"}, {"dst": "198.18.0.0/16"},
                                    {"dst": "2001:db8:1800::/56"}]}
    assert d["runtimeConfig"] == {"portMappings": []} and d["name"] == "net"


@pytest.mark.parametrize(("delegate", "message"), [
    ({"name": "x"}, "must not have 'name' field"),
    ({"ipam": {}}, "must not have 'ipam' field"),
    ({"type": 3}, "must have (string) 'type' field"),
    ([], "'delegate' must be a JSON object"),
])
def test_bad_delegates(delegate, message):
    with pytest.raises(plugin.CniError) as info:
        plugin.build_delegate({"name": "cbr0", "delegate": delegate}, FENV)
    assert info.value.code == 7 and message in info.value.msg


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=15),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_json_codec_agrees_with_the_stdlib(value):
    text = plugin.dumps(value)
    assert plugin.loads(text) == json.loads(text) == value
    assert plugin.loads(json.dumps(value, indent=2)) == value


def _reject_constant(name):
    raise ValueError(name)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_json_rejects_what_the_stdlib_rejects(text):
    """Same verdicts as the stdlib, except NaN/Infinity, which Go (and so CNI) rejects too."""
    try:
        expected = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        with pytest.raises(ValueError):
            plugin.loads(text)
    else:
        assert plugin.loads(text) == expected


def test_html_characters_are_escaped_like_go():
    assert plugin.dumps({"a": "<b>&"}) == '{"a":"\\u003cb\\u003e\\u0026"}'


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_network_v4(addr, plen):
    text = f"{ipaddress.IPv4Address(addr)}/{plen}"
    assert plugin._network(text) == str(ipaddress.ip_network(text, strict=False))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**128 - 1), st.integers(0, 128), st.booleans())
def test_network_v6(addr, plen, exploded):
    ip = ipaddress.IPv6Address(addr)
    text = f"{ip.exploded if exploded else ip}/{plen}"
    assert plugin._network(text) == str(ipaddress.ip_network(text, strict=False))


@pytest.mark.parametrize("bad", ["10.0.0.1", "10.0.0.256/24", "10.0.0.1/33", "fe80::1::2/64", "zz::/64", "x/8"])
def test_network_rejects_garbage(bad):
    with pytest.raises(ValueError):
        plugin._network(bad)


def run(env, stdin):
    full = {"PATH": os.environ["PATH"], **env}
    proc = subprocess.run([sys.executable, "-I", "-S", PLUGIN], input=stdin, capture_output=True, text=True,
                          env=full, timeout=30)
    return proc.returncode, proc.stdout, proc.stderr


ADD_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/none", "CNI_IFNAME": "eth0",
           "CNI_PATH": "/usr/lib/cni"}


@pytest.mark.parametrize(("env", "stdin", "code", "message"), [
    (ADD_ENV, "{not json", 6, "failed to decode the network config"),
    (ADD_ENV, "[1]", 6, "must be a JSON object"),
    ({**ADD_ENV, "CNI_CONTAINERID": ""}, '{"name":"cbr0"}', 4, "CNI_CONTAINERID"),
    ({"CNI_COMMAND": "ADD"}, '{"name":"cbr0"}', 4, "[CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME,CNI_PATH] missing"),
    ({**ADD_ENV, "CNI_CONTAINERID": "../etc"}, '{"name":"cbr0"}', 4, "invalid characters in CNI_CONTAINERID"),
    ({**ADD_ENV, "CNI_IFNAME": "a/b"}, '{"name":"cbr0"}', 4, "invalid CNI_IFNAME"),
    ({**ADD_ENV, "CNI_COMMAND": "FROB"}, '{"name":"cbr0"}', 4, "unknown CNI_COMMAND"),
    (ADD_ENV, '{"cniVersion":"9.9.9","name":"cbr0"}', 1, "incompatible CNI versions"),
    (ADD_ENV, '{"cniVersion":"0.3.1"}', 7, "missing or invalid network name"),
    (ADD_ENV, '{"cniVersion":"0.3.1","name":"cbr0","subnetFile":"/nonexistent/subnet.env"}', 11,
     "/nonexistent/subnet.env does not exist: flanneld is not running or not ready on this node"),
    ({**ADD_ENV, "CNI_COMMAND": "CHECK"}, '{"cniVersion":"0.3.1","name":"cbr0"}', 1, "does not allow CHECK"),
    ({**ADD_ENV, "CNI_COMMAND": "STATUS"}, '{"cniVersion":"1.0.0","name":"cbr0"}', 1, "does not allow STATUS"),
])
def test_errors_are_cni_error_objects(env, stdin, code, message, tmp_path):
    rc, out, err = run(env, stdin)
    assert rc == 1, err
    body = json.loads(out)
    assert body["code"] == code and message in body["msg"], body
    assert "Traceback" not in out + err


GOOD_ENV = "FLANNEL_NETWORK=198.18.0.0/16\nFLANNEL_SUBNET=198.18.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"


@pytest.mark.parametrize(("line", "message"), [
    ("FLANNEL_MTU=-1", "FLANNEL_MTU must be a number in 68..65535, got '-1'"),
    ("FLANNEL_MTU=1_450", "FLANNEL_MTU must be a number in 68..65535, got '1_450'"),
    ("FLANNEL_IPMASQ=maybe", "FLANNEL_IPMASQ must be true or false, got 'maybe'"),  # upstream: false, silently
])
def test_a_subnet_env_value_no_daemon_writes_is_refused_naming_it(tmp_path, line, message):
    env_file = tmp_path / "subnet.env"
    env_file.write_text(GOOD_ENV + line + "\n")
    conf = json.dumps({"cniVersion": "1.1.0", "name": "cbr0", "subnetFile": str(env_file)})
    rc, out, _ = run(ADD_ENV, conf)
    body = json.loads(out)
    assert rc == 1 and body["code"] == 7 and message in body["msg"] and str(env_file) in body["msg"], body


def test_version_and_about():
    rc, out, _ = run({"CNI_COMMAND": "VERSION"}, '{"cniVersion":"1.1.0"}')
    assert rc == 0 and json.loads(out) == {"cniVersion": "1.1.0", "supportedVersions": list(plugin.SUPPORTED_VERSIONS)}
    rc, out, err = run({}, "")
    assert rc == 0 and out == "" and "flannel CNI plugin" in err


def test_status_before_flanneld_is_ready(tmp_path):
    conf = json.dumps({"cniVersion": "1.1.0", "name": "cbr0", "subnetFile": str(tmp_path / "subnet.env")})
    rc, out, _ = run({"CNI_COMMAND": "STATUS", "CNI_PATH": "/usr/lib/cni"}, conf)
    body = json.loads(out)
    assert rc == 1 and body["code"] == 50 and "flannel is not ready" in body["msg"]
    assert "check flanneld on the node" in body["details"]


def _loaded_modules(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-I", "-S", "-c", f"{code}\nimport sys\nprint(*sys.modules)"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_plugin_loads_nothing_beyond_the_interpreters_own_start_up_and_json():
    """Every module imported here is paid for on every pod; `os` alone costs ~2 ms."""
    baseline = _loaded_modules("pass")
    loaded = _loaded_modules(f"import sys\nsys.path.insert(0, {os.path.dirname(PLUGIN)!r})\nimport plugin")
    assert loaded - baseline == {"plugin", "_json"}


def test_state_directories_are_created_with_parents_and_mode_0700(tmp_path):
    data_dir = str(tmp_path / "var" / "lib" / "flannel")
    plugin.save_state(data_dir, "c1", "eth0", b"{}")
    plugin.save_state(data_dir, "c2", "net1", b"{}")  # everything exists now
    for path in (tmp_path / "var", tmp_path / "var" / "lib", tmp_path / "var" / "lib" / "flannel"):
        assert path.stat().st_mode & 0o777 == 0o700
    assert plugin.load_state(data_dir, "c1") == b"{}" and plugin.saved_ifname(data_dir, "c2") == "net1"
    assert (tmp_path / "var" / "lib" / "flannel" / "c1").stat().st_mode & 0o777 == 0o600
    (tmp_path / "file").write_text("")
    with pytest.raises(plugin.CniError, match="cannot save the delegate config"):
        plugin.save_state(str(tmp_path / "file" / "sub"), "c1", "eth0", b"{}")


def test_delegate_lookup_wants_an_executable_file(tmp_path):
    (tmp_path / "dir" / "bridge").mkdir(parents=True)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "bridge").write_text("")
    exe = tmp_path / "exe" / "bridge"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    path = f"{tmp_path}/dir::{tmp_path}/plain:{tmp_path}/exe/"
    assert plugin.find_plugin("bridge", path) == str(exe)
    with pytest.raises(plugin.CniError, match="not found in CNI_PATH"):
        plugin.find_plugin("bridge", f"{tmp_path}/dir:{tmp_path}/plain")


def test_a_failed_state_write_leaves_no_temporary_file(tmp_path):
    (tmp_path / "c1" / "busy").mkdir(parents=True)  # the rename onto a non-empty directory fails
    with pytest.raises(plugin.CniError, match="cannot save the delegate config"):
        plugin.save_state(str(tmp_path), "c1", "eth0", b"{}")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_removing_the_last_attachment_leaves_no_empty_ifname_directory(tmp_path):
    data_dir = str(tmp_path)
    plugin.save_state(data_dir, "c1", "eth0", b"{}")
    plugin.save_state(data_dir, "c2", "eth0", b"{}")
    plugin.remove_state(data_dir, "c1")
    assert (tmp_path / plugin.IFNAME_DIR / "c2").exists()  # others keep the directory
    plugin.remove_state(data_dir, "c2")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    plugin.remove_state(data_dir, "c2")  # idempotent
    plugin.save_state(data_dir, "c3", "net1", b"{}")  # and the next ADD makes it again
    assert plugin.saved_ifname(data_dir, "c3") == "net1"


class _Stdin:
    def __init__(self, data: bytes) -> None:
        import io

        self.buffer = io.BytesIO(data)


_json_docs = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["cniVersion", "name", "type", "delegate", "ipam", "routes", "dst", "subnetFile",
                         "dataDir", "runtimeConfig", "x"]), inner, max_size=5),
    max_leaves=15,
)


_valid_conf = st.fixed_dictionaries(
    {"cniVersion": st.sampled_from(sorted(plugin.SUPPORTED_VERSIONS)),
     "name": st.sampled_from(["cbr0", "net-1", "a.b_c"]), "type": st.just("flannel")},
    optional={
        "delegate": st.fixed_dictionaries({}, optional={"type": st.sampled_from(["bridge", "ptp"]),
                                                        "hairpinMode": st.booleans(), "isDefaultGateway": st.booleans(),
                                                        "mtu": st.integers(1280, 9000)}),
        "ipam": st.fixed_dictionaries({}, optional={"routes": st.lists(st.fixed_dictionaries(
            {"dst": st.sampled_from(["0.0.0.0/0", "203.0.113.0/24"])}), max_size=2)}),
        "runtimeConfig": st.dictionaries(st.sampled_from(["portMappings", "bandwidth"]), st.integers(), max_size=2),
        "subnetFile": st.just("/run/flannel/subnet.env"), "dataDir": st.just("/var/lib/cni/flannel"),
    })


@st.composite
def _stdin(draw) -> bytes:
    """Mostly a config a runtime would send, changed in up to two places; now and then raw bytes."""
    if draw(st.integers(1, 10)) == 1:
        return draw(st.binary(max_size=120))
    conf = draw(_valid_conf)
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(sorted(conf)))
        how = draw(st.sampled_from(["value", "drop", "nested"]))
        if how == "value":
            conf[key] = draw(_json_docs)
        elif how == "drop":
            del conf[key]
        elif isinstance(conf[key], dict) and conf[key]:
            inner = dict(conf[key])
            inner[draw(st.sampled_from(sorted(inner)))] = draw(_json_docs)
            conf[key] = inner
    return json.dumps(conf).encode()


def test_fuzzed_stdin_gives_upstreams_delegate_or_a_cni_error() -> None:
    """Whatever a runtime pipes in, the plugin answers with a CNI error object, never a traceback;
    what it accepts becomes upstream's delegate (counted: most examples get that far)."""
    fenv = {"networks": ["198.18.0.0/16"], "ipv6_networks": [], "subnet": "198.18.5.0/24", "ipv6_subnet": None,
            "mtu": 1450, "ipmasq": False}
    outcomes: collections.Counter[str] = collections.Counter()

    @settings(max_examples=400, deadline=None, database=None)
    @given(_stdin())
    def delegate_or_error(data: bytes) -> None:
        old = sys.stdin
        sys.stdin = _Stdin(data)
        try:
            conf = plugin._config()
            delegate = plugin.build_delegate(conf, fenv)
        except plugin.CniError as err:
            assert err.code in (plugin.E_DECODE, plugin.E_INVALID_CONFIG, plugin.E_INCOMPATIBLE_VERSION), err.code
            outcomes["refused"] += 1
            return
        finally:
            sys.stdin = old
        assert plugin.loads(plugin.dumps(delegate)) == delegate
        assert delegate["name"] == conf["name"] and delegate["ipam"]["ranges"] == [[{"subnet": "198.18.5.0/24"}]]
        assert delegate["ipam"]["routes"][-1] == {"dst": "198.18.0.0/16"}
        assert delegate["type"] == (conf.get("delegate") or {}).get("type", "bridge")
        outcomes["delegated"] += 1

    delegate_or_error()
    assert outcomes["delegated"] > 0.5 * sum(outcomes.values()) and outcomes["refused"] > 40, outcomes
