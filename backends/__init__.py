"""Backends: each turns (own lease, peer leases, config) into a desired kernel state.

Installed as ``flanneld.backends``. The daemon, doctor and flannelctl find a backend by its
``Backend.Type`` (:func:`lookup`), which imports its module (registering it) on first use.
"""

from __future__ import annotations

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
