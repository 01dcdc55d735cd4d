"""The per-node daemon: wiring from etcd to the kernel, and the one event loop.

Start-up, in upstream's order: network config (waits until present and valid) → external
interface → VXLAN device (reusing the MAC of our existing lease) → lease → firewall rules →
first full reconcile (programs every peer, removes entries of peers that left while we were
down) → subnet.env → ready (/readyz, sd_notify READY=1).

Then one loop consumes events: lease batches from the watcher thread, drift notifications from
the netlink monitor thread, and its own timers (lease renewal, firewall check, periodic full
reconcile). Lease events become incremental kernel changes; drift and timers become full
reconciles. SIGTERM/SIGINT end the loop and leave devices, routes, rules, subnet.env and the
lease in place, so a restart is hitless.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import queue
import select
import signal
import threading
import time
from dataclasses import dataclass, field

from . import __version__, subnetenv
from .backends import PeerPlan, VxlanBackend, VxlanOptions, merge, validate_backend
from .backends.vxlan import normalize_mac
from .config import ConfigError, NetworkConfig, parse_config
from .config_monitor import ConfigMonitor
from .etcd_options import EtcdOptions
from .firewall import FamilyRules, Firewall, FirewallError, FirewallSpec
from .health import HealthServer, Metrics, sd_notify
from .iface import IfaceError, IfaceOptions
from .iface import select as select_iface
from .kernel import Kernel, KernelError, Monitor
from .lease import Lease, LeaseAttrs, leases_prefix
from .leases import SUBNET_TTL, LeaseError, LeaseEvent, LeaseManager, LeaseWatcher
from .reconciler import Reconciler, Report
from .registry import Registry, RegistryError

log = logging.getLogger("flanneld")

CONFIG_NOT_FOUND = "flannel config not found in etcd store. Did you create your config using etcdv3 API?"
DRIFT_DEBOUNCE = 0.02
RETRY_AFTER_FAILURE = 1.0


class FatalError(Exception):
    """Start-up cannot continue (bad interface, unsupported config...); exit non-zero."""


@dataclass(frozen=True)
class DaemonOptions:
    etcd: EtcdOptions = field(default_factory=EtcdOptions)
    iface: IfaceOptions = field(default_factory=IfaceOptions)
    subnet_file: str = subnetenv.DEFAULT_PATH
    renew_margin_minutes: int = 60
    ip_masq: bool = False
    masq_random_fully: bool = True
    iptables_resync: float = 5.0
    forward_rules: bool = True
    blackhole_route: bool = False
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0
    reconcile_interval: float = 30.0
    lease_ttl: int = SUBNET_TTL


class Daemon:
    def __init__(self, options: DaemonOptions) -> None:
        self.opts = options
        self.stop_event = threading.Event()
        self.events: queue.Queue[tuple[str, object]] = queue.Queue()
        self.metrics = Metrics()
        self._describe_metrics()
        self.phase = "starting"
        self.ready = False
        self.loop_heartbeat = time.monotonic()
        self.registry: Registry | None = None
        self.kernel: Kernel | None = None
        self.monitor: Monitor | None = None
        self.watcher: LeaseWatcher | None = None
        self.config_monitor: ConfigMonitor | None = None
        self.health_server: HealthServer | None = None
        self.peers: dict[str, PeerPlan] = {}
        self._skip_logged: dict[str, tuple[str, ...]] = {}
        self._misfit_logged: dict[str, str] = {}

    # -- observability -----------------------------------------------------------------------

    def _describe_metrics(self) -> None:
        m = self.metrics
        for name, kind, text in [
            ("flanneld_info", "gauge", "Build information"),
            ("flanneld_ready", "gauge", "1 once subnet.env is written and rules are installed"),
            ("flanneld_etcd_watch_connected", "gauge", "1 while the lease watch stream is up"),
            ("flanneld_peers", "gauge", "Peer leases currently programmed"),
            ("flanneld_skipped_leases", "gauge", "Peer leases that cannot be programmed (see log)"),
            ("flanneld_lease_events_total", "counter", "Lease events received, by kind"),
            ("flanneld_reconciles_total", "counter", "Reconciles, by kind and trigger"),
            ("flanneld_reconcile_seconds_total", "counter", "Time spent reconciling"),
            ("flanneld_netlink_writes_total", "counter", "Table entries written or deleted"),
            ("flanneld_netlink_write_failures_total", "counter", "Table writes the kernel refused"),
            ("flanneld_drift_repairs_total", "counter", "Full reconciles that found and repaired drift"),
            ("flanneld_firewall_repairs_total", "counter", "Firewall reinstalls after drift"),
            ("flanneld_lease_renewals_total", "counter", "Successful lease renewals"),
            ("flanneld_lease_expiry_seconds", "gauge", "Seconds until our lease expires (-1: reservation)"),
        ]:
            m.describe(name, kind, text)
        m.set("flanneld_info", 1, version=__version__)
        m.set("flanneld_ready", 0)

    def health(self) -> tuple[bool, str]:
        if self.registry is None:
            return True, ""
        watcher = self.watcher
        # Down means it failed: a watch still opening its first stream (just after start) is not.
        if watcher is not None and self.ready and not watcher.connected and watcher.last_error:
            return False, f"etcd lease watch is down: {watcher.last_error}"
        stuck = time.monotonic() - self.loop_heartbeat
        if self.ready and stuck > max(60.0, 3 * self.opts.reconcile_interval):
            return False, f"event loop has not run for {stuck:.0f}s"
        return True, ""

    def readiness(self) -> tuple[bool, str]:
        return self.ready, self.phase

    # -- start-up steps ----------------------------------------------------------------------

    def _retry(self, what: str, fn, delay: float = 1.0, max_delay: float = 10.0):  # type: ignore[no-untyped-def]
        """Call fn until it succeeds or we are stopped; log each distinct failure once."""
        last = ""
        while not self.stop_event.is_set():
            try:
                return fn()
            except (RegistryError, LeaseError, KernelError) as exc:
                if str(exc) != last:
                    log.warning("%s: %s (retrying)", what, exc)
                    last = str(exc)
                self.stop_event.wait(delay)
                delay = min(delay * 2, max_delay)
        return None

    def wait_for_config(self) -> NetworkConfig | None:
        key = f"{self.opts.etcd.prefix}/config"
        last = ""
        while not self.stop_event.is_set():
            try:
                assert self.registry is not None
                kv = self.registry.get(key)
                if kv is None:
                    raise ConfigError(CONFIG_NOT_FOUND)
                config = parse_config(kv.value)
                validate_backend(config.backend)
                return config
            except (ConfigError, RegistryError) as exc:
                if str(exc) != last:
                    log.warning("waiting for a valid network config at %s: %s", key, exc)
                    last = str(exc)
            self.phase = f"waiting for network config: {last}"
            self.stop_event.wait(1.0)
        return None

    def run(self) -> int:
        """Run until SIGTERM/SIGINT. Returns the exit status."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        log.info("flanneld %s starting; etcd %s", __version__, self.opts.etcd.describe())
        try:
            # what can fail on the node's own account fails now, before a lease or a device exists
            subnetenv.check_writable(self.opts.subnet_file)
            if self.opts.healthz_port:
                self._serve_health()
            self.registry = Registry(self.opts.etcd)
            if not self._start():
                return 0
            self._loop()
            return 0
        except (FatalError, IfaceError, ConfigError, FirewallError, RegistryError, KernelError,
                subnetenv.SubnetEnvError) as exc:
            log.error("%s", exc)
            return 1
        finally:
            self._shutdown()

    def _serve_health(self) -> None:
        host, port = self.opts.healthz_ip, self.opts.healthz_port
        try:
            self.health_server = HealthServer(host, port, self.health, self.readiness, self.metrics)
        except OSError as exc:
            raise FatalError(f"cannot serve /healthz on {host}:{port} (--healthz-ip/--healthz-port): "
                             f"{exc.strerror or exc}") from None
        self.health_server.start()
        log.info("serving /healthz, /readyz and /metrics on %s:%d", host, self.health_server.port)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self.stop_event.is_set():
            log.info("received %s: stopping, leaving the data plane and lease in place",
                     signal.Signals(signum).name)
        self.stop_event.set()
        self.events.put(("stop", None))

    def _start(self) -> bool:
        self.phase = "waiting for network config"
        config = self.wait_for_config()
        if config is None:
            return False
        self.config = config
        log.info("network config: %s", ", ".join(
            f"IPv{f.version} {f.network} /{f.subnet_len} ({f.subnet_min}..{f.subnet_max})" for f in config.families()
        ) + f", backend {config.backend.type}")

        self.phase = "selecting the external interface"
        self.kernel = Kernel()
        ext, why = select_iface(self.kernel, self.opts.iface, config.enable_ipv4, config.enable_ipv6)
        log.info("using interface %s (%s): %s", ext.name, why, ", ".join(
            f"public {a}" for a in (ext.public_ip, ext.public_ipv6) if a is not None))
        self.backend = VxlanBackend(config, ext, VxlanOptions.parse(config.backend), self.opts.blackhole_route)
        self.reconciler = Reconciler(self.kernel)

        previous = None
        try:
            previous = subnetenv.read(self.opts.subnet_file)
        except subnetenv.SubnetEnvError as exc:
            log.warning("ignoring unreadable subnet file: %s", exc)
        self.macs: dict[str, str] = {}
        self.leases = LeaseManager(self.registry, config, self.opts.etcd.prefix, ttl=self.opts.lease_ttl,  # type: ignore[arg-type]
                                   renew_margin=self.opts.renew_margin_minutes * 60, previous=previous,
                                   recognizes=lambda lease: self.backend.published_by_us(lease, self.macs))

        self.phase = "setting up the VXLAN device"
        probe = self.backend.lease_attrs({link.name: "00:00:00:00:00:00" for link in self.backend.links({})})
        existing = self._retry("looking up our lease", lambda: self.leases.find_own(probe))
        if self.stop_event.is_set():
            return False
        macs = self._lease_macs(existing) if existing else {}
        links = self.reconciler.ensure_links(self.backend.links(macs))
        self.macs = {name: info.mac for name, info in links.items() if info.mac}

        self.phase = "acquiring a subnet lease"
        own = self._retry("acquiring a subnet lease", lambda: self.leases.acquire(self.backend.lease_attrs(self.macs)))
        if own is None:
            return False
        self.own: Lease = own.lease
        self._publish_lease_gauge()

        self.phase = "installing firewall rules"
        self.firewall = Firewall(self._firewall_spec())
        self.firewall.remove_other_mode()
        self.firewall.apply()

        self.phase = "programming peers"
        self.watcher = LeaseWatcher(self.registry, self.opts.etcd.prefix)  # type: ignore[arg-type]
        initial = self._retry("listing leases", self.watcher.resync)
        if initial is None:
            return False
        self._apply_lease_events(initial, incremental=False)
        self._full_reconcile("start")

        self._write_subnet_env()
        self.ready = True
        self.phase = "ready"
        self.metrics.set("flanneld_ready", 1)
        sd_notify(f"READY=1\nSTATUS=lease {self.own.describe()}, {len(self.peers)} peers")
        log.info("ready: lease %s, %d peers, subnet file %s", self.own.describe(), len(self.peers),
                 self.opts.subnet_file)

        release_memory()  # the initial listing's buffers are garbage now
        threading.Thread(target=self.watcher.run, args=(self._on_leases,), name="lease-watch", daemon=True).start()
        self.monitor = Monitor()
        threading.Thread(target=self._watch_netlink, name="netlink-monitor", daemon=True).start()
        self.config_monitor = ConfigMonitor(self.registry, f"{self.opts.etcd.prefix}/config", config,  # type: ignore[arg-type]
                                            lambda c: validate_backend(c.backend), self.opts.reconcile_interval)
        threading.Thread(target=self.config_monitor.run, name="config-monitor", daemon=True).start()
        return True

    @staticmethod
    def _lease_macs(lease: Lease) -> dict[str, str]:
        macs: dict[str, str] = {}
        vni = lease.backend.get("VNI", 1)
        for name, data in ((f"flannel.{vni}", lease.backend), (f"flannel-v6.{vni}", lease.backend_v6)):
            mac = normalize_mac(data.get("VtepMAC"))
            if mac:
                macs[name] = mac
        return macs

    def _firewall_spec(self) -> FirewallSpec:
        fams = []
        for fam, pod in ((self.config.ipv4, self.own.subnet), (self.config.ipv6, self.own.subnet6)):
            if fam is not None and pod is not None:
                fams.append(FamilyRules(fam.network, pod))
        return FirewallSpec(tuple(fams), self.opts.ip_masq, self.opts.forward_rules, self.opts.masq_random_fully,
                            self.config.enable_nftables)

    def _write_subnet_env(self) -> None:
        env = subnetenv.for_lease(self.own, self.config.ipv4.network if self.config.ipv4 else None,  # type: ignore[arg-type]
                                  self.config.ipv6.network if self.config.ipv6 else None,  # type: ignore[arg-type]
                                  self.backend.mtu(), self.opts.ip_masq)
        subnetenv.write(self.opts.subnet_file, env)
        log.info("wrote %s (%s, MTU %d)", self.opts.subnet_file, self.own.describe(), env.mtu)

    def _publish_lease_gauge(self) -> None:
        left = self.leases.seconds_until_renewal()
        self.metrics.set("flanneld_lease_expiry_seconds",
                         -1 if left is None else round(left + self.leases.renew_margin))

    # -- threads feeding the loop ------------------------------------------------------------

    def _on_leases(self, events: list[LeaseEvent]) -> None:
        self.events.put(("leases", events))

    def _watch_netlink(self) -> None:
        assert self.monitor is not None
        while not self.stop_event.is_set():
            try:
                readable, _, _ = select.select([self.monitor], [], [], 0.5)
                if not readable:
                    continue
                batch = self.monitor.read()
            except (OSError, ValueError) as exc:
                if not self.stop_event.is_set():
                    log.error("netlink monitor failed (%s); drift is now only repaired periodically", exc)
                return
            if batch is None:
                self.events.put(("drift", "netlink notifications were lost (buffer overflow)"))
                continue
            for kind, payload in batch:
                if self.reconciler.is_drift(kind, payload):
                    self.events.put(("drift", f"netlink notification {kind}"))
                    break

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        now = time.monotonic()
        next_fw = now + self.opts.iptables_resync
        next_full = now + self.opts.reconcile_interval
        retry_full_at: float | None = None
        while not self.stop_event.is_set():
            self.loop_heartbeat = now = time.monotonic()
            self.metrics.set("flanneld_etcd_watch_connected", int(self.watcher.connected if self.watcher else 0))
            renew_in = self.leases.seconds_until_renewal()
            deadlines = [next_fw, next_full] + ([now + renew_in] if renew_in is not None else [])
            if retry_full_at is not None:
                deadlines.append(retry_full_at)
            items = self._collect(max(0.0, min(deadlines) - now))
            if self.stop_event.is_set():
                break
            drift = [str(v) for k, v in items if k == "drift"]
            lease_events = [e for k, v in items if k == "leases" for e in v]  # type: ignore[attr-defined]
            full_reason = ""
            if lease_events:
                full_reason = self._apply_lease_events(lease_events, incremental=True)
                if len(lease_events) > 1000:
                    release_memory()
            now = time.monotonic()
            renew_in = self.leases.seconds_until_renewal()
            if renew_in is not None and renew_in <= 0:
                full_reason = self._renew() or full_reason
            if drift:
                full_reason = full_reason or "drift"
            if now >= next_full:
                full_reason = full_reason or "periodic"
                next_full = now + self.opts.reconcile_interval
            if retry_full_at is not None and now >= retry_full_at:
                full_reason = full_reason or "retry"
            if full_reason:
                report = self._full_reconcile(full_reason)
                retry_full_at = time.monotonic() + RETRY_AFTER_FAILURE if report is None or report.failures else None
            if now >= next_fw:
                self._check_firewall()
                next_fw = time.monotonic() + self.opts.iptables_resync

    def _collect(self, timeout: float) -> list[tuple[str, object]]:
        """Wait for events, then drain what is queued (a drift burst gets a short debounce)."""
        try:
            items = [self.events.get(timeout=timeout)]
        except queue.Empty:
            return []
        if items[0][0] == "drift":
            time.sleep(DRIFT_DEBOUNCE)
        while True:
            try:
                items.append(self.events.get_nowait())
            except queue.Empty:
                return items

    def _apply_lease_events(self, events: list[LeaseEvent], incremental: bool) -> str:
        """Fold lease events into the peer plans; write the change. Returns a reason for a full reconcile."""
        added, removed = PeerPlan(), PeerPlan()
        full_reason = ""
        for ev in events:
            self.metrics.inc("flanneld_lease_events_total", kind=ev.kind)
            key = ev.key
            if key == self.own.key:
                full_reason = self._own_lease_event(ev) or full_reason
                continue
            lease = ev.lease  # decoded once here, dropped after planning
            old = self.peers.pop(key, None)
            if old is not None:
                _extend(removed, old)
            if ev.kind != "removed":
                plan = self.backend.plan_peer(lease)
                self.peers[key] = plan
                _extend(added, plan)
                self._log_skips(key, plan)
                self._log_misfit(key, lease)
            else:
                self._skip_logged.pop(key, None)
                self._misfit_logged.pop(key, None)
            if incremental:  # the initial listing is summarised, not logged lease by lease
                public = lease.public_ip if lease.subnet else lease.public_ipv6
                log.info("lease %s %s (%s)", ev.kind, lease.describe(), public)
        self.metrics.set("flanneld_peers", len(self.peers))
        self.metrics.set("flanneld_skipped_leases", sum(1 for p in self.peers.values() if p.skipped))
        if incremental and not full_reason and (added.neighs or added.fdbs or added.routes or removed.neighs
                                                or removed.fdbs or removed.routes):
            report = self.reconciler.change(added, removed)
            self._account(report, "lease")
            if report.failures:
                return "failed writes"
        return full_reason

    def _log_skips(self, key: str, plan: PeerPlan) -> None:
        reasons = tuple(plan.skipped)
        if not reasons:
            self._skip_logged.pop(key, None)
        elif self._skip_logged.get(key) != reasons:
            log.warning("not programming all of lease %s: %s", key, "; ".join(reasons))
            self._skip_logged[key] = reasons

    def _log_misfit(self, key: str, lease: Lease) -> None:
        """Warn once per lease whose subnet departs from the config (it is programmed all the same)."""
        reasons = [f"IPv{fam.version} subnet {subnet}: {why}"
                   for fam, subnet in ((self.config.ipv4, lease.subnet), (self.config.ipv6, lease.subnet6))
                   if fam is not None and subnet is not None and subnet.subnet_of(fam.network)  # type: ignore[arg-type]
                   and (why := fam.misfit(subnet))]
        text = "; ".join(reasons)
        if text and self._misfit_logged.get(key) != text:
            log.warning("lease %s%s does not fit the network config (%s); programming it anyway: its node routes "
                        "its pods there (a node started with another config?)", leases_prefix(self.opts.etcd.prefix),
                        key, text)
        if text:
            self._misfit_logged[key] = text
        else:
            self._misfit_logged.pop(key, None)

    def _own_lease_event(self, ev: LeaseEvent) -> str:
        if ev.kind == "removed":
            log.warning("our lease %s was deleted from etcd; re-acquiring", self.own.describe())
            return self._reacquire()
        if LeaseAttrs.of(ev.lease) != LeaseAttrs.of(self.own):
            log.warning("our lease %s was modified in etcd; restoring our attributes", self.own.describe())
            if not self._retry("restoring our lease", self._republish):
                return self._reacquire()
        return ""

    def _republish(self) -> bool:
        return self.leases.republish(self.backend.lease_attrs(self.macs))

    def _reacquire(self) -> str:
        own = self._retry("re-acquiring a subnet lease",
                          lambda: self.leases.acquire(self.backend.lease_attrs(self.macs)))
        if own is None:
            return ""
        changed = own.lease.key != self.own.key
        self.own = own.lease
        self._publish_lease_gauge()
        if changed:
            log.warning("our subnet changed to %s", self.own.describe())
            self.peers.pop(self.own.key, None)
            self.firewall = Firewall(self._firewall_spec())
            self.firewall.apply()
            self._write_subnet_env()
        return "own lease re-acquired"

    def _renew(self) -> str:
        ok = self._retry("renewing our lease", self.leases.renew)
        if ok is False:
            return self._reacquire()
        self.metrics.inc("flanneld_lease_renewals_total")
        self._publish_lease_gauge()
        return ""

    def _full_reconcile(self, trigger: str) -> Report | None:
        desired = merge(self.backend.base_state(self.own, self.macs), self.peers.values())
        try:
            report = self.reconciler.reconcile(desired)
        except KernelError as exc:
            log.warning("full reconcile (%s) failed: %s; retrying", trigger, exc)
            return None
        self._account(report, trigger)
        if trigger in ("drift", "periodic", "retry") and report.changed:
            self.metrics.inc("flanneld_drift_repairs_total")
            log.warning("repaired drift (%s): %d entries written, %d deleted%s", trigger, report.written,
                        report.deleted, f", recreated {', '.join(report.created)}" if report.created else "")
        elif report.changed:
            log.info("full reconcile (%s): %d entries written, %d deleted in %.0f ms", trigger, report.written,
                     report.deleted, report.seconds * 1000)
        if report.macs and report.macs != self.macs:
            log.warning("VTEP MAC changed (%s); republishing our lease", report.macs)
            self.macs = report.macs
            self._retry("republishing our lease", self._republish)
            self.own = self.leases.own.lease if self.leases.own else self.own
        return report

    def _account(self, report: Report, trigger: str) -> None:
        self.metrics.inc("flanneld_reconciles_total", kind="full" if report.full else "incremental", trigger=trigger)
        self.metrics.inc("flanneld_reconcile_seconds_total", report.seconds)
        self.metrics.inc("flanneld_netlink_writes_total", report.written + report.deleted)
        self.metrics.inc("flanneld_netlink_write_failures_total", len(report.failures))

    def _check_firewall(self) -> None:
        try:
            if not self.firewall.check():
                self.metrics.inc("flanneld_firewall_repairs_total")
        except FirewallError as exc:
            log.warning("firewall check failed: %s", exc)

    def _shutdown(self) -> None:
        self.stop_event.set()
        if self.ready:
            sd_notify("STOPPING=1")
        if self.watcher is not None:
            self.watcher.stop()
        if self.config_monitor is not None:
            self.config_monitor.stop()
        if self.health_server is not None:
            self.health_server.stop()
        if self.monitor is not None:
            self.monitor.close()
        if self.registry is not None:
            self.registry.close()
        if self.kernel is not None:
            self.kernel.close()


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (keeps RSS at the working set)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _extend(into: PeerPlan, plan: PeerPlan) -> None:
    into.neighs += plan.neighs
    into.fdbs += plan.fdbs
    into.routes += plan.routes
