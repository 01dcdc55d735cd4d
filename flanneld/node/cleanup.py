"""``flanneld cleanup``: remove what flanneld made on this node, for a node that leaves the cluster.

Upstream has no such command (its own request, #886, was closed won't-fix; #2063 and #1182 ask
again): a removed node leaves its devices, routes, firewall rules and subnet.env behind, and its
lease in etcd for up to 24 h, so every peer keeps programming a node that is gone.

What is ours is decided from what this node holds, not from etcd (a node leaving may no longer
reach it): subnet.env names the networks and our subnet; our devices carry upstream's names
(``flannel.<VNI>``, ``flannel-v6.<VNI>``, ``flannel-wg``, ``flannel-wg-v6``: a wireguard-go
behind one exits when its device goes, as it does with its socket); our routes are the main
table's routes into those networks that the kernel did not make (the pod bridge's route stays:
the CNI plugin's); our firewall rules are those naming those networks, in both modes (another
network's daemon on this host keeps its own). Refused while a flanneld runs for the subnet file
(its lock): the daemon would put everything back. Idempotent: a second run finds nothing.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import click

from flanneld.dataplane import nlcodec as nl
from flanneld.dataplane.firewall import FamilyRules, Firewall, FirewallError, FirewallSpec, ToolMissing
from flanneld.dataplane.netlink import Kernel, KernelError
from flanneld.etcd.client import EtcdClient, unchanged
from flanneld.etcd.errors import EtcdError
from flanneld.flags import IPAddress, etcd_flags, etcd_options
from flanneld.model import subnetenv
from flanneld.model.lease import Lease, decode_lease, leases_prefix, subnet_key
from flanneld.model.subnetenv import DEFAULT_PATH, SubnetEnv, SubnetEnvError
from flanneld.model.wgkeys import key_file
from flanneld.node.instance import InstanceError, InstanceLock, running_for
from flanneld.plan.state import ObservedLink

DEVICE_NAME = re.compile(r"flannel(-v6)?\.\d+|flannel-wg(-v6)?")
DEVICE_KINDS = ("vxlan", "wireguard", "tun", None)  # wireguard-go's device is a TUN (pyroute2: no kind)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class CleanupError(Exception):
    """Cleanup cannot go on; the message names why (one line)."""


@dataclass(frozen=True)
class Step:
    """One thing to remove: what an operator reads, and how."""

    what: str
    do: Callable[[], None]


def our_devices(links: Iterable[ObservedLink]) -> list[ObservedLink]:
    return [link for link in links if DEVICE_NAME.fullmatch(link.name) and link.kind in DEVICE_KINDS]


def networks_of(env: SubnetEnv) -> list[Network]:
    return [*env.networks, *env.ipv6_networks]


def our_route(rec: nl.RouteRecord, networks: Sequence[Network], device_indexes: set[int]) -> bool:
    """A main-table route into our networks that the kernel did not make, not through one of our
    devices (those go with the device)."""
    if rec.table != nl.RT_TABLE_MAIN or rec.protocol == nl.RTPROT_KERNEL or \
            rec.rtype not in (nl.RTN_UNICAST, nl.RTN_BLACKHOLE) or rec.oif in device_indexes:
        return False
    if not rec.dst:
        return False  # a default route
    kind = ipaddress.IPv4Network if rec.family == nl.AF_INET else ipaddress.IPv6Network
    dst = kind((int.from_bytes(rec.dst, "big"), rec.dst_len), strict=False)
    return any(dst.version == n.version and dst.subnet_of(n) for n in networks)  # type: ignore[arg-type]


def route_text(rec: nl.RouteRecord, names: dict[int, str]) -> str:
    dst = f"{nl.ip_text(rec.dst)}/{rec.dst_len}"
    if rec.rtype == nl.RTN_BLACKHOLE:
        return f"route blackhole {dst}"
    via = f" via {nl.ip_text(rec.gateway)}" if rec.gateway else ""
    dev = f" dev {names.get(rec.oif, rec.oif)}" if rec.oif is not None else ""
    return f"route {dst}{via}{dev}"


def kernel_steps(kernel: Kernel, networks: Sequence[Network]) -> list[Step]:
    """Our devices, then our routes outside them."""
    links = kernel.links()
    names = {link.index: link.name for link in links}
    devices = our_devices(links)
    steps = [Step(f"device {d.name} ({d.kind or 'tun'})", lambda index=d.index: kernel.delete_link(index))
             for d in devices]
    indexes = {d.index for d in devices}
    bulk = kernel.bulk
    for family in sorted({nl.AF_INET if n.version == 4 else nl.AF_INET6 for n in networks}):
        for _kind, payload in bulk.dump(nl.dump_routes(bulk.next_seq(), family)):
            rec = nl.parse_route(payload)
            if not our_route(rec, networks, indexes):
                continue
            message = nl.route(bulk.next_seq(), True, bytes(rec.dst or b""), rec.dst_len, None, None, False,
                               rec.rtype == nl.RTN_BLACKHOLE, rec.metric)

            def delete(message: bytes = message, text: str = route_text(rec, names)) -> None:
                if failures := bulk.write([(message, text)]):
                    raise KernelError(f"deleting {text}: {failures[0]}")

            steps.append(Step(route_text(rec, names), delete))
    return steps


def firewall_steps(env: SubnetEnv) -> list[Step]:
    """Our rules of both modes (one step per mode that holds any)."""
    pairs = [*((n, env.lease_subnet) for n in env.networks), *((n, env.lease_subnet6) for n in env.ipv6_networks)]
    families = tuple(FamilyRules(net, sub) for net, sub in pairs if sub is not None)
    steps = []
    for nftables in (False, True):
        firewall = Firewall(FirewallSpec(families, masq=False, forward=False, nftables=nftables))
        try:
            pending = firewall.pending()
        except ToolMissing:
            continue  # no such tool: no such rules
        if pending:
            steps.append(Step(f"firewall rules ({', '.join(pending)})", firewall.apply))
    return steps


def file_steps(paths: Iterable[str]) -> list[Step]:
    return [Step(f"file {path}", lambda path=path: os.unlink(path)) for path in paths if os.path.lexists(path)]


def lease_step(etcd_client: EtcdClient, prefix: str, env: SubnetEnv, ours: Callable[[Lease], bool]
               ) -> tuple[Step | None, str]:
    """Deleting our lease from etcd, so every peer drops our entries at once: only while it still
    says it is ours (`ours`), and only if nobody wrote it since we read it (its mod revision).
    Returns the step, or None and why there is none."""
    key = subnet_key(env.lease_subnet, env.lease_subnet6)
    full = leases_prefix(prefix) + key
    kv = etcd_client.get(full)
    if kv is None:
        return None, f"lease {key} is not in etcd (expired, or released already)"
    lease = decode_lease(key, kv.value)
    if not ours(lease):
        return None, f"lease {key} is another node's now ({lease.public_ip}): left in etcd"

    def release() -> None:
        if not etcd_client.txn([unchanged(full, kv.mod_revision)], deletes=[full]):
            raise CleanupError(f"lease {key} changed in etcd meanwhile (another node took it?): left there")

    return Step(f"lease {key} in etcd at {prefix}", release), ""


@click.command(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "FLANNELD"})
@click.option("--subnet-file", default=DEFAULT_PATH, show_default=True,
              help="The subnet.env of the flanneld to clean up after.")
@click.option("--dry-run", is_flag=True, help="List what would be removed; change nothing.")
@click.option("--release-lease", is_flag=True,
              help="Also delete this node's lease from etcd (only while it is still ours), so every peer drops "
                   "this node at once; uses the --etcd-* flags (or FLANNELD_ETCD_* as the unit's).")
@click.option("--remove-key", is_flag=True, help=f"Also remove the WireGuard private key ({key_file()}).")
@click.option("--public-ip", default="", type=IPAddress(4), help="The IPv4 address this node publishes, if no "
              "interface here holds it (behind NAT): its lease is still ours.")
@click.option("--public-ipv6", default="", type=IPAddress(6), help="The same for IPv6.")
@click.option("--unit-dir", default="/etc/systemd/system", show_default=True,
              help="Where install-unit put flanneld.service.")
@click.option("--defaults", "defaults_file", default="/etc/default/flanneld", show_default=True,
              help="The unit's settings file (removed only as install-unit wrote it).")
@click.option("--cni-bin-dir", default="/opt/cni/bin", show_default=True, help="Where install-cni put the plugin.")
@click.option("--cni-conf-dir", default="/etc/cni/net.d", show_default=True,
              help="Where install-cni wrote the conflist.")
@click.option("--keep-installed", is_flag=True, help="Leave the unit and the CNI plugin and conflist in place.")
@etcd_flags
def cleanup_command(subnet_file: str, dry_run: bool, release_lease: bool, remove_key: bool, public_ip: str,
                    public_ipv6: str, unit_dir: str, defaults_file: str, cni_bin_dir: str, cni_conf_dir: str,
                    keep_installed: bool, **kw: Any) -> None:
    """Remove what flanneld made on this node: devices, routes, firewall rules, subnet.env, the unit
    and the CNI plugin and conflist (each only as flanneld wrote it). Stop flanneld first
    (systemctl disable --now flanneld)."""
    holder = running_for(subnet_file)
    if holder is not None:
        raise click.ClickException(f"flanneld (PID {holder}) runs for {subnet_file}: stop it first (systemctl stop "
                                   "flanneld); it would put everything back")
    lock = InstanceLock()
    if not dry_run:
        try:
            lock.subnet_file(subnet_file)  # held until we exit: no daemon starts meanwhile
        except InstanceError as exc:
            raise click.ClickException(str(exc)) from None
    try:
        env = subnetenv.read(subnet_file)
    except SubnetEnvError as exc:
        raise click.ClickException(f"{subnet_file}: {exc}") from None
    if env is None:
        click.echo(f"no {subnet_file}: removing devices only (without its networks, routes and firewall rules "
                   "cannot be told from others')")
    steps: list[Step] = []
    options = etcd_options(kw)
    client = EtcdClient(options) if release_lease else None
    try:
        kernel = Kernel()
        if client is not None and env is None:
            click.echo(f"--release-lease: no {subnet_file} names a lease of ours (released already?)")
        elif client is not None:
            steps += _lease(client, options.prefix, env, kernel, [a for a in (public_ip, public_ipv6) if a])
        steps += kernel_steps(kernel, networks_of(env) if env else [])
        if env is not None:
            steps += firewall_steps(env)
        steps += file_steps([subnet_file, *([key_file()] if remove_key else [])])
        if not keep_installed:
            installed, left = install_steps(unit_dir, defaults_file, cni_bin_dir, cni_conf_dir)
            steps += installed
            for line in left:
                click.echo(line)
        for step in steps:
            if not dry_run:
                step.do()
            click.echo(f"{'would remove' if dry_run else 'removed'} {step.what}")
        if not dry_run and os.path.exists(subnet_file + ".lock"):
            os.unlink(subnet_file + ".lock")  # ours, held: nothing of flanneld's is left behind
        if not dry_run and steps and remove_if_empty(os.path.dirname(subnet_file)):
            click.echo(f"removed directory {os.path.dirname(subnet_file)}")
    except (KernelError, FirewallError, EtcdError, CleanupError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if client is not None:
            client.close()
    if not steps:
        click.echo("nothing of flanneld's to remove")


def remove_if_empty(directory: str) -> bool:
    """The subnet file's directory (/run/flannel), which the daemon made for it: removed once
    nothing is left in it; a directory that holds anything else stays."""
    try:
        os.rmdir(directory)
    except OSError:
        return False
    return True


def _lease(client: EtcdClient, prefix: str, env: SubnetEnv, kernel: Kernel, published: Sequence[str]
           ) -> list[Step]:
    """The lease step, when the lease in etcd still names this host: its public addresses are
    held by an interface here, or are the --public-ip/--public-ipv6 this node publishes (NAT)."""
    mine = {ipaddress.ip_address(a.ip) for a in kernel.addresses()} | {ipaddress.ip_address(a) for a in published}

    def ours(lease: Lease) -> bool:
        publics = [a for a in (lease.public_ip if int(lease.public_ip) else None, lease.public_ipv6) if a]
        return bool(publics) and all(a in mine for a in publics)

    step, why = lease_step(client, prefix, env, ours)
    if step is None:
        click.echo(why)
        return []
    return [step]


def install_steps(unit_dir: str, defaults_file: str, cni_bin_dir: str, cni_conf_dir: str
                  ) -> tuple[list[Step], list[str]]:
    """The unit, its settings file, the CNI plugin and conflist that ``install-unit`` and
    ``install-cni`` wrote, each only while it is as they wrote it (an operator's edit is left, as
    install leaves it). Returns the steps and a line per file left."""
    from flanneld.cni.install import CONFLIST_NAME, conflist, wrapper_text
    from flanneld.node.systemd import DEFAULTS, render, this_flanneld

    candidates: list[tuple[str, Callable[[str], bool]]] = [
        (os.path.join(unit_dir, "flanneld.service"), lambda text: text == render(this_flanneld())),
        (os.path.join(unit_dir, "multi-user.target.wants", "flanneld.service"), lambda _text: False),
        (defaults_file, lambda text: text == DEFAULTS),
        (os.path.join(cni_bin_dir, "flannel"), _our_wrapper(wrapper_text())),
        (os.path.join(cni_conf_dir, CONFLIST_NAME), _our_conflist(conflist)),
    ]
    steps, left = [], []
    for path, ours in candidates:
        if not os.path.lexists(path):
            continue
        if os.path.islink(path):  # systemctl enable's symlink: goes with our unit, if that goes
            unit = candidates[0][0]
            if os.path.realpath(path) == os.path.realpath(unit) and any(s.what == f"file {unit}" for s in steps):
                steps.append(Step(f"symlink {path}", lambda path=path: os.unlink(path)))
            continue
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            left.append(f"left {path}: cannot read it ({exc})")
            continue
        if ours(text):
            steps.append(Step(f"file {path}", lambda path=path: os.unlink(path)))
        else:
            left.append(f"left {path}: it differs from what flanneld installs (edited by hand?)")
    return steps, left


def _our_wrapper(current: str) -> Callable[[str], bool]:
    """The plugin wrapper install-cni writes, of this installation or another version of it:
    the same text once its interpreter, version and plugin path are this installation's."""
    head = re.compile(r"#!(\S+) -IS\n# flannel CNI plugin, installed by flanneld (\S+) install-cni; "
                      r"runs (\S+)/plugin.py\n")
    this = head.match(current)

    def ours(text: str) -> bool:
        found = head.match(text)
        if found is None or this is None:
            return False
        swapped = text.replace(found.group(1), this.group(1), 1).replace(found.group(2), this.group(2), 1)
        return swapped.replace(found.group(3), this.group(3)) == current
    return ours


def _our_conflist(make: Callable[..., dict[str, Any]]) -> Callable[[str], bool]:
    """The conflist install-cni writes, with whatever name, version and paths it was given."""
    import json

    def ours(text: str) -> bool:
        try:
            doc = json.loads(text)
            flannel = doc["plugins"][0]
            made = make(doc["name"], doc["cniVersion"], flannel.get("subnetFile"), flannel.get("dataDir"))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return False
        return text == json.dumps(made, indent=2) + "\n"
    return ours
