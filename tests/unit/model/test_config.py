"""Network config parsing: upstream defaults, every validation rule, and fuzzing."""

import collections
import contextlib
import ipaddress
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flanneld.model.config import ConfigError, parse_config


def cfg(**doc):
    return parse_config(json.dumps(doc))


def test_upstream_example_defaults():
    c = cfg(Network="10.3.0.0/16")
    assert c.ipv4.subnet_len == 24
    assert str(c.ipv4.subnet_min) == "10.3.1.0"
    assert str(c.ipv4.subnet_max) == "10.3.255.0"
    assert c.ipv6 is None and not c.enable_nftables


@pytest.mark.parametrize(
    ("network", "subnet_len"),
    [("10.0.0.0/8", 24), ("10.3.0.0/22", 24), ("10.3.0.0/23", 25), ("10.3.0.0/26", 28), ("10.3.0.0/28", 30)],
)
def test_default_subnet_len(network, subnet_len):
    assert cfg(Network=network).ipv4.subnet_len == subnet_len


def test_network_too_small():
    with pytest.raises(ConfigError, match=r"network is too small. Minimum useful network prefix is /28"):
        cfg(Network="10.3.0.0/29")


def test_subnet_len_limits():
    with pytest.raises(ConfigError, match="SubnetLen must be less than /31"):
        cfg(Network="10.3.0.0/16", SubnetLen=31)
    with pytest.raises(ConfigError, match="at least four subnets"):
        cfg(Network="10.3.0.0/16", SubnetLen=17)
    assert cfg(Network="10.3.0.0/16", SubnetLen=18).ipv4.subnet_len == 18


def test_subnet_min_max_rules():
    c = cfg(Network="10.3.0.0/16", SubnetMin="10.3.10.0", SubnetMax="10.3.20.0")
    assert (str(c.ipv4.subnet_min), str(c.ipv4.subnet_max)) == ("10.3.10.0", "10.3.20.0")
    assert c.ipv4.subnet_count() == 11
    with pytest.raises(ConfigError, match="SubnetMin is not in the range of the Network"):
        cfg(Network="10.3.0.0/16", SubnetMin="10.4.0.0")
    with pytest.raises(ConfigError, match="SubnetMax is not in the range of the Network"):
        cfg(Network="10.3.0.0/16", SubnetMax="10.4.0.0")
    with pytest.raises(ConfigError, match=r"SubnetMin is not on a SubnetLen boundary: 10.3.1.5"):
        cfg(Network="10.3.0.0/16", SubnetMin="10.3.1.5")
    with pytest.raises(ConfigError, match="SubnetMax is not on a SubnetLen boundary"):
        cfg(Network="10.3.0.0/16", SubnetMax="10.3.1.128")
    with pytest.raises(ConfigError, match=r"SubnetMin \(10.3.9.0\) is greater than SubnetMax"):
        cfg(Network="10.3.0.0/16", SubnetMin="10.3.9.0", SubnetMax="10.3.8.0")
    with pytest.raises(ConfigError, match="SubnetMin is not a valid IP address"):
        cfg(Network="10.3.0.0/16", SubnetMin="ten")


def test_network_required_and_valid():
    with pytest.raises(ConfigError, match="please define a correct Network parameter"):
        cfg(Backend={"Type": "vxlan"})
    with pytest.raises(ConfigError, match="Network is not a valid CIDR"):
        cfg(Network="10.3.0.0/40")
    with pytest.raises(ConfigError, match="missing prefix length"):
        cfg(Network="10.3.0.0")
    with pytest.raises(ConfigError, match="must be an IPv4 network"):
        cfg(Network="2001:db8::/56")
    with pytest.raises(ConfigError, match="Network must be a CIDR string, got 42"):
        cfg(Network=42)
    # host bits are masked, as upstream's net.ParseCIDR does
    assert cfg(Network="10.3.7.9/16").ipv4.network == ipaddress.ip_network("10.3.0.0/16")


def test_keys_are_case_insensitive_and_unknown_keys_ignored():
    c = parse_config('{"network": "10.5.0.0/16", "SUBNETLEN": 26, "backend": {"type": "VXLAN", "vni": 7},'
                     ' "SomethingNew": [1, 2]}')
    assert c.ipv4.subnet_len == 26
    assert c.backend.type == "vxlan"
    assert c.backend.get("VNI") == 7
    assert c.backend.get("Port", 0) == 0


def test_null_means_unset():
    c = cfg(Network="10.5.0.0/16", SubnetLen=None, SubnetMin=None, EnableIPv6=None, Backend=None)
    assert c.ipv4.subnet_len == 24 and not c.enable_ipv6 and c.backend.type == "vxlan"


def test_backend_defaults_to_vxlan():
    assert cfg(Network="10.5.0.0/16").backend.type == "vxlan"
    assert cfg(Network="10.5.0.0/16", Backend={"VNI": 2}).backend.type == "vxlan"
    assert cfg(Network="10.5.0.0/16", Backend={"Type": "host-gw"}).backend.type == "host-gw"
    with pytest.raises(ConfigError, match="Backend must be a JSON object"):
        cfg(Network="10.5.0.0/16", Backend="vxlan")
    with pytest.raises(ConfigError, match=r"Backend.Type must be a string"):
        cfg(Network="10.5.0.0/16", Backend={"Type": 1})


