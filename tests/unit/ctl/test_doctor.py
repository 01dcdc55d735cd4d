"""doctor.diagnose: pure comparison of subnet.env, leases and a kernel view."""

from __future__ import annotations

import dataclasses
import ipaddress

from flanneld.ctl import doctor
from flanneld.dataplane.firewall import FamilyRules, FirewallSpec, iptables_rules
from flanneld.model.config import parse_config
from flanneld.model.subnetenv import SubnetEnv
from flanneld.plan.state import Fdb, Neigh, ObservedLink, Route
from tests.unit.listings import listing

CONFIG = parse_config('{"Network": "198.18.0.0/16", "Backend": {"Type": "vxlan"}}')
OWN_MAC, PEER_MAC = "0e:aa:00:00:00:01", "0e:bb:00:00:00:02"
OWN_VALUE = ('{"PublicIP":"198.51.100.11","PublicIPv6":null,"BackendType":"vxlan",'
             f'"BackendData":{{"VNI":1,"VtepMAC":"{OWN_MAC}"}}}}')
PEER_VALUE = ('{"PublicIP":"198.51.100.12","PublicIPv6":null,"BackendType":"vxlan",'
              f'"BackendData":{{"VNI":1,"VtepMAC":"{PEER_MAC}"}}}}')
ENV = SubnetEnv((ipaddress.ip_network("198.18.0.0/16"),), ipaddress.ip_interface("198.18.1.1/24"), mtu=1450)
PEER_ROUTE = Route("198.18.2.0/24", "198.18.2.0", "flannel.1", onlink=True)


def firewall_listing(masq: bool = False, random_fully: bool = True) -> dict[str, str]:
    spec = FirewallSpec((FamilyRules(ipaddress.ip_network("198.18.0.0/16"), ipaddress.ip_network("198.18.1.0/24")),),
                        masq=masq, forward=True, random_fully=random_fully)
    out: dict[str, list[str]] = {"iptables-4 nat": [], "iptables-4 filter": []}
    for chain in iptables_rules(spec, spec.families[0]):
        if chain.rules:
            out[f"iptables-4 {chain.table}"] += [chain.jump, *chain.rules]
    return {k: "\n".join(v) for k, v in out.items()}


def healthy_kernel() -> doctor.KernelView:
    eth = ObservedLink("eth0", 2, "veth", 1500, "02:00:00:00:00:0b", True)
    vxlan = ObservedLink("flannel.1", 5, "vxlan", 1450, OWN_MAC, True,
                            {"IFLA_VXLAN_ID": 1, "IFLA_VXLAN_LOCAL": "198.51.100.11", "IFLA_VXLAN_LINK": 2,
                             "IFLA_VXLAN_PORT": 8472})
    return doctor.KernelView(
        links={"eth0": eth, "flannel.1": vxlan},
        addresses={2: [("198.51.100.11", 24, 0)], 5: [("198.18.1.0", 32, 0)]},
        neighs={Neigh("flannel.1", "198.18.2.0", PEER_MAC)},
        fdbs={Fdb("flannel.1", PEER_MAC, "198.51.100.12")},
        routes={PEER_ROUTE},
        firewall=firewall_listing(),
    )


def inputs(kernel=None, env=ENV, leases=None, ttl=80000) -> doctor.Inputs:
    leases = leases or listing(("198.18.1.0-24", OWN_VALUE, 7), ("198.18.2.0-24", PEER_VALUE, 8))
    return doctor.Inputs(CONFIG, env, "" if env else "/run/flannel/subnet.env does not exist", leases,
                         {7: ttl, 8: ttl}, kernel or healthy_kernel())


def problems(findings):
    return [(f.area, f.text) for f in findings if f.level == doctor.PROBLEM]


def test_a_consistent_node_is_healthy():
    findings = doctor.diagnose(inputs())
    assert problems(findings) == [] and doctor.healthy(findings)
    assert {f.area for f in findings} == {"subnet.env", "lease", "device", "peers", "firewall"}


def test_a_deleted_route_is_named():
    kernel = healthy_kernel()
    kernel.routes.clear()
    assert problems(doctor.diagnose(inputs(kernel))) == [
        ("route", "missing route 198.18.2.0/24 via 198.18.2.0 dev flannel.1 onlink")]


def test_stale_and_wrong_entries():
    kernel = healthy_kernel()
    kernel.neighs = {Neigh("flannel.1", "198.18.2.0", "0e:00:00:00:00:99"), Neigh("flannel.1", "198.18.9.0", PEER_MAC)}
    kernel.fdbs.add(Fdb("flannel.1", "0e:00:00:00:00:99", "198.51.100.99"))
    found = problems(doctor.diagnose(inputs(kernel)))
    assert ("neighbour", "wrong neighbour 198.18.2.0 lladdr 0e:00:00:00:00:99 dev flannel.1, expected 198.18.2.0 "
                         f"lladdr {PEER_MAC} dev flannel.1") in found
    assert ("neighbour", f"stale neighbour 198.18.9.0 lladdr {PEER_MAC} dev flannel.1 (no lease wants it)") in found
    assert ("fdb", "stale fdb 0e:00:00:00:00:99 dst 198.51.100.99 dev flannel.1 (no lease wants it)") in found


