"""The flannel CNI plugin, invoked through its installed wrapper exactly as a runtime does.

Real 2-node cluster running our daemon; the delegate is Debian's reference bridge + host-local.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import stat
import subprocess
import uuid

import pytest

from flanneld import lab
from flanneld.lab.flannel import NETWORK
from flanneld.lab.probes import eventually, ping
from flanneld.lab.readers import routes
from flanneld.node.metrics import parse

REFERENCE_PLUGINS = "/usr/lib/cni"


class Runtime:
    """Just enough of a container runtime: pod namespaces and CNI invocations."""

    def __init__(self, cluster, tmp_path) -> None:
        self.cluster = cluster
        self.prefix = cluster.lab.prefix
        self.bin_dir = str(tmp_path / "bin")
        self.conf_dir = str(tmp_path / "net.d")
        self.tmp = tmp_path
        out = subprocess.run([lab.tool("flanneld"), "install-cni", "--bin-dir", self.bin_dir, "--conf-dir",
                              self.conf_dir], capture_output=True, text=True, check=True)
        assert "installed" in out.stdout
        self.wrapper = os.path.join(self.bin_dir, "flannel")
        self.cni_path = f"{self.bin_dir}:{REFERENCE_PLUGINS}"
        self.ifname = f"{self.prefix}-e0"

    def state_dir(self, node) -> str:
        return str(self.tmp / node.ns / "flannel")

    def ipam_dir(self, node) -> str:
        return str(self.tmp / node.ns / "ipam")

    def conf(self, node, version: str = "1.0.0", **extra) -> dict:
        return {"cniVersion": version, "name": "cbr0", "type": "flannel",
                "delegate": {"hairpinMode": True, "isDefaultGateway": True, "bridge": f"{self.prefix}-cni0"},
                "subnetFile": node.subnet_file, "dataDir": self.state_dir(node),
                "ipam": {"dataDir": self.ipam_dir(node)}, **extra}

    def pod(self) -> tuple[str, str]:
        name = f"{self.prefix}-pod{uuid.uuid4().hex[:6]}"
        self.cluster.lab.add_namespace(name)
        return name, name.split("-pod")[1]

    def call(self, node, command: str, conf: dict | str, container: str = "", netns: str = "",
             cni_path: str | None = None, ifname: str | None = None) -> tuple[int, dict | None, str]:
        env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_PATH": cni_path or self.cni_path}
        if container:
            env["CNI_CONTAINERID"] = container
        if netns:
            env["CNI_NETNS"] = f"/run/netns/{netns}"
        if command in ("ADD", "DEL", "CHECK"):
            env["CNI_IFNAME"] = ifname or self.ifname
        stdin = conf if isinstance(conf, str) else json.dumps(conf)
        proc = subprocess.run(["ip", "netns", "exec", node.ns, self.wrapper], input=stdin, capture_output=True,
                              text=True, env=env, timeout=60)
        body = json.loads(proc.stdout) if proc.stdout.strip() else None
        assert "Traceback" not in proc.stdout
        return proc.returncode, body, proc.stderr

    def add(self, node, version: str = "1.0.0") -> tuple[str, str, dict]:
        netns, container = self.pod()
        rc, result, err = self.call(node, "ADD", self.conf(node, version), container, netns)
        assert rc == 0, (result, err)
        return netns, container, result

    def allocated(self, node) -> list[str]:
        """host-local's allocation files (one per IP in use)."""
        root = os.path.join(self.ipam_dir(node), "cbr0")
        if not os.path.isdir(root):
            return []
        return [f for f in os.listdir(root) if not f.startswith(("last_reserved_ip", "lock"))]

    def saved(self, node) -> list[str]:
        directory = self.state_dir(node)
        return [f for f in os.listdir(directory) if not f.startswith(".")] if os.path.isdir(directory) else []


@pytest.fixture
def runtime(make_cluster, tmp_path):
    cluster = make_cluster(2, NETWORK)
    cluster.start_all()
    return Runtime(cluster, tmp_path)


def pod_ip(result: dict) -> str:
    return result["ips"][0]["address"].split("/")[0]


