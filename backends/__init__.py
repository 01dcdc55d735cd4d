"""Backends: each turns (own lease, peer leases, config) into a desired kernel state.

Installed as ``flanneld.backends``. Importing this package registers every backend of this
build; the daemon, doctor and flannelctl find them by ``Backend.Type`` (:func:`lookup`).
"""

from __future__ import annotations

from . import alloc, extension, host_gw, vxlan, wireguard  # noqa: F401 - each registers itself
from .base import (
    Backend,
    BackendType,
    External,
    NodeSettings,
    PeerPlan,
    Plan,
    create_backend,
    lookup,
    merge,
    published_addresses,
    register,
    supported,
    validate_backend,
)

__all__ = ["Backend", "BackendType", "External", "NodeSettings", "PeerPlan", "Plan", "create_backend", "lookup",
           "merge", "published_addresses", "register", "supported", "validate_backend"]
