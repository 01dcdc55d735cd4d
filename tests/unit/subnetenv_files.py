"""subnet.env files for property tests: what the daemon writes, and such files perturbed in the
ways an operator, a tool or a bug might (most still valid, so tests reach their property)."""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from flanneld.model import subnetenv
from flanneld.model.lease import Lease

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


V4_VALUES = ["10.5.0.1/16", "010.5.0.0/16", "10.5.0.0/016", "10.5.0.0", "10.5.0.0/33", "10.5.0.256/24",
             "\u0661\u0660.5.0.0/16", "10.5.0.0/\u0661\u0666", "10.5.0.0/16,", "10.5.0.0/16,10.6.0.0/16",
             "2001:db8::/56"]
V6_VALUES = ["2001:db8::1/129", "::ffff:10.5.0.1/120", "fe80::1%eth0/64", ":1::2/64", "1::2:/64", "1:::2/64",
             "1::2:3:4:5:6:7:8/64", "1:2:3:4:5:6:7::/64", "::/0", "2001:DB8::1/64", "10.5.0.0/16"]
MTU_VALUES = ["1450", " 1450 ", "-1", "+1450", "1_450", "0x10", "\u0661\u0664\u0665\u0660", "0", "67", "68",
              "65535", "65536"]
BOOL_VALUES = ["true", "TRUE", "True", "false", "1", "maybe", ""]
TRICKY = {"FLANNEL_NETWORK": V4_VALUES, "FLANNEL_SUBNET": V4_VALUES, "FLANNEL_IPV6_NETWORK": V6_VALUES,
          "FLANNEL_IPV6_SUBNET": V6_VALUES, "FLANNEL_MTU": MTU_VALUES, "FLANNEL_IPMASQ": BOOL_VALUES}
ANY_VALUE = ["", " ", ",", *V4_VALUES, *V6_VALUES, *MTU_VALUES, *BOOL_VALUES]
JUNK_LINES = ["", "#", "# comment", "OTHER=1", "garbage", "FLANNEL_MTU", "FLANNEL_SUBNET", "=", "FLANNEL_IPMASQ="]


@st.composite
def perturbed_file(draw) -> str:
    """A file the daemon wrote, then changed in zero to two ways an operator, a tool or a bug might."""
    lines = [line.partition("=")[::2] for line in draw(written_env()).render().splitlines()]
    for _ in range(draw(st.integers(0, 2))):
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