def test_install_writes_wrapper_and_upstream_conflist(tmp_path):
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    cmd = [lab.tool("flanneld"), "install-cni", "--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir)]
    subprocess.run(cmd, check=True, capture_output=True)
    wrapper = (bin_dir / "flannel").read_text()
    assert wrapper.splitlines()[0].endswith(" -IS") and os.access(bin_dir / "flannel", os.X_OK)
    assert json.loads((conf_dir / "10-flannel.conflist").read_text()) == {
        "name": "cbr0", "cniVersion": "0.3.1",
        "plugins": [{"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
                    {"type": "portmap", "capabilities": {"portMappings": True}}]}
    assert "up to date" in subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    (conf_dir / "10-flannel.conflist").write_text('{"edited": true}\n')
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode == 1 and "use --force" in refused.stderr
    assert (conf_dir / "10-flannel.conflist").read_text() == '{"edited": true}\n'
    subprocess.run([*cmd, "--force"], check=True, capture_output=True)
    assert "portmap" in (conf_dir / "10-flannel.conflist").read_text()


def test_add_gives_lease_addresses_and_pods_reach_across_nodes(runtime):
    node1, node2 = runtime.cluster.nodes
    ns1, c1, r1 = runtime.add(node1)
    ns2, _c2, r2 = runtime.add(node2)
    for node, result in ((node1, r1), (node2, r2)):  # each pod in its own node's lease, not just the network
        assert ipaddress.ip_address(pod_ip(result)) in ipaddress.ip_network(runtime.cluster.subnet(node))
    assert r1["ips"][0]["gateway"] == runtime.cluster.env(node1).subnet.ip.compressed
    assert any(rt["dst"] == "198.18.0.0/16" for rt in r1["routes"])
    assert ping(lab.Pod(ns1, runtime.ifname, pod_ip(r1)), pod_ip(r2)).returncode == 0
    assert ping(lab.Pod(ns2, runtime.ifname, pod_ip(r2)), pod_ip(r1)).returncode == 0
    state = os.path.join(runtime.state_dir(node1), c1)
    assert stat.S_IMODE(os.stat(runtime.state_dir(node1)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600
    with open(state) as fh:
        saved = json.loads(fh.read())
    assert saved["type"] == "bridge" and saved["name"] == "cbr0" and saved["mtu"] == 1450
    assert saved["ipam"]["ranges"] == [[{"subnet": runtime.cluster.subnet(node1)}]]


def test_del_twice_is_fine_and_frees_everything(runtime):
    node = runtime.cluster.nodes[0]
    netns, container, _ = runtime.add(node)
    assert runtime.allocated(node) and runtime.saved(node) == [container]
    for _ in range(2):
        rc, body, err = runtime.call(node, "DEL", runtime.conf(node), container, netns)
        assert rc == 0 and body is None, (body, err)
    assert runtime.allocated(node) == [] and runtime.saved(node) == []


def test_del_keeps_state_when_the_delegate_fails(runtime, tmp_path):
    node = runtime.cluster.nodes[0]
    netns, container, _ = runtime.add(node)
    only_bridge = tmp_path / "only-bridge"
    only_bridge.mkdir()
    os.symlink(f"{REFERENCE_PLUGINS}/bridge", only_bridge / "bridge")  # host-local missing: DEL fails
    rc, body, _ = runtime.call(node, "DEL", runtime.conf(node), container, netns,
                               cni_path=f"{runtime.bin_dir}:{only_bridge}")
    assert rc == 1 and "state kept for a retry" in body["msg"]
    assert runtime.saved(node) == [container] and runtime.allocated(node)
    rc, _, _ = runtime.call(node, "DEL", runtime.conf(node), container, netns)
    assert rc == 0 and runtime.saved(node) == [] and runtime.allocated(node) == []


def test_check_passes_then_reports_a_missing_interface(runtime):
    node = runtime.cluster.nodes[0]
    netns, container, result = runtime.add(node)
    conf = runtime.conf(node, prevResult=result)
    rc, body, err = runtime.call(node, "CHECK", conf, container, netns)
    assert rc == 0 and body is None, (body, err)
    lab.ip("link", "del", runtime.ifname, ns=netns)
    rc, body, _ = runtime.call(node, "CHECK", conf, container, netns)
    assert rc == 1 and "delegate bridge CHECK" in body["msg"]
    rc, body, _ = runtime.call(node, "CHECK", conf, "never-added", netns)
    assert rc == 1 and body["code"] == 3


def test_status_fails_before_the_daemon_is_up_and_passes_after(make_cluster, tmp_path):
    cluster = make_cluster(1, NETWORK)
    rt = Runtime(cluster, tmp_path)
    node = cluster.nodes[0]
    rc, body, _ = rt.call(node, "STATUS", rt.conf(node, "1.1.0"))
    assert rc == 1 and body["code"] == 50 and "flanneld is not running or not ready" in body["msg"]
    rc, body, _ = rt.call(node, "ADD", rt.conf(node), *rt.pod()[::-1])
    assert rc == 1 and body["code"] == 11 and "check flanneld on the node" in body["details"]
    assert rt.saved(node) == []
    cluster.start(node)
    rc, body, _ = rt.call(node, "STATUS", rt.conf(node, "1.1.0"))
    assert rc == 0 and body is None


def test_gc_releases_attachments_the_runtime_no_longer_knows(runtime):
    node = runtime.cluster.nodes[0]
    pods = [runtime.add(node) for _ in range(3)]
    keep = pods[0]
    assert len(runtime.allocated(node)) == 3
    conf = runtime.conf(node, "1.1.0", **{"cni.dev/valid-attachments": [
        {"containerID": keep[1], "ifname": runtime.ifname}]})
    rc, body, err = runtime.call(node, "GC", conf)
    assert rc == 0 and body is None, (body, err)
    assert runtime.saved(node) == [keep[1]]
    assert len(runtime.allocated(node)) == 1
    with open(os.path.join(runtime.ipam_dir(node), "cbr0", runtime.allocated(node)[0])) as fh:
        assert fh.read().split()[0] == keep[1]


def test_fifty_pods_add_and_del_leave_nothing_behind(runtime):
    node = runtime.cluster.nodes[0]
    pods = [runtime.add(node, "0.3.1") for _ in range(50)]
    assert len({pod_ip(r) for _, _, r in pods}) == 50 and len(runtime.allocated(node)) == 50
    for netns, container, _ in pods:
        rc, _, err = runtime.call(node, "DEL", runtime.conf(node, "0.3.1"), container, netns)
        assert rc == 0, err
    assert runtime.allocated(node) == [] and runtime.saved(node) == []
    assert os.listdir(runtime.state_dir(node)) == []  # not even an empty .ifname directory
    leftovers = [link for link in node.sh_json("ip", "-j", "link", "show", "master", f"{runtime.prefix}-cni0")]
    assert leftovers == []


@pytest.mark.parametrize(("stdin", "env_drop", "code"), [
    ("{broken", (), 6),
    (None, ("CNI_NETNS",), 4),
    ('{"cniVersion": "0.0.9", "name": "cbr0"}', (), 1),
    ("delegate-with-name", (), 7),
])
def test_bad_input_writes_nothing(runtime, stdin, env_drop, code):
    node = runtime.cluster.nodes[0]
    netns, container = runtime.pod()
    conf: dict | str = runtime.conf(node)
    if stdin == "delegate-with-name":
        conf["delegate"] = {"name": "mine"}  # type: ignore[index]
    elif stdin is not None:
        conf = stdin
    rc, body, _ = runtime.call(node, "ADD", conf, container, "" if "CNI_NETNS" in env_drop else netns)
    assert rc == 1 and body["code"] == code
    assert runtime.saved(node) == [] and runtime.allocated(node) == []
    assert lab.ip("-j", "link", "show", ns=netns).stdout.count('"ifname"') == 1  # only lo: no veth was made


THIEF = (b'{"PublicIP":"198.51.100.150","PublicIPv6":null,"BackendType":"vxlan",'
         b'"BackendData":{"VNI":1,"VtepMAC":"0e:fa:00:96:00:01"}}')


def test_a_subnet_that_had_to_move_is_said_counted_shown_and_its_pods_told_to_go(make_cluster, tmp_path):
    """Our lease expired while etcd could not hear us and another node took the subnet: the daemon
    moves to a free one without touching the other's key; pods started before are cut off, and
    every place an operator looks says so: the log (old and new subnet, what to do), a metric,
    doctor (the bridge still holding the old gateway) and CNI CHECK (code 100) for such a pod."""
    cluster = make_cluster(2, NETWORK)
    cluster.start_all("--ip-masq")
    runtime = Runtime(cluster, tmp_path)
    node1, node2 = cluster.nodes
    netns, container, _ = runtime.add(node1)
    old, key = cluster.subnet(node1), cluster.lease_key(node1)
    daemon = node1.procs[-1]
    daemon.send_signal(signal.SIGSTOP)  # etcd cannot hear it...
    try:
        cluster.etcd_client.revoke(cluster.etcd_client.get(key).lease_id)  # ...its lease expires...
        thief = cluster.etcd_client.grant(600)
        cluster.etcd_client.put(key, THIEF, thief)  # ...and another node takes the subnet
    finally:
        daemon.send_signal(signal.SIGCONT)
    eventually(lambda: cluster.subnet(node1) != old, timeout=10, what="subnet.env rewritten for a new subnet")
    new = cluster.subnet(node1)
    eventually(lambda: routes(node2).get(new, {}).get("gateway") == new.split("/")[0], timeout=3,
               what="peers route the new subnet")
    stored = cluster.etcd_client.get(key)
    assert (stored.value, stored.lease_id) == (THIEF, thief)  # the other node's key, untouched
    eventually(lambda: old in routes(node1), timeout=3, what="the old subnet routed to the node now holding it")
    line = next(x for x in node1.log().splitlines() if "our subnet moved" in x)
    assert f"our subnet moved from {old} to {new}" in line and "delete those pods" in line and " W " in line
    assert parse(node1.http("/metrics")[1])[("flanneld_subnet_moves_total", ())] == 1
    nat = node1.sh("iptables-save", "-t", "nat").stdout
    assert new in nat and old not in nat  # masquerade rules rebuilt for the new subnet

    rc, body, _ = runtime.call(node1, "CHECK", {**runtime.conf(node1), "prevResult": {}}, container, netns)
    assert rc == 1 and body["code"] == 100 and old in body["msg"] and "recreate the pod" in body.get("details", "")

    env = {"FLANNELCTL_ETCD_ENDPOINTS": cluster.endpoint, "FLANNELCTL_ETCD_PREFIX": cluster.prefix}
    doctor = node1.sh("env", *[f"{k}={v}" for k, v in env.items()], lab.tool("flannelctl"), "doctor",
                      f"--subnet-file={node1.subnet_file}", check=False)
    gateway = f"{ipaddress.ip_network(old).network_address + 1}/{old.split('/')[1]}"
    bridge = f"{runtime.prefix}-cni0"
    assert doctor.returncode == 1 and f"bridge {bridge} holds {gateway}, not in our subnet {new}" in doctor.stdout
    rc, body, _ = runtime.call(node1, "ADD", runtime.conf(node1), *reversed(runtime.pod()))
    assert rc == 1 and "already has an IP address different from" in body["msg"]  # what the operator meets

    # the doctor's advice: delete those pods, remove the address; then the node is clean and works
    assert runtime.call(node1, "DEL", runtime.conf(node1), container, netns)[0] == 0
    node1.sh("ip", "addr", "del", gateway, "dev", bridge)
    doctor = node1.sh("env", *[f"{k}={v}" for k, v in env.items()], lab.tool("flannelctl"), "doctor",
                      f"--subnet-file={node1.subnet_file}", check=False)
    assert doctor.returncode == 0, doctor.stdout
    ns1, _, r1 = runtime.add(node1)  # a pod started now is on the new subnet and reaches the other node's
    _, _, r2 = runtime.add(node2)
    assert ipaddress.ip_address(pod_ip(r1)) in ipaddress.ip_network(new)
    assert ping(lab.Pod(ns1, runtime.ifname, pod_ip(r1)), pod_ip(r2)).returncode == 0
    assert "Traceback" not in node1.log() and "could not revoke" not in node1.log()  # a gone lease is no error


def test_vagrant_pod_script_gets_its_pod_back_after_a_reboot_and_says_a_cni_error_in_one_line(runtime, tmp_path):
    """vagrant/pod.sh after the node rebooted: the pod namespace was gone, so it skipped the DEL,
    host-local's reservation for the same container ID had survived on disk, and the ADD failed
    ("duplicate allocation is not allowed") behind a KeyError: 'ips' of its result parser."""
    node = runtime.cluster.nodes[0]
    conflist = tmp_path / "10-flannel.conflist"
    plugin = {key: value for key, value in runtime.conf(node).items() if key not in ("cniVersion", "name")}
    conflist.write_text(json.dumps({"name": "cbr0", "cniVersion": "0.3.1", "plugins": [plugin]}))
    script = os.path.join(os.path.dirname(__file__), "..", "..", "vagrant", "pod.sh")
    env = {**os.environ, "CONFLIST": str(conflist), "CNI_BIN_DIR": runtime.bin_dir, "CNI_PATH": runtime.cni_path,
           "POD": f"{runtime.prefix}-vpod"}

    def pod_sh() -> subprocess.CompletedProcess[str]:
        # the node's network namespace only: `ip netns exec` would also give it a mount namespace of its
        # own, and the pod namespace's mount would die with it (as on a host, pod.sh runs in the host's)
        return subprocess.run(["nsenter", f"--net=/run/netns/{node.ns}", "bash", script], capture_output=True,
                              text=True, env=env, timeout=60)

    first = pod_sh()
    assert first.returncode == 0, first.stderr
    subnet = ipaddress.ip_network(runtime.cluster.subnet(node))
    rerun = pod_sh()  # run again: the previous attachment deleted first
    assert rerun.returncode == 0 and ipaddress.ip_address(rerun.stdout.strip()) in subnet, rerun.stderr
    assert runtime.allocated(node) == [rerun.stdout.strip()]
    lab.ip("netns", "delete", f"{runtime.prefix}-vpod")  # the reboot: the namespace gone, the reservation kept
    again = pod_sh()
    assert again.returncode == 0 and ipaddress.ip_address(again.stdout.strip()) in subnet, again.stderr
    assert runtime.allocated(node) == [again.stdout.strip()]  # the old reservation released, none leaked
    # a CNI error is one line naming it
    plugin["subnetFile"] = str(tmp_path / "missing.env")
    conflist.write_text(json.dumps({"name": "cbr0", "cniVersion": "0.3.1", "plugins": [plugin]}))
    failed = pod_sh()
    assert failed.returncode == 1 and failed.stdout == ""
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pod.sh: CNI ADD failed: ") and "missing.env" in lines[0], lines
