"""Session set-up shared by all tests.

As root, the whole test process moves into its own network namespace (``<prefix>-ctl``) before
any thread exists, so nothing a test does can touch the root namespace, and etcd (also started
there) is reachable from cluster namespaces through a veth. Everything carries the run's prefix
and is removed at the end, even after failures; leftovers of crashed runs are removed at start.
"""

from __future__ import annotations

import os
import threading
import uuid

import pytest

from flanneld import lab
from flanneld.etcd.client import EtcdClient
from flanneld.etcd.options import EtcdOptions

IS_ROOT = os.geteuid() == 0


def pytest_configure(config: pytest.Config) -> None:
    if not IS_ROOT:
        return
    lab.cleanup_stale()
    session_lab = lab.Lab()
    session_lab.create_control()
    if threading.active_count() != 1:
        raise RuntimeError("tests must enter their namespace before any thread starts")
    lab.enter_namespace(session_lab.ctl)
    config.flannel_lab = session_lab  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    session_lab = getattr(config, "flannel_lab", None)
    if session_lab is not None:
        session_lab.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs root (network namespaces, etcd)")
    for item in items:
        if "integration" in item.path.parts or "machines" in item.path.parts:
            item.add_marker(pytest.mark.kernel)
            if not IS_ROOT:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def session_lab(pytestconfig: pytest.Config) -> lab.Lab:
    return pytestconfig.flannel_lab  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def etcd(session_lab: lab.Lab):
    server = lab.EtcdServer("main")
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def etcd_prefix() -> str:
    return f"/flannel-test/{uuid.uuid4().hex[:12]}/network"


@pytest.fixture
def etcd_client(etcd: lab.EtcdServer, etcd_prefix: str):
    """A etcd_client on the session etcd; etcd leases the test created are revoked afterwards."""
    reg = EtcdClient(EtcdOptions(endpoints=(etcd.endpoint,), prefix=etcd_prefix))
    before = etcd.lease_ids()
    yield reg
    for lease_id in etcd.lease_ids() - before:
        reg.revoke(lease_id)
    reg.close()

