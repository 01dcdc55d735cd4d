"""flanneld against a 3-member etcd cluster through etcd's gRPC proxy (which coalesces watches)."""

from __future__ import annotations

import signal
import time

import pytest

from flanneld import lab
from flanneld.etcd.client import EtcdClient
from flanneld.etcd.options import EtcdOptions
from flanneld.lab.flannel import NETWORK
from flanneld.lab.probes import BothWays, eventually
from flanneld.lab.readers import routes
from flanneld.model.lease import leases_prefix

WATCHERS = "etcd_debugging_mvcc_watcher_total"


@pytest.fixture(scope="module")
def members(session_lab):
    cluster = lab.EtcdCluster("sc")
    cluster.start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def proxy(members):
    server = lab.EtcdProxy(members)
    server.start()
    yield server
    server.destroy()


def watchers(members: lab.EtcdCluster) -> float:
    return sum(lab.etcd_metric(m.endpoint, WATCHERS) for m in members.members if m.proc is not None)


def fake(cluster, n: int) -> str:
    subnet = f"198.18.{200 + n}.0/24"
    value = (f'{{"PublicIP":"198.51.100.{100 + n}","PublicIPv6":null,"BackendType":"vxlan",'
             f'"BackendData":{{"VNI":1,"VtepMAC":"0e:fb:00:00:00:{n:02x}"}}}}')
    cluster.etcd_client.put(leases_prefix(cluster.prefix) + subnet.replace("/", "-"), value.encode())
    return subnet


def test_daemons_through_the_grpc_proxy(make_cluster, members, proxy):
    base = watchers(members)
    cluster = make_cluster(3, NETWORK, etcd=proxy)
    cluster.start_all()
    node1, node2, node3 = cluster.nodes
    # the proxy coalesces the three daemons' identical watches into one on etcd: once every daemon
    # watches and the proxy's watch has reached etcd, there is that one and no other
    for node in cluster.nodes:
        eventually(lambda n=node: "watching leases from revision" in n.log(), timeout=5, what="every daemon watching")
    eventually(lambda: watchers(members) - base >= 1, timeout=5, what="the proxy's watch on etcd")
    time.sleep(0.5)
    assert watchers(members) - base == 1
    probes = BothWays(cluster.pod(node1), cluster.pod(node2))
    time.sleep(0.5)
    tally = probes.stop()
    assert tally.lost == 0 and tally.sent > 50, tally[:2]

    new = fake(cluster, 1)  # watch through the proxy
    eventually(lambda: all(new in routes(n) for n in cluster.nodes), timeout=3, what="event through the proxy")
    reg = EtcdClient(EtcdOptions(endpoints=(proxy.endpoint,), prefix=cluster.prefix))
    lease_id = reg.grant(60)
    assert reg.keepalive(lease_id) > 0  # renewals are keepalives: they pass the proxy
    reg.revoke(lease_id)
    key, subnet = cluster.lease_key(node1), cluster.subnet(node1)
    cluster.etcd_client.delete(key)  # re-acquisition: a transaction through the proxy
    eventually(lambda: cluster.etcd_client.get(key) is not None, timeout=5, what="own lease re-acquired")
    assert cluster.subnet(node1) == subnet

    # compaction while the daemon's stream is down: the proxy restarts, history is compacted away
    daemon = node2.procs[-1]
    daemon.send_signal(signal.SIGSTOP)
    try:
        proxy.restart()
        gone = fake(cluster, 2)
        cluster.etcd_client.delete(leases_prefix(cluster.prefix) + gone.replace("/", "-"))
        came = fake(cluster, 3)
        revision, _ = cluster.etcd_client.list_prefix(cluster.prefix)
        cluster.etcd_client.compact(revision)
    finally:
        daemon.send_signal(signal.SIGCONT)
    try:
        eventually(lambda: came in routes(node2) and gone not in routes(node2), timeout=10, what="re-listed via proxy")
    except AssertionError as exc:  # seen twice in CI, never alone: keep what the daemon and the proxy said
        with open(proxy.log_path, errors="replace") as fh:
            said = fh.read()[-3000:]
        raise AssertionError(f"{exc}\n--- {node2.ns} ---\n{node2.log()[-4000:]}\n--- proxy ---\n{said}") from None

    assert cluster.stop(node3) == 0  # restart through the proxy keeps the subnet
    before = cluster.subnet(node3)
    cluster.start(node3)
    assert cluster.subnet(node3) == before
    reg.close()
    for node in cluster.nodes:
        assert "Traceback" not in node.log()


def test_direct_to_the_cluster_every_daemon_watches(make_cluster, members):
    base = watchers(members)
    cluster = make_cluster(3, NETWORK, etcd=members)
    cluster.start_all()
    eventually(lambda: watchers(members) - base >= 3, timeout=5, what="one watcher per daemon")
