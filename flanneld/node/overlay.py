"""The running overlay of one node: its lease, its peers and the kernel state they imply.

Owned by the daemon's loop thread, which alone calls these methods. Lease events become
incremental kernel changes; drift, timers and failed writes become full reconciles; our own
lease being deleted, modified or expired is repaired here (re-acquisition). Which backend runs
is not this module's business: it holds a :class:`~flanneld.backends.Backend`.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flanneld.dataplane.brnetfilter import bridge_calls_iptables, problem
from flanneld.dataplane.firewall import Firewall, FirewallError, FirewallSpec
from flanneld.dataplane.iface import read_onlink
from flanneld.dataplane.netlink import KernelError
from flanneld.dataplane.reconciler import Reconciler, Report
from flanneld.etcd.errors import EtcdError
from flanneld.leases.listing import list_leases
from flanneld.leases.manager import LeaseManager
from flanneld.leases.overlaps import Overlaps, rank
from flanneld.leases.watcher import LeaseEvent
from flanneld.model import subnetenv
from flanneld.model.config import NetworkConfig
from flanneld.model.lease import Lease, LeaseAttrs, leases_prefix
from flanneld.node.metrics import Metrics
from flanneld.node.prober import ProbeMtu, ProbeUpdate
from flanneld.node.retry import retry
from flanneld.plan.backend import SKIP_KINDS, Backend, PeerPlan, merge
from flanneld.plan.probes import Target, target_for
from flanneld.plan.state import ObservedLink

log = logging.getLogger("flanneld")


@dataclass
class PeerCounts:
    """Running totals over the peer plans, for /metrics and the shared-key check: kept up to date
    per change instead of recounted over every plan on each lease event (at 5000 peers that
    recount was 0.5 ms of a 0.6 ms event, on every node, for every lease put)."""

    skipped: int = 0  # plans with at least one skipped part
    skip_kinds: Counter[str] = field(default_factory=Counter)  # plans per skip kind
    backends: Counter[str] = field(default_factory=Counter)  # plans per BackendType
    wg_keys: Counter[str] = field(default_factory=Counter)  # WireGuard peer entries per public key

    def add(self, plan: PeerPlan, sign: int) -> None:
        """Count `plan` in (sign 1) or out (sign -1)."""
        if plan.skipped:
            self.skipped += sign
            for kind in set(plan.skipped_kinds):
                self.skip_kinds[kind] += sign
        self.backends[plan.backend_type] += sign
        for peer in plan.wg_peers:
            self.wg_keys[peer.key] += sign


@dataclass(frozen=True)
class OverlaySettings:
    prefix: str  # etcd key prefix
    subnet_file: str
    ip_masq: bool
    masq_random_fully: bool
    forward_rules: bool


def firewall_spec(config: NetworkConfig, own: Lease, s: OverlaySettings) -> FirewallSpec:
    return FirewallSpec.for_lease(config, own, s.ip_masq, s.forward_rules, s.masq_random_fully)


@dataclass
class Overlay:
    config: NetworkConfig
    backend: Backend
    reconciler: Reconciler
    leases: LeaseManager
    settings: OverlaySettings
    metrics: Metrics
    stop: threading.Event
    devices: dict[str, ObservedLink]
    own: Lease = field(init=False)
    firewall: Firewall = field(init=False)
    peers: dict[str, PeerPlan] = field(default_factory=dict)  # changed only by _set_plan/_drop_plan
    counts: PeerCounts = field(default_factory=PeerCounts)
    _skip_logged: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _misfit_logged: dict[str, str] = field(default_factory=dict)
    # device -> VTEP MAC -> the lease whose FDB entry it is (no tuple per peer: 0.3 MB at 5000)
    _vteps: dict[str, dict[str, str]] = field(default_factory=dict)
    # which of overlapping leases (ours included) is programmed
    overlaps: Overlaps = field(default_factory=Overlaps)
    # the whole plans of peers held back (their subnet overlaps a lease that outranks them, or
    # another lease holds their VTEP MAC): programmed as soon as that ends
    _held: dict[str, PeerPlan] = field(default_factory=dict)
    replan_pending: bool = False  # what the underlay reaches changed; peers not yet planned again
    _bridge_nf: dict[int, bool] = field(default_factory=dict)  # family -> last seen on (warned on a change)
    # the prober's inbox (flanneld.node.prober): peers that came, went or changed their programming
    probe_sink: Callable[[ProbeUpdate | ProbeMtu], None] | None = None
    _probe_programmed: list[tuple[str, bool]] = field(default_factory=list)

    # -- our lease ---------------------------------------------------------------------------

    def adopt_lease(self, own: Lease) -> set[str]:
        """Take `own` as our lease. Returns the peers whose overlap standing it changed (a new
        subnet of ours may overlap a peer's, or stop overlapping one)."""
        before = getattr(self, "own", None)
        changed = self.overlaps.remove(before.key) if before is not None and before.key != own.key else set()
        changed |= self.overlaps.put(own.key, rank(own, 0, self.config, own=True))
        self.own = own
        self.backend.adopt(own)
        left = self.leases.seconds_until_renewal()
        self.metrics.lease_expiry.set(-1 if left is None else round(left + self.leases.renew_margin))
        return changed - {own.key}

    def install_firewall(self) -> None:
        self.firewall = Firewall(firewall_spec(self.config, self.own, self.settings))
        self.firewall.remove_other_mode()
        self.firewall.apply()
        self.check_bridge_netfilter()

    def write_subnet_env(self) -> None:
        env = subnetenv.for_lease(self.own, self.config.ipv4.network if self.config.ipv4 else None,  # type: ignore[arg-type]
                                  self.config.ipv6.network if self.config.ipv6 else None,  # type: ignore[arg-type]
                                  self.backend.mtu(), self.settings.ip_masq)
        subnetenv.write(self.settings.subnet_file, env)
        log.info("wrote %s (%s, MTU %d)", self.settings.subnet_file, self.own.describe(), env.mtu)

    def _attrs(self) -> LeaseAttrs:
        return self.backend.lease_attrs(self.devices)

    def _republish(self) -> bool:
        if not self.leases.republish(self._attrs()):
            return False
        if self.leases.own is not None:
            self.adopt_lease(self.leases.own.lease)
        return True

    def reacquire(self) -> str:
        got = retry("re-acquiring a subnet lease", lambda: self.leases.acquire(self._attrs()), self.stop)
        if got is None:
            return ""
        old = self.own
        changed = got.lease.key != old.key  # type: ignore[attr-defined]
        standing = self.adopt_lease(got.lease)  # type: ignore[attr-defined]
        if changed:
            self.metrics.subnet_moves.inc()
            log.warning("our subnet moved from %s to %s: another node holds %s now (our lease had expired, e.g. "
                        "while etcd could not hear us). Pods started before now keep addresses in %s and cannot "
                        "reach the overlay, and the bridge plugin refuses new pods while the pod bridge holds the "
                        "old gateway: delete those pods, then remove that address from the bridge (flannelctl "
                        "doctor names it)", old.describe(), self.own.describe(), old.describe(), old.describe(),
                        extra={"old": old.describe(), "new": self.own.describe()})
            self._drop_plan(self.own.key)
            self._held.pop(self.own.key, None)
            self._readmit(standing, PeerPlan(), PeerPlan())  # the full reconcile below writes them
            self.firewall = Firewall(firewall_spec(self.config, self.own, self.settings))
            self.firewall.apply()
            self.write_subnet_env()
        return "own lease re-acquired"

    def renew(self) -> str:
        ok = retry("renewing our lease", self.leases.renew, self.stop)
        if ok is False:
            return self.reacquire()
        self.metrics.renewals.inc()
        self.adopt_lease(self.own)
        return ""

    def _own_lease_event(self, ev: LeaseEvent) -> str:
        if ev.kind == "removed":
            log.warning("our lease %s was deleted from etcd; re-acquiring", self.own.describe())
            return self.reacquire()
        if LeaseAttrs.of(ev.lease) != LeaseAttrs.of(self.own):
            log.warning("our lease %s was modified in etcd; restoring our attributes", self.own.describe())
            if not retry("restoring our lease", self._republish, self.stop):
                return self.reacquire()
        return ""

    # -- peers -------------------------------------------------------------------------------

    def apply_lease_events(self, events: Iterable[LeaseEvent], incremental: bool) -> str:
        """Fold lease events into the peer plans; write the change. Returns a reason for a full reconcile.

        `events` is iterated once: the start hands in the listing's events as they are decoded."""
        added, removed = PeerPlan(), PeerPlan()
        full_reason = ""
        kinds: Counter[str] = Counter()
        standing: set[str] = set()  # peers whose overlap standing changed
        misfits: list[tuple[str, str]] = []  # (key, how it departs from the config), said after admission
        probe_upserts: list[tuple[Target, bool]] = []
        probe_removed: list[str] = []
        for ev in events:
            kinds[ev.kind] += 1
            key = ev.key
            if key == self.own.key:
                if incremental:  # the initial listing may predate our own write; the watch brings it
                    full_reason = self._own_lease_event(ev) or full_reason
                continue
            lease = ev.lease  # decoded once here, dropped after planning
            old = self._drop_plan(key)
            if old is not None:
                _extend(removed, old)
            if ev.kind != "removed":
                standing |= self.overlaps.put(key, rank(lease, ev.create_revision, self.config))
                plan = self._plan(key, lease)
                self._set_plan(key, plan)
                _extend(added, plan)
                self._log_skips(key, plan)
                if self.probe_sink is not None:
                    probe_upserts.append((target_for(lease, self.config), programmed(plan)))
                if (text := self._misfit(lease)) or key in self._misfit_logged:
                    misfits.append((key, text))
            else:
                standing |= self.overlaps.remove(key)
                probe_removed.append(key)
                self._held.pop(key, None)
                self._skip_logged.pop(key, None)
                self._misfit_logged.pop(key, None)
            self.backend.peer_changed(ev.kind, lease)
            if incremental:  # the initial listing is summarised, not logged lease by lease
                public = lease.public_ip if lease.subnet else lease.public_ipv6
                log.info("lease %s %s (%s)", ev.kind, lease.describe(), public,
                         extra={"lease": lease.describe(), "peer": str(public), "event": ev.kind})
        self._readmit(standing | set(self._held), added, removed)
        if self.probe_sink is not None and (probe_upserts or probe_removed or self._probe_programmed):
            self.probe_sink(ProbeUpdate(tuple(probe_upserts), tuple(probe_removed), tuple(self._probe_programmed)))
        self._probe_programmed.clear()
        for key, text in misfits:
            self._log_misfit(key, text)
        for kind, count in kinds.items():
            self.metrics.lease_events.labels(kind=kind).inc(count)
        self._count_peers()
        if incremental and not full_reason and (added.wg_peers or removed.wg_peers) and self._shared_keys(added,
                                                                                                   removed):
            full_reason = "leases sharing a WireGuard key changed"  # merged into one peer by a full reconcile
        if incremental and not full_reason and (added.neighs or added.fdbs or added.routes or added.wg_peers
                                                or removed.neighs or removed.fdbs or removed.routes
                                                or removed.wg_peers):
            report = self.reconciler.change(added, removed)
            self._account(report, "lease")
            if report.failures:
                return "failed writes"
        return full_reason

    def underlay_changed(self) -> str:
        """An address or on-link route of the external interface came or went: when the backend's
        peer plans depend on what it reaches directly (host-gw, DirectRouting), plan every known
        peer again from a fresh listing (peer leases are not kept once planned). Returns a reason
        for a full reconcile, which writes the difference."""
        underlay = self.reconciler.underlay
        try:
            onlink = read_onlink(self.reconciler.kernel, self.reconciler.underlay_index)
        except KernelError as exc:
            log.warning("reading what %s reaches directly failed: %s; the next change retries", underlay, exc)
            return ""
        if not self.backend.underlay_changed(onlink):
            return ""
        self.replan_pending = True
        if not onlink:  # its addresses are gone (the interface going away?): nothing to list etcd over
            log.info("interface %s now reaches no network directly; planning peers again when it does", underlay)
            return ""
        log.info("interface %s now reaches %s directly; planning every peer again", underlay,
                 ", ".join(map(str, onlink)))
        return self.replan()

    def addresses_missing(self) -> list[str]:
        """The addresses this overlay runs over (the chosen ones of the external interface) that
        the interface no longer holds: renumbered, or removed by hand."""
        ext = self.backend.ext
        wanted = [str(a) for a in (ext.ip4, ext.ip6) if a is not None]
        if not wanted:
            return []
        held = {a.ip for a in self.reconciler.kernel.addresses(self.reconciler.underlay_index)}
        return [a for a in wanted if a not in held]

    def replan(self) -> str:
        """Plan every known peer again from one listing; when etcd cannot answer now (the
        underlay may be what went away), leave it pending for the next full reconcile rather
        than hold the loop in a retry."""
        try:
            listing = list_leases(self.leases.etcd_client, self.settings.prefix)
        except EtcdError as exc:
            log.info("planning peers again waits for etcd: %s", exc)
            return ""
        self.replan_pending = False
        for key, listed in listing.leases.items():  # peers the watch told us of: it brings the others
            if key != self.own.key and key in self.peers:
                self._drop_plan(key)
                plan = self._plan(key, listed.lease)
                self._set_plan(key, plan)
                self._log_skips(key, plan)
        self._count_peers()
        return "underlay changed"

    def underlay_mtu_changed(self, mtu: int) -> str:
        """The external interface's MTU changed under us: the overlay's devices follow it (unless
        Backend.MTU fixes them) on the full reconcile this asks for, and subnet.env says the new
        MTU to pods started from now on. Pods started before keep theirs: said once, here."""
        before = self.backend.mtu()
        if not self.backend.underlay_mtu_changed(mtu) or self.backend.mtu() == before:
            return ""
        after = self.backend.mtu()
        log.warning("interface %s's MTU is now %d: the overlay's is %d (was %d), and subnet.env says so; pods "
                    "started before keep MTU %d%s: recreate them", self.reconciler.underlay, mtu, after, before,
                    before, " and lose full-size packets" if after < before else "")
        self.write_subnet_env()
        if self.probe_sink is not None:
            self.probe_sink(ProbeMtu(after))
        return "underlay MTU changed"

    def _shared_keys(self, added: PeerPlan, removed: PeerPlan) -> bool:
        """Whether a WireGuard peer that came or went shares its public key with another lease
        (the incremental path writes one lease's peer; one_per_key merges them)."""
        came = Counter(p.key for p in added.wg_peers)
        keys = set(came) | {p.key for p in removed.wg_peers}
        holders = self.counts.wg_keys
        return any(holders[key] > came[key] for key in keys if holders[key] > 1 or key not in came)

    def _plan(self, key: str, lease: Lease) -> PeerPlan:
        """What is programmed for a peer lease: the backend's plan, as far as _admit lets it."""
        plan = self.backend.plan_peer(lease).compact()
        plan.backend_type = lease.backend_type
        return self._admit(key, plan)

    def _admit(self, key: str, plan: PeerPlan) -> PeerPlan:
        """`plan`, unless it must be held back: while a lease that outranks it overlaps its subnet
        (both would claim one VTEP address or route: see flanneld.leases.overlaps), or while another
        lease holds its VTEP MAC (two FDB entries with one key would take turns in the kernel on
        every reconcile). A plan held back is kept whole, for _readmit."""
        self._held.pop(key, None)
        reason, kind = self.overlaps.why(key), "overlap"
        if not reason:
            held = sorted((holder, f.mac) for f in plan.fdbs
                          if (holder := self._vteps.get(f.dev, {}).get(f.mac, key)) != key)
            if not held:
                return plan
            holder, mac = held[0]
            reason, kind = f"its VtepMAC {mac} is already the VTEP of lease {holder} (a copied lease?)", "backend-data"
        self._held[key] = plan
        return plan.held_back(reason, kind)

    def _readmit(self, keys: Iterable[str], added: PeerPlan, removed: PeerPlan) -> None:
        """Admit the plans of `keys` again (their overlap standing changed, or what held them back
        may have gone), adding what that writes or removes to `added` and `removed`."""
        for key in list(keys):
            current = self.peers.get(key)
            if current is None:
                continue
            whole = self._held.get(key, current)
            self._drop_plan(key)
            plan = self._admit(key, whole)
            self._set_plan(key, plan)
            if self.probe_sink is not None and programmed(plan) != programmed(current):
                self._probe_programmed.append((key, programmed(plan)))
            if plan is not current:
                _retract(added, removed, current)
                _extend(added, plan)
                self._log_skips(key, plan)

    def _set_plan(self, key: str, plan: PeerPlan) -> None:
        self.peers[key] = plan
        self.counts.add(plan, 1)
        for f in plan.fdbs:
            self._vteps.setdefault(f.dev, {})[f.mac] = key

    def _drop_plan(self, key: str) -> PeerPlan | None:
        plan = self.peers.pop(key, None)
        if plan is not None:
            self.counts.add(plan, -1)
            for f in plan.fdbs:
                macs = self._vteps.get(f.dev, {})
                if macs.get(f.mac) == key:
                    del macs[f.mac]
        return plan

    def _count_peers(self) -> None:
        m, counts = self.metrics, self.counts
        m.peers.set(len(self.peers))
        m.skipped.set(counts.skipped)
        for kind in SKIP_KINDS:
            m.skipped_by_reason.labels(reason=kind).set(counts.skip_kinds[kind])
        m.peers_by_backend.clear()  # a type no peer runs any more disappears
        for backend, count in counts.backends.items():
            if count:
                m.peers_by_backend.labels(backend=backend or "none").set(count)

    def _log_skips(self, key: str, plan: PeerPlan) -> None:
        reasons = tuple(plan.skipped)
        if not reasons:
            self._skip_logged.pop(key, None)
        elif self._skip_logged.get(key) != reasons:
            log.warning("not programming all of lease %s: %s", key, "; ".join(reasons), extra={"key": key})
            self._skip_logged[key] = reasons

    def _misfit(self, lease: Lease) -> str:
        """How a lease inside our network departs from the config ('' when it fits)."""
        return "; ".join(f"{fc.family} subnet {subnet}: {why}" for fc in self.config.families()
                         if (subnet := fc.family.subnet(lease)) is not None
                         and (why := fc.misfit(subnet)) and fc.contains(subnet))

    def _log_misfit(self, key: str, text: str) -> None:
        """Warn once per lease whose subnet departs from the config (`text`): it is programmed all
        the same, unless it overlaps a lease that outranks it (then _log_skips said so)."""
        if key in self._held and self.overlaps.beaten_by(key):
            return
        if text and self._misfit_logged.get(key) != text:
            log.warning("lease %s%s does not fit the network config (%s); programming it anyway: its node routes "
                        "its pods there (a node started with another config?)", leases_prefix(self.settings.prefix),
                        key, text)
        if text:
            self._misfit_logged[key] = text
        else:
            self._misfit_logged.pop(key, None)

    # -- the kernel --------------------------------------------------------------------------

    def full_reconcile(self, trigger: str) -> Report | None:
        desired = merge(self.backend.base_state(self.own), self.peers.values())
        try:
            report = self.reconciler.reconcile(desired)
        except KernelError as exc:
            log.warning("full reconcile (%s) failed: %s; retrying", trigger, exc)
            return None
        self._account(report, trigger)
        if trigger in ("drift", "periodic", "retry") and report.changed:
            self.metrics.drift_repairs.inc()
            log.warning("repaired drift (%s): %d entries written, %d deleted%s", trigger, report.written,
                        report.deleted, f", recreated {', '.join(report.created)}" if report.created else "",
                        extra={"trigger": trigger})
        elif report.changed:
            log.info("full reconcile (%s): %d entries written, %d deleted in %.0f ms", trigger, report.written,
                     report.deleted, report.seconds * 1000, extra={"trigger": trigger})
        self.devices = report.devices
        if LeaseAttrs.of(self.own) != self._attrs():
            log.warning("our devices no longer match our lease (%s); republishing it",
                        ", ".join(f"{d.name} {d.mac}" for d in self.devices.values()))
            retry("republishing our lease", self._republish, self.stop)
        return report

    def _account(self, report: Report, trigger: str) -> None:
        m = self.metrics
        m.reconciles.labels(kind="full" if report.full else "incremental", trigger=trigger).inc()
        m.reconcile_seconds.inc(report.seconds)
        if report.full:
            m.full_reconcile.observe(report.seconds)
        m.netlink_writes.inc(report.written + report.deleted)
        m.netlink_failures.inc(len(report.failures))

    def check_bridge_netfilter(self) -> None:
        """Warn when bridged pod traffic stops going through iptables (once per change), and
        keep /metrics saying so (see flanneld.dataplane.brnetfilter)."""
        for fc in self.config.families():
            state = bridge_calls_iptables(fc.version)
            self.metrics.bridge_nf.labels(family=f"ipv{fc.version}").set(1 if state else 0)
            if self._bridge_nf.get(fc.version, True) and not state:
                log.warning("%s", problem(fc.version, state))
            self._bridge_nf[fc.version] = bool(state)

    def check_firewall(self) -> None:
        self.check_bridge_netfilter()
        try:
            self.metrics.firewall_checks.inc()
            if not self.firewall.check():
                self.metrics.firewall_repairs.inc()
        except FirewallError as exc:
            log.warning("firewall check failed: %s", exc)


def programmed(plan: PeerPlan) -> bool:
    """Whether a peer's plan programs a path to it (one held back whole does not)."""
    return bool(plan.routes or plan.wg_peers or plan.fdbs)


def _extend(into: PeerPlan, plan: PeerPlan) -> None:
    into.neighs += plan.neighs
    into.fdbs += plan.fdbs
    into.routes += plan.routes
    into.wg_peers += plan.wg_peers


def _retract(added: PeerPlan, removed: PeerPlan, plan: PeerPlan) -> None:
    """Take back `plan`'s entries: those `added` still holds (not written yet: the plan came in
    the same batch) leave it, the others are to be removed."""
    for name in ("neighs", "fdbs", "routes", "wg_peers"):
        pending, gone = getattr(added, name), getattr(removed, name)
        for entry in getattr(plan, name):
            if entry in pending:
                pending.remove(entry)
            else:
                gone.append(entry)