def test_device_mismatches():
    kernel = healthy_kernel()
    link = kernel.links["flannel.1"]
    kernel.links["flannel.1"] = dataclasses.replace(link, mtu=1400, up=False, mac="0e:cc:00:00:00:01",
                                                    data={**link.data, "IFLA_VXLAN_PORT": 4789})
    kernel.addresses[5] = []
    texts = [t for _, t in problems(doctor.diagnose(inputs(kernel)))]
    assert "flannel.1 MTU 1400, expected 1450" in texts
    assert "flannel.1 is down" in texts
    assert "flannel.1 UDP port 4789, expected 8472" in texts
    assert "flannel.1 lacks address 198.18.1.0/32" in texts
    assert any("publishes VtepMAC 0e:aa:00:00:00:01" in t for t in texts)
    del kernel.links["flannel.1"]
    assert ("device", "flannel.1 is missing") in problems(doctor.diagnose(inputs(kernel)))


def test_missing_env_lease_and_expiry():
    assert problems(doctor.diagnose(inputs(env=None))) == [
        ("subnet.env", "/run/flannel/subnet.env does not exist")]
    alone = listing(("198.18.2.0-24", PEER_VALUE, 8))
    assert problems(doctor.diagnose(inputs(leases=alone)))[0][1].startswith(
        "no lease in etcd for this node's subnet 198.18.1.0/24")
    assert ("lease", "lease 198.18.1.0-24 has expired or its etcd lease is gone") in problems(
        doctor.diagnose(inputs(ttl=-1)))
    wrong_mtu = dataclasses.replace(ENV, mtu=1500)
    assert ("subnet.env", "FLANNEL_MTU is 1500 but the VXLAN MTU is 1450") in problems(
        doctor.diagnose(inputs(env=wrong_mtu)))


def test_firewall_rules_missing_and_random_fully_spelling():
    kernel = healthy_kernel()
    kernel.firewall["iptables-4 filter"] = ""
    found = problems(doctor.diagnose(inputs(kernel)))
    assert found and all(area == "firewall" and "iptables IPv4 filter: missing rule" in text for area, text in found)
    # --ip-masq on a host whose iptables cannot do --random-fully: the same rules, still healthy
    kernel.firewall = firewall_listing(masq=True, random_fully=False)
    masq_env = dataclasses.replace(ENV, ipmasq=True)
    assert "--random-fully" not in kernel.firewall["iptables-4 nat"] and "MASQUERADE" in kernel.firewall[
        "iptables-4 nat"]
    assert problems(doctor.diagnose(inputs(kernel, env=masq_env))) == []
    kernel.firewall = firewall_listing()
    assert problems(doctor.diagnose(inputs(kernel, env=masq_env)))[0][1].startswith("iptables IPv4 nat: missing rule")


def test_a_blackhole_route_for_our_subnet_is_expected_not_stale():
    kernel = healthy_kernel()
    kernel.routes.add(Route("198.18.1.0/24", blackhole=True, metric=4000))
    assert problems(doctor.diagnose(inputs(kernel))) == []
    kernel.routes.add(Route("198.18.7.0/24", blackhole=True, metric=4000))
    assert ("route", "stale route blackhole 198.18.7.0/24 metric 4000 (no lease wants it)") in problems(
        doctor.diagnose(inputs(kernel)))


def test_a_pod_bridge_still_on_a_subnet_we_no_longer_hold_is_a_problem_until_cleaned():
    kernel = healthy_kernel()
    kernel.links["cni0"] = ObservedLink("cni0", 9, "bridge", 1450, "02:00:00:00:00:99", True)
    kernel.addresses[9] = [("198.18.1.1", 24, 0)]  # the gateway of our subnet: fine
    assert problems(doctor.diagnose(inputs(kernel))) == []
    kernel.addresses[9].append(("198.18.5.1", 24, 0))  # the subnet we held before it moved
    kernel.addresses[9].append(("203.0.113.1", 24, 0))  # not the flannel network's: none of our business
    assert problems(doctor.diagnose(inputs(kernel))) == [(
        "pods", "bridge cni0 holds 198.18.5.1/24, not in our subnet 198.18.1.0/24: pods started before our subnet "
        "moved cannot reach the overlay, and the bridge plugin refuses new pods until it is gone; delete those "
        "pods, then ip addr del 198.18.5.1/24 dev cni0")]
