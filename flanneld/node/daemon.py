"""The per-node daemon: threads, the one event loop, health and shutdown.

Start-up (:mod:`flanneld.node.startup`) ends in a running :class:`~flanneld.node.overlay.Overlay`, which
the loop thread alone owns. Other threads only send it typed events (:mod:`flanneld.node.events`):
lease batches from the watcher, raw netlink notification batches from the monitor (the loop
decides what is drift: it owns the reconciler's maps), a stop from the signal thread. The loop's
own timers drive lease renewal, the firewall check and the periodic full reconcile.
SIGTERM/SIGINT end the loop and leave devices, routes, rules, subnet.env and the lease in place,
so a restart is hitless.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import faulthandler
import gc
import logging
import queue
import select
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from flanneld import __version__
from flanneld.dataplane import nlcodec as nl
from flanneld.dataplane.firewall import FirewallError
from flanneld.dataplane.iface import IfaceError, IfaceOptions, touches_onlink
from flanneld.dataplane.netlink import Kernel, KernelError, Monitor, WriteFailure
from flanneld.etcd.client import EtcdClient
from flanneld.etcd.errors import EtcdError
from flanneld.etcd.options import EtcdOptions
from flanneld.leases.manager import SUBNET_TTL
from flanneld.leases.watcher import LeaseEvent, LeaseWatcher
from flanneld.model import subnetenv
from flanneld.model.config import ConfigError
from flanneld.node.config_monitor import ConfigMonitor
from flanneld.node.events import Event, LeaseBatch, NetlinkBatch, Stop
from flanneld.node.health import Check, HealthServer, sd_notify
from flanneld.node.instance import InstanceError, InstanceLock
from flanneld.node.metrics import Metrics
from flanneld.node.overlay import Overlay, OverlaySettings
from flanneld.node.prober import Prober
from flanneld.node.signals import STOP_SIGNALS, call_on_signals, format_stacks
from flanneld.node.startup import StartSettings, start, validate
from flanneld.node.threads import named_thread
from flanneld.plan.backend import NodeSettings

log = logging.getLogger("flanneld")

DRIFT_DEBOUNCE = 0.02
STOP_GRACE = 20.0  # seconds a stop may take before the process dumps its stacks and exits
RETRY_AFTER_FAILURE = 1.0
# What the kernel answers, on every try, for a write it will never take (an FDB entry pointing at
# a multicast MAC, a malformed route): retried with a backoff, not once a second.
PERMANENT_REFUSALS = frozenset({errno.EINVAL, errno.EOPNOTSUPP})


def retry_delay(previous: float | None, failures: Sequence[WriteFailure], cap: float) -> float | None:
    """Seconds until the next full reconcile after one that left `failures` (None: no retry).

    A failure that may pass (a device briefly gone, ENOBUFS) is retried after a second; when every
    failure is a refusal that will not change, the wait doubles each time, up to `cap` (the
    periodic reconcile's interval), so one bad entry never costs every node a full dump a second.
    """
    if not failures:
        return None
    if previous is None or not all(f.errno in PERMANENT_REFUSALS for f in failures):
        return RETRY_AFTER_FAILURE
    return min(previous * 2, cap)


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
    wireguard_provider: str = "auto"
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0
    reconcile_interval: float = 30.0
    lease_ttl: int = SUBNET_TTL
    probe_interval: float = 30.0  # each peer's data path probed once per this many seconds (0: off)


class Daemon:
    def __init__(self, options: DaemonOptions) -> None:
        self.opts = options
        self.stop_event = threading.Event()
        self.events: queue.Queue[Event] = queue.Queue()
        self.metrics = Metrics(__version__)
        self.phase = "starting"
        self.ready = False
        self.loop_heartbeat = time.monotonic()
        self.etcd_client: EtcdClient | None = None
        self.kernel: Kernel | None = None
        self.monitor: Monitor | None = None
        self.watcher: LeaseWatcher | None = None
        self.config_monitor: ConfigMonitor | None = None
        self.health_server: HealthServer | None = None
        self.overlay: Overlay | None = None
        self.prober: Prober | None = None
        self.instance = InstanceLock()  # held until the process ends (see flanneld.node.instance)
        self.underlay_gone = False  # the external interface was deleted (loop thread; /readyz reads it)
        self.address_lost = ""  # the addresses we run over that the interface no longer holds (the same)

    # -- observability -----------------------------------------------------------------------

    def health(self) -> list[Check]:
        """Liveness: only a stuck daemon fails it (see flanneld.node.health)."""
        stuck = time.monotonic() - self.loop_heartbeat
        if self.ready and stuck > max(60.0, 3 * self.opts.reconcile_interval):
            return [Check("event-loop", False, f"event loop has not run for {stuck:.0f}s")]
        return [Check("event-loop", True)]

    def readiness(self) -> list[Check]:
        """Readiness: our lease, data plane, rules and subnet.env in place, and the lease watch up."""
        checks = [Check("node", self.ready, "" if self.ready else self.phase)]
        if self.underlay_gone and self.overlay is not None:
            checks.append(Check("underlay", False, f"interface {self.overlay.reconciler.underlay} is gone"))
        elif self.address_lost and self.overlay is not None:
            checks.append(Check("underlay", False, f"interface {self.overlay.reconciler.underlay} no longer holds "
                                                   f"{self.address_lost}"))
        watcher = self.watcher
        # Down means it failed: a watch still opening its first stream (just after start) is not.
        if watcher is not None and self.ready and not watcher.connected and watcher.last_error:
            checks.append(Check("etcd-watch", False, f"etcd lease watch is down: {watcher.last_error}"))
        elif watcher is not None:
            checks.append(Check("etcd-watch", True, f"revision {watcher.revision}"))
        return checks

    def probe_table(self) -> list[dict[str, object]] | None:
        """The prober's per-peer table (None while it is off or not running)."""
        prober = self.prober
        return prober.table() if prober is not None and prober.running else None

    # -- running ---------------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM/SIGINT. Returns the exit status."""
        call_on_signals(self._on_signal, (*STOP_SIGNALS, signal.SIGUSR1))
        log.info("flanneld %s starting; etcd %s", __version__, self.opts.etcd.describe())
        try:
            # what can fail on the node's own account fails now, before a lease or a device exists
            subnetenv.check_writable(self.opts.subnet_file)
            self.instance.subnet_file(self.opts.subnet_file)
            if self.opts.healthz_port:
                self._serve_health()
            self.etcd_client = EtcdClient(self.opts.etcd)
            if not self._start():
                return 0
            self._loop()
            return 0
        except (FatalError, IfaceError, ConfigError, FirewallError, EtcdError, KernelError,
                subnetenv.SubnetEnvError, InstanceError) as exc:
            log.error("%s", exc)
            return 1
        finally:
            self._shutdown()

    def _serve_health(self) -> None:
        host, port = self.opts.healthz_ip, self.opts.healthz_port
        try:
            self.health_server = HealthServer(host, port, self.health, self.readiness, self.metrics.render,
                                              self.probe_table)
        except OSError as exc:
            raise FatalError(f"cannot serve /healthz on {host}:{port} (--healthz-ip/--healthz-port): "
                             f"{exc.strerror or exc}") from None
        self.health_server.start()
        log.info("serving /healthz, /readyz, /metrics and /probes on %s:%d", host, self.health_server.port)

    def _on_signal(self, sig: signal.Signals) -> None:
        """On the signal thread (:mod:`flanneld.node.signals`), so taking the queue's lock is safe.
        SIGUSR1 prints every thread's stack (what to ask for when a daemon seems stuck) and the
        daemon goes on."""
        if sig == signal.SIGUSR1:
            log.warning("SIGUSR1: the stack of every thread follows\n%s", format_stacks())
            return
        if not self.stop_event.is_set():
            log.info("received %s: stopping, leaving the data plane and lease in place", sig.name)
            # A stop that hangs (a library stuck in C code holding the interpreter lock: seen once in
            # CI, where not even SIGUSR1's dump ran) would keep systemd waiting for its SIGKILL: after
            # STOP_GRACE every thread's stack goes to the log, from faulthandler's own C thread, and
            # the process exits (status 1). The data plane stays, as on any stop.
            faulthandler.dump_traceback_later(STOP_GRACE, exit=True)
        self.stop_event.set()
        self.events.put(Stop())

    def _set_phase(self, phase: str) -> None:
        self.phase = phase

    def _start(self) -> bool:
        o = self.opts
        settings = StartSettings(
            overlay=OverlaySettings(o.etcd.prefix, o.subnet_file, o.ip_masq, o.masq_random_fully, o.forward_rules),
            iface=o.iface, node=NodeSettings(blackhole_route=o.blackhole_route,
                                                wireguard_provider=o.wireguard_provider), lease_ttl=o.lease_ttl,
            renew_margin_seconds=o.renew_margin_minutes * 60, instance=self.instance)
        if o.probe_interval > 0:
            self.prober = Prober(o.probe_interval, self.metrics, self.stop_event)
            settings = replace(settings, probe_sink=self.prober.send)
        self.kernel = Kernel()
        assert self.etcd_client is not None
        started = start(self.etcd_client, self.kernel, settings, self.metrics, self.stop_event, self._set_phase)
        if started is None:
            return False
        self.overlay, self.watcher = started
        overlay = self.overlay
        self.ready = True
        self.phase = "ready"
        self.metrics.ready.set(1)
        self.metrics.watch(self.watcher)
        sd_notify(f"READY=1\nSTATUS=lease {overlay.own.describe()}, {len(overlay.peers)} peers")
        log.info("ready: lease %s, %d peers, subnet file %s", overlay.own.describe(), len(overlay.peers),
                 o.subnet_file)

        if self.prober is not None:
            self.prober.configure(overlay.config, overlay.backend.mtu())  # takes in the listing's peers
        release_memory()  # the initial listing's buffers (and the prober's messages of it) are garbage now
        named_thread(self.watcher.run, "lease-watch", (self._on_leases,)).start()
        self.monitor = Monitor()
        named_thread(self._watch_netlink, "netlink-monitor").start()
        self.config_monitor = ConfigMonitor(self.etcd_client, f"{o.etcd.prefix}/config", overlay.config, validate,
                                            o.reconcile_interval)
        named_thread(self.config_monitor.run, "config-monitor").start()
        if self.prober is not None:
            named_thread(self.prober.run, "prober").start()
        return True

    # -- threads feeding the loop ------------------------------------------------------------

    def _on_leases(self, events: list[LeaseEvent]) -> None:
        self.events.put(LeaseBatch(events, time.monotonic()))

    def _watch_netlink(self) -> None:
        """Forward raw notification batches: deciding what is drift is the loop's business."""
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
            if batch != []:
                self.events.put(NetlinkBatch(batch))

    # -- the loop ----------------------------------------------------------------------------

    def _drift(self, batches: list[NetlinkBatch]) -> str:
        """Why the notifications call for a full reconcile ('' if they show only what we wanted)."""
        assert self.overlay is not None
        is_drift = self.overlay.reconciler.is_drift
        for batch in batches:
            if batch.messages is None:
                return "netlink notifications were lost (buffer overflow)"
            for kind, payload in batch.messages:
                if is_drift(kind, payload):
                    return f"netlink notification {kind}"
        return ""

    def _underlay_touched(self, batches: list[NetlinkBatch]) -> bool:
        """Whether the notifications may change what the external interface reaches directly."""
        assert self.overlay is not None
        index = self.overlay.reconciler.underlay_index
        return any(batch.messages is None or any(touches_onlink(kind, payload, index)
                                                 for kind, payload in batch.messages) for batch in batches)

    def _underlay_link(self, batches: list[NetlinkBatch]) -> str:
        """Follow the external interface being deleted and created again under its name: say
        it, hold full reconciles while it is gone (/readyz names it), rebuild on the new one.
        After lost notifications the kernel is asked what became of it."""
        assert self.overlay is not None
        reconciler = self.overlay.reconciler
        reason = ""
        for batch in batches:
            if batch.messages is None:
                found = reconciler.kernel.link(reconciler.underlay)
                seen = [(nl.RTM_DELLINK, reconciler.underlay_index)] if found is None else \
                    [(nl.RTM_NEWLINK, found.index)]
            else:
                seen = [(kind, link.index) for kind, payload in batch.messages
                        if kind in (nl.RTM_NEWLINK, nl.RTM_DELLINK)
                        and ((link := nl.parse_link(memoryview(payload))).name == reconciler.underlay
                             or link.index == reconciler.underlay_index)]
            for kind, index in seen:
                if kind == nl.RTM_DELLINK and index == reconciler.underlay_index and not self.underlay_gone:
                    self.underlay_gone = True
                    log.warning("interface %s is gone: this node's overlay is down until it returns",
                                reconciler.underlay)
                elif kind == nl.RTM_NEWLINK and (self.underlay_gone or index != reconciler.underlay_index):
                    self.underlay_gone = False
                    reconciler.underlay_recreated(index)
                    log.info("interface %s is back (index %d): rebuilding the overlay's devices on it",
                             reconciler.underlay, index)
                    reason = "underlay recreated"
        return reason

    def _underlay_address(self) -> str:
        """Follow the address the overlay runs over leaving the interface and coming back: say it
        once each way (/readyz names it meanwhile); once back, a full reconcile rebuilds what the
        kernel dropped with it (host-gw's routes through it). Another address is not taken over
        on its own: the lease, peers and devices would all change; a restart chooses again."""
        assert self.overlay is not None
        try:
            lost = ", ".join(self.overlay.addresses_missing())
        except KernelError as exc:
            log.warning("reading the addresses of %s failed: %s; the next change retries",
                        self.overlay.reconciler.underlay, exc)
            return ""
        if lost == self.address_lost:
            return ""
        before, self.address_lost = self.address_lost, lost
        underlay = self.overlay.reconciler.underlay
        if lost:
            log.warning("interface %s no longer holds %s, the address this node's overlay runs over: peers cannot "
                        "reach this node until it returns (to run over the interface's new address, restart "
                        "flanneld)", underlay, lost)
            return ""
        log.info("interface %s holds %s again: rebuilding what went with it", underlay, before)
        return "underlay address back"

    def _underlay_mtu(self, batches: list[NetlinkBatch]) -> int | None:
        """The external interface's MTU as the latest notification of it says (read from the
        kernel when notifications were lost); None when none concerned it."""
        assert self.overlay is not None
        reconciler = self.overlay.reconciler
        mtu = None
        for batch in batches:
            if batch.messages is None:
                link = reconciler.kernel.link(reconciler.underlay)
                mtu = link.mtu if link is not None else mtu
                continue
            for kind, payload in batch.messages:
                if kind == nl.RTM_NEWLINK and (link := nl.parse_link(memoryview(payload))).index == \
                        reconciler.underlay_index and link.mtu:
                    mtu = link.mtu
        return mtu

    def _loop(self) -> None:
        overlay = self.overlay
        assert overlay is not None
        now = time.monotonic()
        next_fw = now + self.opts.iptables_resync
        next_full = now + self.opts.reconcile_interval
        retry_full_at: float | None = None
        retry_wait: float | None = None
        while not self.stop_event.is_set():
            self.loop_heartbeat = now = time.monotonic()
            self.metrics.watch_connected.set(int(self.watcher.connected if self.watcher else 0))
            renew_in = overlay.leases.seconds_until_renewal()
            deadlines = [next_fw, next_full] + ([now + renew_in] if renew_in is not None else [])
            if retry_full_at is not None:
                deadlines.append(retry_full_at)
            items = self._collect(max(0.0, min(deadlines) - now))
            if self.stop_event.is_set():
                break
            drift = self._drift([e for e in items if isinstance(e, NetlinkBatch)])
            if drift:  # a burst of changes (someone flushing a table) is repaired once, after it
                time.sleep(DRIFT_DEBOUNCE)
                items += self._collect(0)
            netlink = [e for e in items if isinstance(e, NetlinkBatch)]
            batches = [e for e in items if isinstance(e, LeaseBatch)]
            lease_events = [ev for e in batches for ev in e.events]
            full_reason = ""
            if lease_events:
                full_reason = overlay.apply_lease_events(lease_events, incremental=True)
                done = time.monotonic()  # the kernel has ACKed every entry of these events
                for batch in batches:
                    for _ in batch.events:
                        self.metrics.event_programmed.observe(done - batch.received)
                if len(lease_events) > 1000:
                    release_memory()
            back = self._underlay_link(netlink)
            full_reason = back or full_reason
            if not self.underlay_gone:
                if back or self._underlay_touched(netlink):
                    full_reason = self._underlay_address() or full_reason
                    full_reason = overlay.underlay_changed() or full_reason
                if (mtu := self._underlay_mtu(netlink)) is not None:
                    full_reason = overlay.underlay_mtu_changed(mtu) or full_reason
            now = time.monotonic()
            renew_in = overlay.leases.seconds_until_renewal()
            if renew_in is not None and renew_in <= 0:
                full_reason = overlay.renew() or full_reason
            if drift:
                full_reason = full_reason or "drift"
            if now >= next_full:
                full_reason = full_reason or "periodic"
                next_full = now + self.opts.reconcile_interval
            if retry_full_at is not None and now >= retry_full_at:
                full_reason = full_reason or "retry"
            if full_reason and overlay.replan_pending and not self.underlay_gone:
                overlay.replan()
            if full_reason and (self.underlay_gone or self.address_lost):
                full_reason = ""  # nothing to build on until the interface returns (its notification says)
                retry_full_at = retry_wait = None
            if full_reason:
                report = overlay.full_reconcile(full_reason)
                retry_wait = (RETRY_AFTER_FAILURE if report is None else
                              retry_delay(retry_wait, report.failures, self.opts.reconcile_interval))
                retry_full_at = time.monotonic() + retry_wait if retry_wait is not None else None
            if overlay.replan_pending and not self.underlay_gone and retry_full_at is None:
                retry_full_at = time.monotonic() + RETRY_AFTER_FAILURE  # etcd could not list: again soon
            if now >= next_fw:
                overlay.check_firewall()
                next_fw = time.monotonic() + self.opts.iptables_resync

    def _collect(self, timeout: float) -> list[Event]:
        """Wait up to `timeout` for an event, then drain what is queued."""
        try:
            items = [self.events.get(timeout=timeout) if timeout > 0 else self.events.get_nowait()]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self.events.get_nowait())
            except queue.Empty:
                return items

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
        if self.etcd_client is not None:
            self.etcd_client.close()
        if self.kernel is not None:
            self.kernel.close()


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (keeps RSS at the working set)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
