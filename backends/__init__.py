"""Backends: each turns (own lease, peer leases, config) into a desired kernel state.

Installed as ``flanneld.backends``.
"""

from __future__ import annotations

from ..config import BackendConfig, ConfigError
from .base import Backend, External, PeerPlan, Plan, merge
from .vxlan import VxlanBackend, VxlanOptions

SUPPORTED = {"vxlan": VxlanOptions}


def validate_backend(backend: BackendConfig) -> None:
    """Check the Backend object of a network config; ConfigError with the reason if unusable."""
    options = SUPPORTED.get(backend.type)
    if options is None:
        raise ConfigError(f"backend type {backend.type!r} is not supported (supported: {', '.join(SUPPORTED)})")
    options.parse(backend)


__all__ = ["SUPPORTED", "Backend", "External", "PeerPlan", "Plan", "VxlanBackend", "VxlanOptions", "merge",
           "validate_backend"]
