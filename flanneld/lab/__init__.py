"""Clusters in network namespaces, etcd servers, probes and the demo: used by the tests, the
benchmarks and flanneld-demo only; nothing in the product imports it.
"""