def test_flags_types():
    with pytest.raises(ConfigError, match='EnableIPv6 must be true or false, got "yes"'):
        cfg(Network="10.5.0.0/16", EnableIPv6="yes")
    with pytest.raises(ConfigError, match="SubnetLen must be a non-negative integer"):
        cfg(Network="10.5.0.0/16", SubnetLen=24.5)
    with pytest.raises(ConfigError, match="SubnetLen must be a non-negative integer"):
        cfg(Network="10.5.0.0/16", SubnetLen=True)
    with pytest.raises(ConfigError, match="both false"):
        cfg(EnableIPv4=False)


def test_ipv6_rules():
    c = cfg(EnableIPv6=True, Network="10.5.0.0/16", IPv6Network="2001:db8:1800::/56")
    assert c.ipv6.subnet_len == 64
    assert str(c.ipv6.subnet_min) == "2001:db8:1800:1::"
    assert str(c.ipv6.subnet_max) == "2001:db8:1800:ff::"
    assert cfg(EnableIPv6=True, EnableIPv4=False, IPv6Network="fd00::/120").ipv6.subnet_len == 122
    with pytest.raises(ConfigError, match=r"IPv6Network is too small. Minimum useful network prefix is /124"):
        cfg(EnableIPv6=True, EnableIPv4=False, IPv6Network="fd00::/125")
    with pytest.raises(ConfigError, match="please define a correct IPv6Network"):
        cfg(EnableIPv6=True, Network="10.5.0.0/16")
    with pytest.raises(ConfigError, match="IPv6SubnetMin is not on a SubnetLen boundary"):
        cfg(EnableIPv6=True, EnableIPv4=False, IPv6Network="fd00::/56", IPv6SubnetMin="fd00:0:0:1::1")
    with pytest.raises(ConfigError, match="SubnetLen must be less than /127"):
        cfg(EnableIPv6=True, EnableIPv4=False, IPv6Network="fd00::/56", IPv6SubnetLen=127)


