"""What `flanneld cleanup` takes for flanneld's: devices by upstream's names, routes into our networks."""

from __future__ import annotations

import ipaddress

from flanneld.dataplane import nlcodec as nl
from flanneld.node.cleanup import our_devices, our_route, remove_if_empty
from flanneld.plan.state import ObservedLink

NETS = [ipaddress.ip_network("198.18.0.0/16"), ipaddress.ip_network("2001:db8:1800::/56")]


def link(name: str, kind: str | None) -> ObservedLink:
    return ObservedLink(name, 5, kind, 1450, None, True)


def test_our_devices_are_upstreams_names_of_our_kinds():
    links = [link("flannel.1", "vxlan"), link("flannel-v6.7", "vxlan"), link("flannel-wg", None),
             link("flannel-wg-v6", "wireguard"), link("flannel.1x", "vxlan"), link("cni0", "bridge"),
             link("flannel.2", "bridge"), link("eth0", "veth")]
    assert [d.name for d in our_devices(links)] == ["flannel.1", "flannel-v6.7", "flannel-wg", "flannel-wg-v6"]


def route(dst: str, protocol: int = nl.RTPROT_BOOT, oif: int | None = 2, rtype: int = nl.RTN_UNICAST,
          table: int = nl.RT_TABLE_MAIN) -> nl.RouteRecord:
    net = ipaddress.ip_network(dst)
    family = nl.AF_INET if net.version == 4 else nl.AF_INET6
    return nl.RouteRecord(family, net.network_address.packed, net.prefixlen, table, protocol, rtype, 0, None, oif, 0)


def test_our_routes_lead_into_our_networks_and_are_not_the_kernels_or_through_our_devices():
    assert our_route(route("198.18.7.0/24"), NETS, {5})  # host-gw: a peer via the underlay
    assert our_route(route("198.18.3.0/24", oif=None, rtype=nl.RTN_BLACKHOLE), NETS, {5})  # our blackhole
    assert our_route(route("2001:db8:1800:4::/64"), NETS, {5})
    assert not our_route(route("198.18.7.0/24", oif=5), NETS, {5})  # goes with flannel.1
    assert not our_route(route("198.18.3.0/24", protocol=nl.RTPROT_KERNEL), NETS, {5})  # the pod bridge's
    assert not our_route(route("198.51.100.0/24"), NETS, {5})  # not into our networks
    assert not our_route(route("198.18.0.0/15"), NETS, {5})  # wider than ours: someone else's
    assert not our_route(route("198.18.7.0/24", table=100), NETS, {5})


def test_installed_files_go_only_as_flanneld_wrote_them(tmp_path):
    import json
    import os

    from flanneld import __version__
    from flanneld.cni.install import conflist, wrapper_text
    from flanneld.node.cleanup import install_steps
    from flanneld.node.systemd import DEFAULTS, render, this_flanneld

    units, bins, confs = tmp_path / "systemd", tmp_path / "bin", tmp_path / "net.d"
    for d in (units / "multi-user.target.wants", bins, confs):
        d.mkdir(parents=True)
    (units / "flanneld.service").write_text(render(this_flanneld()))
    (units / "multi-user.target.wants" / "flanneld.service").symlink_to(units / "flanneld.service")
    (tmp_path / "defaults").write_text(DEFAULTS + "FLANNELD_IFACE=eth1\n")  # the operator's settings
    other = wrapper_text().replace(f"flanneld {__version__} install-cni", "flanneld 0.0.1 install-cni")
    assert other != wrapper_text()  # another version's wrapper
    (bins / "flannel").write_text(other)
    made = conflist("k8s-pod-network", "1.0.0", "/run/other/subnet.env", None)  # install-cni's other options
    (confs / "10-flannel.conflist").write_text(json.dumps(made, indent=2) + "\n")
    steps, left = install_steps(str(units), str(tmp_path / "defaults"), str(bins), str(confs))
    assert sorted(s.what for s in steps) == sorted([f"file {units}/flanneld.service",
                                                    f"symlink {units}/multi-user.target.wants/flanneld.service",
                                                    f"file {bins}/flannel", f"file {confs}/10-flannel.conflist"])
    assert left == [f"left {tmp_path}/defaults: it differs from what flanneld installs (edited by hand?)"]
    (confs / "10-flannel.conflist").write_text(json.dumps({**made, "name": "x", "extra": 1}, indent=2) + "\n")
    (units / "flanneld.service").write_text(render(this_flanneld()) + "# tuned\n")
    steps, left = install_steps(str(units), str(tmp_path / "defaults"), str(bins), str(confs))
    assert sorted(s.what for s in steps) == [f"file {bins}/flannel"]  # the symlink's unit is not ours now either
    assert len(left) == 3 and all("differs from what flanneld installs" in line for line in left)
    for step in steps:
        step.do()
    assert not os.path.exists(bins / "flannel")


def test_the_subnet_files_directory_goes_only_once_empty(tmp_path):
    made, shared = tmp_path / "flannel", tmp_path / "shared"
    made.mkdir()
    shared.mkdir()
    (shared / "operators-notes").write_text("kept")
    assert remove_if_empty(str(made)) and not made.exists()
    assert not remove_if_empty(str(shared)) and (shared / "operators-notes").exists()
    assert not remove_if_empty(str(tmp_path / "absent"))
