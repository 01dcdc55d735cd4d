"""flannelctl against a real etcd holding leases in upstream's exact format, and doctor on a live node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from flanneld import lab
from flanneld.lab.flannel import NETWORK
from flanneld.model.lease import leases_prefix

DUAL = {"Network": "198.18.0.0/16", "EnableIPv6": True, "IPv6Network": "2001:db8:1800::/56",
        "Backend": {"Type": "vxlan"}}
V4 = {"Network": "198.18.0.0/16", "SubnetLen": 24, "SubnetMin": "198.18.1.0", "SubnetMax": "198.18.200.0",
      "Backend": {"Type": "vxlan"}}

# byte strings as upstream flanneld v0.26 writes them
UP_V4 = (b'{"PublicIP":"198.51.100.11","PublicIPv6":null,"BackendType":"vxlan",'
         b'"BackendData":{"VNI":1,"VtepMAC":"0e:8a:7b:11:22:01"}}')
UP_DUAL = (b'{"PublicIP":"198.51.100.12","PublicIPv6":"2001:db8:51::12","BackendType":"vxlan",'
           b'"BackendData":{"VNI":1,"VtepMAC":"0e:8a:7b:11:22:02"},'
           b'"BackendV6Data":{"VNI":1,"VtepMAC":"0e:8a:7b:11:22:12"}}')
UP_RESERVED = b'{"PublicIP":"198.51.100.19","PublicIPv6":null}'


class Ctl:
    """Runs the installed flannelctl as an operator would."""

    def __init__(self, etcd, prefix: str) -> None:
        self.env = {"PATH": os.environ["PATH"], "FLANNELCTL_ETCD_ENDPOINTS": etcd.endpoint,
                    "FLANNELCTL_ETCD_PREFIX": prefix}
        self.tool = lab.tool("flannelctl")

    def __call__(self, *args: str, input: str | None = None, env: dict[str, str] | None = None,
                 ns: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = [self.tool, *args]
        if ns:
            argv = ["ip", "netns", "exec", ns, *argv]
        proc = subprocess.run(argv, capture_output=True, text=True, input=input, env={**self.env, **(env or {})},
                              timeout=60)
        assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
        return proc

    def ok(self, *args: str, **kw) -> str:
        proc = self(*args, **kw)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def refused(self, *args: str, **kw) -> str:
        proc = self(*args, **kw)
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert lines and lines[-1].startswith("flannelctl: error: "), proc.stderr
        return lines[-1]


@pytest.fixture
def ctl(etcd, etcd_prefix):
    return Ctl(etcd, etcd_prefix)


@pytest.fixture
def upstream_leases(etcd_client, etcd_prefix):
    """A dual-stack network holding upstream-written leases, a reservation and junk."""
    head = leases_prefix(etcd_prefix)
    etcd_client.put(etcd_prefix + "/config", json.dumps(DUAL).encode())
    lease_a, lease_b = etcd_client.grant(86400), etcd_client.grant(3000)
    etcd_client.put(head + "198.18.1.0-24", UP_V4, lease_a)
    etcd_client.put(head + "198.18.2.0-24&2001:db8:1800:2::-64", UP_DUAL, lease_b)
    etcd_client.put(head + "198.18.9.0-24", UP_RESERVED)
    etcd_client.put(head + "not-a-subnet", b"{}")
    etcd_client.put(head + "198.18.3.0-24", b"{broken")
    return lease_a, lease_b


def test_list_table_json_yaml(ctl, upstream_leases):
    lease_a, lease_b = upstream_leases
    proc = ctl("subnets", "list")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["SUBNET", "IPV6", "SUBNET", "PUBLIC", "IP", "BACKEND", "IDENTITY", "EXPIRES", "IN"]
    assert [line.split()[0] for line in lines[1:]] == ["198.18.1.0/24", "198.18.2.0/24", "198.18.9.0/24"]
    assert lines[1].split()[1:5] == ["-", "198.51.100.11", "vxlan", "0e:8a:7b:11:22:01"]
    assert lines[1].split()[5].startswith(("23h", "24h"))
    assert lines[2].split()[1:5] == ["2001:db8:1800:2::/64", "198.51.100.12", "vxlan", "0e:8a:7b:11:22:02"]
    assert lines[2].split()[5].startswith(("49m", "50m"))
    assert lines[3].split()[1:] == ["-", "198.51.100.19", "-", "-", "reserved"]
    # columns are aligned: every row's PUBLIC IP starts where the header's does
    col = lines[0].index("PUBLIC IP")
    assert all(line[col:].startswith("198.51.100.") for line in lines[1:])
    assert "not-a-subnet" in proc.stderr and "198.18.3.0-24" in proc.stderr  # junk named, skipped

    bare = ctl.ok("subnets", "list", "--no-headers").splitlines()
    assert [line.split()[:5] for line in bare] == [line.split()[:5] for line in lines[1:]]
    docs = json.loads(ctl.ok("subnets", "list", "-o", "json"))
    assert [d["key"] for d in docs] == ["198.18.1.0-24", "198.18.2.0-24&2001:db8:1800:2::-64", "198.18.9.0-24"]
    a, b, r = docs
    assert a["subnet"] == "198.18.1.0/24" and a["ipv6Subnet"] is None
    assert a["PublicIP"] == "198.51.100.11" and a["PublicIPv6"] is None
    assert a["BackendType"] == "vxlan" and a["BackendData"] == {"VNI": 1, "VtepMAC": "0e:8a:7b:11:22:01"}
    assert a["BackendV6Data"] is None and a["reserved"] is False
    assert 86000 < a["ttlSeconds"] <= 86400 and a["etcdLease"] == f"{lease_a:x}"
    assert b["ipv6Subnet"] == "2001:db8:1800:2::/64" and b["PublicIPv6"] == "2001:db8:51::12"
    assert b["BackendV6Data"] == {"VNI": 1, "VtepMAC": "0e:8a:7b:11:22:12"}
    assert 2900 < b["ttlSeconds"] <= 3000 and b["etcdLease"] == f"{lease_b:x}"
    assert r["reserved"] is True and r["ttlSeconds"] is None and r["etcdLease"] is None and r["BackendType"] is None

    yaml = ctl.ok("subnets", "list", "-o", "yaml")
    assert yaml.startswith('- key: "198.18.1.0-24"\n  subnet: "198.18.1.0/24"\n')
    assert '  BackendData:\n    VNI: 1\n    VtepMAC: "0e:8a:7b:11:22:01"\n' in yaml
    assert "  reserved: true\n  ttlSeconds: null\n" in yaml

    wide = ctl.ok("subnets", "list", "-o", "wide").splitlines()
    assert "IPV6 IDENTITY" in wide[0] and "0e:8a:7b:11:22:12" in wide[2] and "2001:db8:51::12" in wide[2]
    filtered = ctl.ok("subnets", "list", "--public-ip", "2001:db8:51::12", "--no-headers").splitlines()
    assert [line.split()[0] for line in filtered] == ["198.18.2.0/24"]
    assert ctl.ok("subnets", "list", "--reserved", "--no-headers").split()[0] == "198.18.9.0/24"
    assert ctl.ok("subnets", "list", "--backend", "udp", "--no-headers") == ""


def test_a_lease_no_node_programs_is_named_by_list_and_show(ctl, etcd_client, etcd_prefix):
    head = leases_prefix(etcd_prefix)
    etcd_client.put(etcd_prefix + "/config", json.dumps(V4).encode())
    etcd_client.put(head + "198.18.62.0-25", UP_V4.replace(b".11", b".13"))  # older, but a misfit
    etcd_client.put(head + "198.18.62.0-24", UP_V4)
    proc = ctl("subnets", "list")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 3
    assert proc.stderr.strip() == (
        "flannelctl: warning: no node programs lease 198.18.62.0-25: its subnet 198.18.62.0/25 overlaps lease "
        "198.18.62.0-24 (198.18.62.0/24), which fits the network config (this one does not) and is programmed "
        "instead")
    assert ctl("subnets", "list", "--public-ip", "198.51.100.11").stderr == ""  # only of the rows shown
    assert "Programmed:" not in ctl.ok("subnets", "show", "198.18.62.0/24")
    assert "by no node: its subnet 198.18.62.0/25 overlaps" in ctl.ok("subnets", "show", "198.18.62.0/25")


def test_show_by_subnet_key_and_public_ip(ctl, upstream_leases):
    text = ctl.ok("subnets", "show", "198.18.2.0/24")
    fields = dict(line.split(":", 1) for line in text.splitlines())
    assert fields["key"].strip() == "198.18.2.0-24&2001:db8:1800:2::-64"
    assert fields["public ipv6"].strip() == "2001:db8:51::12"
    assert fields["backend"].strip() == "vxlan (VNI 1, VtepMAC 0e:8a:7b:11:22:02, VtepMAC 0e:8a:7b:11:22:12)"
    assert fields["expires in"].strip().startswith(("49m", "50m"))
    assert fields["value"].strip() == UP_DUAL.decode()
    assert ctl.ok("subnets", "show", "2001:db8:1800:2::/64") == text
    assert ctl.ok("subnets", "show", "198.51.100.12") == text
    doc = json.loads(ctl.ok("subnets", "show", "198.18.9.0-24", "-o", "json"))
    assert doc["reserved"] is True and doc["value"] == UP_RESERVED.decode()
    assert "never" in ctl.ok("subnets", "show", "198.18.9.0/24")
    assert ctl.refused("subnets", "show", "198.18.77.0/24") == "flannelctl: error: no lease matches 198.18.77.0/24"
    assert "not a subnet" in ctl.refused("subnets", "show", "banana")


def test_reserve_and_release_round_trip(ctl, etcd_client, etcd_prefix):
    etcd_client.put(etcd_prefix + "/config", json.dumps(V4).encode())
    head = leases_prefix(etcd_prefix)
    out = ctl.ok("subnets", "reserve", "198.18.30.0/24", "--public-ip", "198.51.100.30")
    assert "reserved 198.18.30.0/24 for 198.51.100.30" in out
    kv = etcd_client.get(head + "198.18.30.0-24")
    assert kv.value == b'{"PublicIP":"198.51.100.30","PublicIPv6":null}' and kv.lease_id == 0
    assert ctl.ok("subnets", "list", "--no-headers").split()[-1] == "reserved"
    assert "released reservation 198.18.30.0/24" in ctl.ok("subnets", "release", "198.18.30.0-24")
    assert etcd_client.get(head + "198.18.30.0-24") is None
    assert "no reservation or lease" in ctl.refused("subnets", "release", "198.18.30.0/24")


def test_reserve_refusals_explain_why(ctl, etcd_client, etcd_prefix):
    head = leases_prefix(etcd_prefix)
    assert "no network config" in ctl.refused("subnets", "reserve", "198.18.5.0/24", "--public-ip", "198.51.100.5")
    etcd_client.put(etcd_prefix + "/config", json.dumps(V4).encode())
    live = etcd_client.grant(600)
    etcd_client.put(head + "198.18.5.0-24", UP_V4, live)
    before = etcd_client.list_prefix(head)[1]

    msg = ctl.refused("subnets", "reserve", "198.18.5.0/24", "--public-ip", "198.51.100.50")
    assert msg == "flannelctl: error: refused: 198.18.5.0/24 is taken: 198.18.5.0-24 is leased by 198.51.100.11"
    assert "SubnetLen" in ctl.refused("subnets", "reserve", "198.18.6.0/25", "--public-ip", "198.51.100.50")
    assert "outside the allocation range" in ctl.refused("subnets", "reserve", "198.18.250.0/24",
                                                         "--public-ip", "198.51.100.50")
    assert "already holds 198.18.5.0-24" in ctl.refused("subnets", "reserve", "198.18.6.0/24",
                                                        "--public-ip", "198.51.100.11")
    assert "does not enable IPv6" in ctl.refused("subnets", "reserve", "2001:db8:1800:5::/64",
                                                 "--public-ip", "2001:db8:51::5")
    assert "not a subnet" in ctl.refused("subnets", "reserve", "198.18.6.1/24", "--public-ip", "198.51.100.50")
    assert "a live lease" in ctl.refused("subnets", "release", "198.18.5.0/24")
    assert etcd_client.list_prefix(head)[1] == before  # nothing written by any refusal
    assert "released lease" in ctl.ok("subnets", "release", "198.18.5.0/24", "--force")


def test_dual_stack_reservation_needs_both_halves(ctl, etcd_client, etcd_prefix):
    etcd_client.put(etcd_prefix + "/config", json.dumps(DUAL).encode())
    assert "--ipv6-subnet" in ctl.refused("subnets", "reserve", "198.18.7.0/24", "--public-ip", "198.51.100.7")
    ctl.ok("subnets", "reserve", "198.18.7.0/24", "--public-ip", "198.51.100.7", "--ipv6-subnet",
           "2001:db8:1800:7::/64", "--public-ipv6", "2001:db8:51::7")
    kv = etcd_client.get(leases_prefix(etcd_prefix) + "198.18.7.0-24&2001:db8:1800:7::-64")
    assert kv.value == b'{"PublicIP":"198.51.100.7","PublicIPv6":"2001:db8:51::7"}'


def test_config_validate_get_and_set(ctl, etcd_client, etcd_prefix, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"Network": "198.18.0.0/16", "SubnetLen": 33}')
    msg = ctl.refused("config", "validate", str(bad))
    assert msg.startswith("flannelctl: error: invalid config: ") and "SubnetLen" in msg
    assert "not supported" in ctl.refused("config", "validate", "-", input='{"Network":"198.18.0.0/16",'
                                                                           '"Backend":{"Type":"udpx"}}')
    good = tmp_path / "good.json"
    good.write_text(json.dumps(V4))
    assert ctl.ok("config", "validate", str(good)).startswith("valid: IPv4 198.18.0.0/16 in /24 subnets (200 from")

    assert ctl.refused("config", "set", str(bad)) == msg  # the validator's message, nothing written
    assert etcd_client.get(etcd_prefix + "/config") is None
    out = ctl.ok("config", "set", str(good))
    assert '+  "Network": "198.18.0.0/16",' in out and "config written" in out
    assert json.loads(ctl.ok("config", "get")) == V4
    assert "config unchanged" in ctl.ok("config", "set", str(good))

    etcd_client.put(leases_prefix(etcd_prefix) + "198.18.1.0-24", UP_V4, etcd_client.grant(600))
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps({**V4, "SubnetLen": 26, "Backend": {"Type": "vxlan", "VNI": 2}}))
    proc = ctl("config", "set", str(changed))
    assert proc.returncode == 1
    assert '-  "SubnetLen": 24,' in proc.stdout and '+  "SubnetLen": 26,' in proc.stdout
    assert "refused: IPv4 SubnetLen changes from 24 to 26" in proc.stderr
    assert json.loads(ctl.ok("config", "get")) == V4
    widened = tmp_path / "widened.json"
    widened.write_text(json.dumps({**V4, "SubnetMax": "198.18.250.0"}))
    out = ctl.ok("config", "set", str(widened), "--dry-run")
    assert '+  "SubnetMax": "198.18.250.0",' in out and "nothing written" in out
    assert json.loads(ctl.ok("config", "get")) == V4
    assert "forced: " in ctl("config", "set", str(changed), "--force").stderr
    assert json.loads(ctl.ok("config", "get"))["SubnetLen"] == 26


def test_stats_counts_usage_and_expiring(ctl, upstream_leases):
    data = json.loads(ctl.ok("stats", "-o", "json", "--expiring-within", "3600"))
    v4, v6 = data["families"]
    assert (v4["total"], v4["leased"], v4["reserved"], v4["free"]) == (255, 2, 1, 252)
    assert (v6["version"], v6["leased"], v6["total"]) == (6, 1, 255)
    assert data["malformed"] == 2
    assert [d["key"] for d in data["expiring"]] == ["198.18.2.0-24&2001:db8:1800:2::-64"]
    text = ctl.ok("stats")
    assert text.splitlines()[1].split()[:8] == ["IPv4", "198.18.0.0/16", "/24", "255", "2", "1", "252", "1.2%"]


def test_watch_prints_events_until_ctrl_c(ctl, etcd_client, etcd_prefix):
    proc = subprocess.Popen([ctl.tool, "subnets", "watch", "-o", "json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ctl.env)
    try:
        time.sleep(1.5)  # connected and watching
        head = leases_prefix(etcd_prefix)
        etcd_client.put(head + "198.18.1.0-24", UP_V4)
        added = json.loads(proc.stdout.readline())
        assert (added["event"], added["key"], added["PublicIP"]) == ("added", "198.18.1.0-24", "198.51.100.11")
        etcd_client.delete(head + "198.18.1.0-24")
        removed = json.loads(proc.stdout.readline())
        assert (removed["event"], removed["BackendData"]["VtepMAC"]) == ("removed", "0e:8a:7b:11:22:01")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    assert "Traceback" not in proc.stderr.read()


def test_errors_are_one_line(ctl, etcd, tmp_path):
    dead = {"FLANNELCTL_ETCD_ENDPOINTS": f"http://127.0.0.1:{lab.free_port()}"}
    msg = ctl.refused("--etcd-timeout", "1", "subnets", "list", env=dead)
    assert "etcd" in msg
    missing = str(tmp_path / "nope.pem")
    msg = ctl.refused("--etcd-endpoints", "https://127.0.0.1:2379", "--etcd-cafile", missing, "subnets", "list")
    assert msg == f"flannelctl: error: cannot read etcd CA file {missing}: No such file or directory"
    # the FLANNELD_ form works too and the command line wins over both
    env = {"FLANNELCTL_ETCD_ENDPOINTS": "", "FLANNELD_ETCD_ENDPOINTS": etcd.endpoint}
    ctl.ok("subnets", "list", env=env)
    assert ctl("--etcd-endpoints", dead["FLANNELCTL_ETCD_ENDPOINTS"], "--etcd-timeout", "1", "subnets", "list",
               env=env).returncode == 1
    assert ctl("subnets", "list", "-o", "xml").returncode == 2  # usage errors: click's status


def test_completion_script_and_candidates(ctl):
    assert "_FLANNELCTL_COMPLETE=bash_complete" in ctl.ok("completion", "bash")
    proc = ctl(env={"_FLANNELCTL_COMPLETE": "bash_complete", "COMP_WORDS": "flannelctl sub", "COMP_CWORD": "1"})
    assert "subnets" in proc.stdout


def test_list_5000_leases_every_row_with_its_ttl(ctl, etcd_client, etcd_prefix):
    """Correct at scale; the 1 s budget itself is measured by bench/ctl.py (~0.7 s here).

    The bound below only guards against falling back to one grpcio call per lease, or worse.
    """
    head = leases_prefix(etcd_prefix)
    etcd_client.put(etcd_prefix + "/config", json.dumps({"Network": "198.18.0.0/16", "SubnetLen": 30,
                                                      "Backend": {"Type": "vxlan"}}).encode())
    for n in range(5000):
        lid = etcd_client.grant(86400 - n)
        value = (f'{{"PublicIP":"198.51.{100 + n // 250}.{n % 250 + 1}","PublicIPv6":null,"BackendType":"vxlan",'
                 f'"BackendData":{{"VNI":1,"VtepMAC":"0e:00:00:00:{n // 256:02x}:{n % 256:02x}"}}}}')
        etcd_client.put(f"{head}198.18.{n // 64}.{(n % 64) * 4}-30", value.encode(), lid)
    start = time.perf_counter()
    out = ctl.ok("subnets", "list", "--no-headers").splitlines()
    took = time.perf_counter() - start
    assert len(out) == 5000 and out[0].startswith("198.18.0.0/30") and out[-1].startswith("198.18.78.28/30")
    # each row's own TTL (granted 86400 - n): 23h59m for the first, 22h36m for the last
    assert out[0].split()[-1] == "23h59m" and out[-1].split()[-1] == "22h36m"
    assert not [line for line in out if line.endswith("expired")]
    assert took < 2.5, f"subnets list over 5000 leases took {took:.2f}s"


def test_doctor_healthy_then_names_a_deleted_route(make_cluster):
    cluster = make_cluster(2, NETWORK)
    cluster.start_all("--ip-masq")
    node, peer = cluster.nodes
    ctl = Ctl(cluster.etcd, cluster.prefix)
    ctl.env["FLANNELCTL_ETCD_ENDPOINTS"] = cluster.endpoint
    args = ("doctor", "--subnet-file", node.subnet_file)
    out = ctl.ok(*args, ns=node.ns)
    assert "healthy" in out.splitlines()[-1]
    assert "1 peer(s): 1 neighbours, 1 FDB entries, 1 routes" in out
    assert "iptables: masquerade and forward rules in place" in out

    cluster.stop(node)  # flanneld would repair the drift at once; its state stays on stop
    peer_subnet = cluster.subnet(peer)
    peer_gw = peer_subnet.split("/")[0]
    node.sh("ip", "route", "del", peer_subnet)
    proc = ctl(*args, ns=node.ns)
    assert proc.returncode == 1
    assert f"missing route {peer_subnet} via {peer_gw} dev flannel.1 onlink" in proc.stdout
    assert "1 problem(s) found" in proc.stdout

    node.sh("ip", "route", "add", peer_subnet, "via", peer_gw, "dev", "flannel.1", "onlink")
    node.sh("ip", "neigh", "replace", "198.18.250.0", "lladdr", "0e:00:00:00:00:99", "dev", "flannel.1",
            "nud", "permanent")
    node.sh("iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG")
    proc = ctl(*args, "-o", "json", ns=node.ns)
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["healthy"] is False
    problems = [f["text"] for f in report["findings"] if f["level"] == "problem"]
    assert any(t.startswith("stale neighbour 198.18.250.0 lladdr 0e:00:00:00:00:99") for t in problems)
    assert sum("FLANNEL-POSTRTG" in t and "missing rule" in t for t in problems) == 6

    os.unlink(node.subnet_file)
    proc = ctl(*args, ns=node.ns)
    assert proc.returncode == 1 and "is missing: flanneld has not written it" in proc.stdout


def test_doctor_in_nftables_mode(make_cluster):
    cluster = make_cluster(2, {**NETWORK, "EnableNFTables": True})
    cluster.start_all("--ip-masq")
    node, _peer = cluster.nodes
    ctl = Ctl(cluster.etcd, cluster.prefix)
    ctl.env["FLANNELCTL_ETCD_ENDPOINTS"] = cluster.endpoint
    args = ("doctor", "--subnet-file", node.subnet_file)
    out = ctl(*args, ns=node.ns)
    assert out.returncode == 0, out.stdout
    assert "nftables: masquerade and forward rules in place" in out.stdout
    cluster.stop(node)
    node.sh("nft", "flush", "chain", "ip", "flannel-ipv4", "postrtg")
    proc = ctl(*args, ns=node.ns)
    assert proc.returncode == 1 and "nftables IPv4: missing rule" in proc.stdout, proc.stdout
