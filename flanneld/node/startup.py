"""Start-up, in upstream's order, ending in a running :class:`~flanneld.node.overlay.Overlay`.

network config (waits until present and valid) → external interface → backend (devices adopted
or created, reusing the identity our existing lease publishes) → lease → firewall rules → first
full reconcile (programs every peer, removes entries of peers that left while we were down) →
subnet.env. The caller then declares readiness.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from flanneld.dataplane.iface import IfaceOptions
from flanneld.dataplane.iface import select as select_iface
from flanneld.dataplane.netlink import Kernel
from flanneld.dataplane.reconciler import Reconciler
from flanneld.etcd.client import EtcdClient
from flanneld.etcd.errors import EtcdError
from flanneld.leases.manager import LeaseManager
from flanneld.leases.watcher import LeaseWatcher
from flanneld.model import subnetenv
from flanneld.model.config import ConfigError, NetworkConfig, parse_config
from flanneld.node.instance import InstanceLock
from flanneld.node.metrics import Metrics
from flanneld.node.overlay import Overlay, OverlaySettings
from flanneld.node.prober import ProbeMtu, ProbeUpdate
from flanneld.node.retry import retry
from flanneld.plan.backend import NodeSettings, create_backend, published_addresses, validate_backend
from flanneld.plan.state import ObservedLink

log = logging.getLogger("flanneld")

CONFIG_NOT_FOUND = "flannel config not found in etcd store. Did you create your config using etcdv3 API?"


@dataclass(frozen=True)
class StartSettings:
    overlay: OverlaySettings
    iface: IfaceOptions
    node: NodeSettings
    lease_ttl: int
    renew_margin_seconds: float
    instance: InstanceLock = field(default_factory=InstanceLock)  # this node's identity is locked here
    probe_sink: Callable[[ProbeUpdate | ProbeMtu], None] | None = None  # the prober's inbox, if it runs


def validate(config: NetworkConfig) -> None:
    """Beyond parsing: the backend must be one this build runs, with valid options."""
    validate_backend(config.backend)


def wait_for_config(etcd_client: EtcdClient, prefix: str, stop: threading.Event,
                    phase: Callable[[str], None]) -> NetworkConfig | None:
    key = f"{prefix}/config"
    last = ""
    while not stop.is_set():
        try:
            kv = etcd_client.get(key)
            if kv is None:
                raise ConfigError(CONFIG_NOT_FOUND)
            config = parse_config(kv.value)
            validate(config)
            return config
        except (ConfigError, EtcdError) as exc:
            if str(exc) != last:
                log.warning("waiting for a valid network config at %s: %s", key, exc)
                last = str(exc)
        phase(f"waiting for network config: {last}")
        stop.wait(1.0)
    return None


def start(etcd_client: EtcdClient, kernel: Kernel, s: StartSettings, metrics: Metrics, stop: threading.Event,
          phase: Callable[[str], None]) -> tuple[Overlay, LeaseWatcher] | None:
    """Everything up to a programmed node; None when stopped meanwhile."""
    phase("waiting for network config")
    config = wait_for_config(etcd_client, s.overlay.prefix, stop, phase)
    if config is None:
        return None
    log.info("network config: %s", ", ".join(
        f"IPv{f.version} {f.network} /{f.subnet_len} ({f.subnet_min}..{f.subnet_max})" for f in config.families()
    ) + f", backend {config.backend.type}")

    phase("selecting the external interface")
    ext, why = select_iface(kernel, s.iface, config.enable_ipv4, config.enable_ipv6)
    log.info("using interface %s (%s): %s", ext.name, why, ", ".join(
        f"public {a}" for a in (ext.public_ip, ext.public_ipv6) if a is not None))
    s.instance.node(s.overlay.prefix, " ".join(str(a) for a in (ext.public_ip, ext.public_ipv6) if a is not None))
    backend = create_backend(config, ext, s.node)
    reconciler = Reconciler(kernel, ext.name, ext.index)

    previous = None
    try:
        previous = subnetenv.read(s.overlay.subnet_file)
    except subnetenv.SubnetEnvError as exc:
        log.warning("ignoring unreadable subnet file: %s", exc)
    devices: dict[str, ObservedLink] = {}  # filled below; the recognizer reads it when acquiring
    leases = LeaseManager(etcd_client, config, s.overlay.prefix, ttl=s.lease_ttl, renew_margin=s.renew_margin_seconds,
                          previous=previous, recognizes=lambda lease: backend.published_by_us(lease, devices))

    phase(f"setting up the {config.backend.type} backend")
    existing = retry("looking up our lease", lambda: leases.find_own(published_addresses(config, ext)), stop)
    if stop.is_set():
        return None
    backend.adopt(existing)  # type: ignore[arg-type]
    devices.update(reconciler.ensure_links(backend.links()))
    # a backend's own start-up step (extension: PreStartupCommand, whose output we publish) that
    # fails is waited out like a bad config, never published half-done
    if retry(f"preparing the {config.backend.type} backend", lambda: backend.prepare() or True, stop,
             also=(ConfigError,)) is None:
        return None

    phase("acquiring a subnet lease")
    own = retry("acquiring a subnet lease", lambda: leases.acquire(backend.lease_attrs(devices)), stop)
    if own is None:
        return None
    overlay = Overlay(config, backend, reconciler, leases, s.overlay, metrics, stop, devices,
                      probe_sink=s.probe_sink)
    overlay.adopt_lease(own.lease)  # type: ignore[attr-defined]

    phase("installing firewall rules")
    overlay.install_firewall()
    backend.start(overlay.own)

    phase("programming peers")
    watcher = LeaseWatcher(etcd_client, s.overlay.prefix)
    # find_own's listing if acquiring wrote nothing (a restart costs etcd one listing), else a
    # fresh one made after our write (see LeaseManager.take_listing); the watch goes on from it
    listing = retry("listing leases", lambda: leases.take_listing() or watcher.serializable_listing(), stop)
    if listing is None:
        return None
    overlay.apply_lease_events(watcher.adopt(listing), incremental=False)  # type: ignore[arg-type]
    overlay.full_reconcile("start")
    overlay.write_subnet_env()
    return overlay, watcher

