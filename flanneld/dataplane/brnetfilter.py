"""Whether bridged pod traffic goes through iptables (br_netfilter), which Kubernetes Services need.

With a bridge-based CNI (flannel's delegates to the bridge plugin), pods on one node talk over the
bridge: without br_netfilter (or with ``net.bridge.bridge-nf-call-iptables`` at 0) those packets
never meet iptables, and kube-proxy's Service rules silently do nothing for them (upstream #2068).
Upstream refused to start for it once and then stopped (#2254): here it is one warning, a doctor
finding and a metric, never a refusal. The setting is per network namespace.
"""

from __future__ import annotations

SYSCTL = "/proc/sys/net/bridge/bridge-nf-call-{tool}"
TOOLS = {4: "iptables", 6: "ip6tables"}


def bridge_calls_iptables(version: int) -> bool | None:
    """True/False as the namespace's sysctl says; None when br_netfilter is not loaded."""
    try:
        with open(SYSCTL.format(tool=TOOLS[version])) as fh:
            return fh.read().strip() == "1"
    except FileNotFoundError:
        return None


def problem(version: int, state: bool | None) -> str:
    """What is wrong, in one line with what to do ('' when nothing is)."""
    if state:
        return ""
    name = f"net.bridge.bridge-nf-call-{TOOLS[version]}"
    why = "br_netfilter is not loaded" if state is None else f"{name} is 0"
    return (f"{why}: traffic between pods on one node's bridge bypasses {TOOLS[version]}, and Kubernetes "
            f"Services break for it; modprobe br_netfilter && sysctl -w {name}=1")
