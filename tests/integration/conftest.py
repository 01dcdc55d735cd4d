"""Fixtures for kernel integration tests (root, namespaces, the session etcd)."""

from __future__ import annotations

import pytest

from flanneld.lab.flannel import Cluster


@pytest.fixture
def make_cluster(session_lab, etcd):
    """Factory for namespace clusters on the session etcd; every cluster is removed afterwards."""
    made: list[Cluster] = []

    def make(nodes: int = 3, config: dict | None = None, *, etcd=etcd, **kw) -> Cluster:
        cluster = Cluster(session_lab, etcd, nodes, config, **kw)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()