def test_fits():
    fam = cfg(Network="10.5.0.0/16", SubnetMin="10.5.10.0", SubnetMax="10.5.20.0").ipv4
    assert fam.fits(ipaddress.ip_network("10.5.10.0/24"))
    assert not fam.fits(ipaddress.ip_network("10.5.9.0/24"))
    assert not fam.fits(ipaddress.ip_network("10.5.10.0/25"))
    assert not fam.fits(None)


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '"x"', '{"Network": "10.0.0.0/8",}', b"\xff\xfe"])
def test_malformed_documents(text):
    with pytest.raises(ConfigError):
        parse_config(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
interesting = st.sampled_from(
    ["Network", "network", "SubnetLen", "SubnetMin", "SubnetMax", "EnableIPv4", "EnableIPv6", "IPv6Network",
     "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax", "Backend", "EnableNFTables"]
)
plausible = st.one_of(
    json_values,
    st.sampled_from(["10.0.0.0/8", "10.5.0.0/16", "10.5.0.0/29", "10.5.1.0", "fd00::/56", "fd00::1", "::/0",
                     "0.0.0.0/0", "255.255.255.255/32", 0, 16, 24, 30, 31, 64, 124, 128]),
)


@st.composite
def valid_document(draw) -> dict:
    """A config upstream would take: IPv4, IPv6 or both, with or without ranges and a backend."""
    doc: dict = {}
    v4, v6 = draw(st.sampled_from([(True, False), (False, True), (True, True)]))
    if v4:
        prefix = draw(st.integers(8, 22))
        net = ipaddress.IPv4Network((draw(st.integers(0, 2**32 - 1)), prefix), strict=False)
        doc["Network"] = str(net)
        if draw(st.booleans()):
            length = draw(st.integers(prefix + 2, 28))
            doc["SubnetLen"] = length
            subnets = 2 ** (length - prefix)
            low = draw(st.integers(1, subnets - 2))
            if draw(st.booleans()):
                doc["SubnetMin"] = str(net.network_address + low * 2 ** (32 - length))
                doc["SubnetMax"] = str(net.network_address + draw(st.integers(low, subnets - 2)) * 2 ** (32 - length))
    else:
        doc["EnableIPv4"] = False
    if v6:
        prefix6 = draw(st.integers(32, 60))
        doc["EnableIPv6"] = True
        doc["IPv6Network"] = str(ipaddress.IPv6Network((draw(st.integers(0, 2**128 - 1)), prefix6), strict=False))
        if draw(st.booleans()):
            doc["IPv6SubnetLen"] = draw(st.integers(prefix6 + 2, 64))
    if draw(st.booleans()):
        doc["Backend"] = {"Type": draw(st.sampled_from(["vxlan", "host-gw", "alloc"]))}
    return doc


@st.composite
def mutated_document(draw) -> dict:
    doc = draw(valid_document())
    for _ in range(draw(st.integers(0, 2))):
        how = draw(st.sampled_from(["value", "drop", "case", "add", "other-valid"]))
        if not doc:
            break
        key = draw(st.sampled_from(sorted(doc)))
        if how == "value":
            doc[key] = draw(plausible)
        elif how == "drop":
            del doc[key]
        elif how == "case":
            doc[key.lower()] = doc.pop(key)  # Go matches names case-insensitively
        elif how == "other-valid":
            doc.update({k: v for k, v in draw(valid_document()).items() if k == key})
        else:
            doc[draw(interesting)] = draw(plausible)
    return doc


def test_fuzzed_documents_parse_to_a_consistent_config_or_raise_config_error() -> None:
    outcomes: collections.Counter[str] = collections.Counter()

    @settings(max_examples=400, deadline=None, database=None)
    @given(st.integers(1, 10).flatmap(lambda n: st.dictionaries(interesting, plausible, max_size=8) if n == 1
                                      else mutated_document()))  # 1 in 10 made of nothing valid
    def consistent(doc: dict) -> None:
        try:
            result = parse_config(json.dumps(doc))
        except ConfigError as exc:
            assert str(exc)
            outcomes["refused"] += 1
            return
        for fam in result.families():
            assert fam.network.prefixlen + 2 <= fam.subnet_len <= fam.network.max_prefixlen
            assert fam.subnet_min <= fam.subnet_max
            for edge in (fam.subnet_min, fam.subnet_max):
                assert edge in fam.network and int(edge) % 2 ** (fam.network.max_prefixlen - fam.subnet_len) == 0
        outcomes["parsed"] += 1

    consistent()
    assert outcomes["parsed"] > 0.5 * sum(outcomes.values()) and outcomes["refused"] > 40, outcomes


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_fuzz_arbitrary_input_only_raises_config_error(data):
    with contextlib.suppress(ConfigError):
        parse_config(data)


def test_misfit_names_what_departs_from_the_config():
    fam = parse_config('{"Network": "10.5.0.0/16", "SubnetMax": "10.5.200.0"}').ipv4
    assert fam.misfit(ipaddress.ip_network("10.5.7.0/24")) == ""
    assert fam.misfit(ipaddress.ip_network("10.5.16.0/20")) == "it is a /20 but the network config's SubnetLen is 24"
    assert fam.misfit(ipaddress.ip_network("10.5.201.0/24")) == ""  # outside SubnetMax: ordinary, no warning


def test_config_monitor_verdicts():
    from flanneld.node.config_monitor import judge

    running = parse_config('{"Network": "10.5.0.0/16"}')
    ok = lambda c: None  # noqa: E731
    assert judge(running, b'{"network": "10.5.0.0/16"}', ok) == ""  # same config, other spelling
    assert "is now invalid (network config is not valid JSON" in judge(running, b"{", ok)
    assert "keeps running with the config it started with" in judge(running, b"{", ok)
    assert "changed;" in judge(running, b'{"Network": "10.6.0.0/16"}', ok)
    assert "was deleted" in judge(running, None, ok)

    def refuse(_c):
        raise ConfigError("backend type 'udp' is not supported")
    assert "is now invalid (backend type 'udp' is not supported)" in judge(running, b'{"Network": "10.5.0.0/16"}',
                                                                          refuse)


def test_nested_config_objects_match_field_names_in_any_case():
    cfg = parse_config('{"Network": "10.5.0.0/16", "backend": {"type": "VXLAN", "vni": 4, "Extra": {"inner": 1}}}')
    assert cfg.backend.type == "vxlan" and cfg.backend.get("VNI") == 4
    assert cfg.backend.get("extra").get("INNER") == 1


def test_a_field_named_twice_in_different_cases_takes_the_last_as_go_does():
    """Go sets the field for every key that names it, in document order: upstream runs host-gw here."""
    cfg = parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan", "type": "host-gw"}}')
    assert cfg.backend.type == "host-gw"
    assert parse_config('{"network": "10.6.0.0/16", "Network": "10.5.0.0/16"}').ipv4.network.exploded == "10.5.0.0/16"
    assert parse_config('{"Network": "10.5.0.0/16", "network": "10.6.0.0/16"}').ipv4.network.exploded == "10.6.0.0/16"


@pytest.mark.parametrize("subnet", ["198.18.0.0/24", "198.18.255.248/29", "198.18.0.0/16", "198.19.0.0/24",
                                    "198.0.0.0/8", "198.17.255.0/24", "2001:db8:1800::/64", "0.0.0.0/0"])
def test_contains_agrees_with_ipaddress_subnet_of(subnet):
    fc = parse_config('{"Network": "198.18.0.0/16"}').ipv4
    six = parse_config('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "2001:db8:1800::/56"}').ipv6
    net = ipaddress.ip_network(subnet)
    for family in (fc, six):
        expected = net.version == family.network.version and net.subnet_of(family.network)
        assert family.contains(net) is expected
