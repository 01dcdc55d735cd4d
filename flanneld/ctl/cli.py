"""``flannelctl``: read the cluster's subnet leases and change them safely.

Thin wiring: what is shown and what is allowed lives in ``ctl_views`` (pure), the node check in
``doctor``; etcd is reached through ``etcd_client`` with flanneld's own connection flags.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import click

from flanneld import __version__
from flanneld.ctl import views as ctl_views
from flanneld.etcd.options import EtcdOptions, quiet_grpc
from flanneld.flags import etcd_flags_with_env, etcd_options, flag
from flanneld.model import subnetenv

if TYPE_CHECKING:  # imported where used: `flannelctl --help` loads no etcd, lease or config code
    from flanneld.etcd.client import EtcdClient, KeyValue
    from flanneld.leases.listing import Listed, Listing
    from flanneld.leases.watcher import LeaseEvent
    from flanneld.model.config import NetworkConfig

ENV_PREFIXES = ("FLANNELCTL", "FLANNELD")
EXAMPLES = """\b
Examples:
  flannelctl --etcd-endpoints http://10.0.0.5:2379 subnets list
  flannelctl subnets list -o wide --backend vxlan
  flannelctl subnets show 10.5.52.0/24
  flannelctl subnets reserve 10.5.9.0/24 --public-ip 192.168.1.9
  flannelctl config set new-config.json --dry-run
  flannelctl doctor                      # on a node: exit 0 only when healthy
  eval "$(flannelctl completion bash)"   # shell completion

\b
Every --etcd-* flag can also be set as FLANNELCTL_ETCD_<NAME> or FLANNELD_ETCD_<NAME>
(upper case, '-' as '_'), e.g. FLANNELD_ETCD_ENDPOINTS; the command line wins."""


class CtlError(Exception):
    """A refusal or failure explained in one line for the operator."""


def fail(message: str) -> NoReturn:
    raise CtlError(message)


def _use_colour() -> bool:
    return "NO_COLOR" not in os.environ


def styled(text: str, **style: Any) -> str:
    """Coloured text; click.echo strips the colour again when stdout is not a terminal."""
    return click.style(text, **style) if _use_colour() else text


class Context:
    """Per-invocation state: the connection options and a lazily opened etcd client."""

    def __init__(self, options: EtcdOptions) -> None:
        self.options = options
        self._etcd_client: EtcdClient | None = None

    @property
    def prefix(self) -> str:
        return self.options.prefix

    @property
    def etcd_client(self) -> EtcdClient:
        if self._etcd_client is None:
            from flanneld.etcd.client import EtcdClient

            self._etcd_client = EtcdClient(self.options)
        return self._etcd_client

    def close(self) -> None:
        if self._etcd_client is not None:
            self._etcd_client.close()

    def listing(self) -> Listing:
        from flanneld.leases.listing import list_leases

        return self._warn_junk(list_leases(self.etcd_client, self.prefix))

    def listing_and_ttls(self) -> tuple[Listing, dict[int, int]]:
        """The listing and the TTL of every live lease in it.

        The TTL lookup mostly waits for etcd, so it runs in a thread while the listing decodes.
        """
        from concurrent.futures import ThreadPoolExecutor

        from flanneld.leases.listing import decode_listing
        from flanneld.model.lease import leases_prefix

        revision, kvs = self.etcd_client.list_prefix(leases_prefix(self.prefix))
        ids = [kv.lease_id for kv in kvs if kv.lease_id]
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(self.etcd_client.time_to_live_many, ids) if ids else None
            listing = self._warn_junk(decode_listing(self.prefix, revision, kvs))
            return listing, (pending.result() if pending is not None else {})

    @staticmethod
    def _warn_junk(listing: Listing) -> Listing:
        for key, why in listing.junk:
            click.echo(f"flannelctl: warning: skipped malformed entry {key}: {why}", err=True)
        return listing

    def ttls(self, listing: Listing, only: Sequence[Listed] | None = None) -> dict[int, int]:
        ids = [li.kv.lease_id for li in (only if only is not None else listing.leases.values()) if li.kv.lease_id]
        return self.etcd_client.time_to_live_many(ids) if ids else {}

    def config_if_any(self) -> NetworkConfig | None:
        """The network config when there is a valid one (views that only annotate with it)."""
        from flanneld.model.config import ConfigError, parse_config

        kv = self.etcd_client.get(f"{self.prefix}/config")
        try:
            return parse_config(kv.value) if kv is not None else None
        except ConfigError:
            return None

    def unprogrammed(self, listing: Listing) -> dict[str, str]:
        """Leases no node programs, as they overlap a lease that outranks them: key -> why."""
        from flanneld.leases.overlaps import unprogrammed

        if len(listing.leases) < 2:
            return {}
        return unprogrammed(((k, li.lease, li.kv.create_revision) for k, li in listing.leases.items()),
                            self.config_if_any())

    def stored_config(self, why: str = "") -> KeyValue:
        """The config's KeyValue as stored (not validated); CtlError when there is none."""
        kv = self.etcd_client.get(f"{self.prefix}/config")
        if kv is None:
            fail(f"no network config at {self.prefix}/config{why}")
        return kv

    def require_config(self, why: str = "") -> NetworkConfig:
        """The validated NetworkConfig; CtlError when there is none or it is invalid."""
        return _parse(self.stored_config(why).value)


def _parse(raw: bytes | str) -> NetworkConfig:
    """A NetworkConfig validated exactly as the daemon does, or CtlError with the validator's message."""
    from flanneld.model.config import ConfigError, parse_config
    from flanneld.plan.backend import validate_backend

    try:
        config = parse_config(raw)
        validate_backend(config.backend)
    except ConfigError as exc:
        fail(f"invalid config: {exc}")
    return config


class CtlGroup(click.Group):
    """Turns every expected failure into one line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        from flanneld.etcd.errors import EtcdError
        from flanneld.model.config import ConfigError
        from flanneld.model.subnetenv import SubnetEnvError

        try:
            return super().invoke(ctx)
        except (CtlError, EtcdError, ConfigError, SubnetEnvError, OSError) as exc:
            click.echo(f"flannelctl: error: {exc}", err=True)
            ctx.exit(1)
        finally:
            if isinstance(ctx.obj, Context):
                ctx.obj.close()


def echo_document(doc: Any, output: str) -> None:
    """JSON (indented) or YAML."""
    click.echo(json.dumps(doc, indent=2) if output == "json" else ctl_views.to_yaml(doc), nl=output == "json")


def echo_table(lines: list[str], bold_header: bool = True) -> None:
    """Rendered table lines in one write (thousands of echo() calls cost more than the etcd lookup)."""
    if lines and bold_header:
        lines = [styled(lines[0], bold=True), *lines[1:]]
    if lines:
        click.echo("\n".join(lines))


def output_option(*choices: str, default: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("-o", "--output", type=click.Choice(choices), default=default, show_default=True,
                        help="Output format.")


def _complete_subnets(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion for SUBNET arguments: the keys in etcd (best effort, silent on errors)."""
    root = ctx.find_root()
    try:
        from flanneld.leases.listing import list_leases

        session = Context(etcd_options(dict(root.params)))  # its etcd client keeps gRPC's logging quiet
        try:
            listing = list_leases(session.etcd_client, session.prefix)
        finally:
            session.close()
    except Exception:  # completion must never print a traceback into the shell
        return []
    subnets = [str(li.lease.subnet or li.lease.subnet6) for li in listing.leases.values()]
    return sorted(s for s in subnets if s.startswith(incomplete))


@click.group(cls=CtlGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
             epilog=EXAMPLES)
@etcd_flags_with_env(*ENV_PREFIXES)
@flag("etcd-timeout", type=float, default=5.0, show_default=True, help="Seconds per etcd request.",
      envvar=[f"{p}_ETCD_TIMEOUT" for p in ENV_PREFIXES])
@click.version_option(__version__, "--version", prog_name="flannelctl")
@click.pass_context
def cli(ctx: click.Context, etcd_timeout: float, **kw: Any) -> None:
    """flannelctl: inspect flannel's subnet leases in etcd and change them safely."""
    options = etcd_options(kw)
    ctx.obj = Context(EtcdOptions(options.endpoints, options.prefix, options.keyfile, options.certfile,
                                  options.cafile, options.username, options.password, etcd_timeout))


# -- subnets ---------------------------------------------------------------------------------


@cli.group()
def subnets() -> None:
    """List, show, watch, reserve and release subnet leases."""


@subnets.command("list")
@output_option("table", "wide", "json", "yaml", default="table")
@click.option("--public-ip", default="", help="Only the lease(s) of this public IP (IPv4 or IPv6).")
@click.option("--backend", default="", help="Only leases of this backend type (e.g. vxlan).")
@click.option("--reserved", is_flag=True, help="Only reservations (keys without a TTL).")
@click.option("--no-headers", is_flag=True, help="Table output without the header line.")
@click.pass_obj
def subnets_list(obj: Context, output: str, public_ip: str, backend: str, reserved: bool, no_headers: bool) -> None:
    """All leases, sorted by subnet.

    \b
    Examples:
      flannelctl subnets list
      flannelctl subnets list -o json | jq '.[].PublicIP'
      flannelctl subnets list --reserved --no-headers
    """
    listing, ttls = obj.listing_and_ttls()
    rows = ctl_views.rows(listing, ttls, public_ip, backend, reserved)
    shown = {r.lease.key for r in rows}
    for key, why in obj.unprogrammed(listing).items():
        if key in shown:
            click.echo(f"flannelctl: warning: no node programs lease {key}: {why}", err=True)
    if output in ("json", "yaml"):
        echo_document([ctl_views.as_document(r) for r in rows], output)
        return
    wide = output == "wide"
    header = ctl_views.WIDE_COLUMNS if wide else ctl_views.TABLE_COLUMNS
    echo_table(ctl_views.render_table(header, (ctl_views.table_cells(r, wide) for r in rows), headers=not no_headers),
               bold_header=not no_headers)


def _matching(listing: Listing, query: str) -> list[Listed]:
    """The leases `query` names (a subnet, an etcd key or a public IP); one line and exit 1 when none does."""
    try:
        found = ctl_views.find(listing, query)
    except ValueError as exc:
        fail(f"{exc}; give a subnet or a public IP")
    if not found:
        fail(f"no lease matches {query}")
    return found


@subnets.command("show")
@click.argument("query", metavar="SUBNET|PUBLIC_IP", shell_complete=_complete_subnets)
@output_option("text", "json", "yaml", default="text")
@click.pass_obj
def subnets_show(obj: Context, query: str, output: str) -> None:
    """One lease in full, with the time left on it.

    SUBNET is a CIDR (10.5.52.0/24) or etcd key (10.5.52.0-24); PUBLIC_IP a node's address.
    """
    listing = obj.listing()
    found = _matching(listing, query)
    ttls = obj.ttls(listing, found)
    rows = [ctl_views.row(li, ttls) for li in found]
    if output != "text":
        docs = [{**ctl_views.as_document(r), "value": r.listed.kv.value.decode("utf-8", "replace")} for r in rows]
        echo_document(docs[0] if len(docs) == 1 else docs, output)
        return
    for i, row in enumerate(rows):
        if i:
            click.echo()
        pairs = ctl_views.show_lines(row)
        width = max(len(label) for label, _ in pairs) + 1
        for label, value in pairs:
            click.echo(f"{styled((label + ':').ljust(width), bold=True)} {value}")
        why = obj.unprogrammed(listing).get(row.lease.key)
        if why:
            click.echo(f"{styled('Programmed:'.ljust(width), bold=True)} by no node: {why}")


@subnets.command("watch")
@output_option("text", "json", default="text")
@click.option("--snapshot", is_flag=True, help="First print every current lease (as 'present').")
@click.pass_obj
def subnets_watch(obj: Context, output: str, snapshot: bool) -> None:
    """Print lease additions, changes and removals as they happen, until Ctrl-C."""
    from flanneld.leases.watcher import LeaseEvent, LeaseWatcher

    watcher = LeaseWatcher(obj.etcd_client, obj.prefix)
    events: queue.Queue[list[LeaseEvent]] = queue.Queue()
    initial = watcher.resync()
    if snapshot:
        print_events([LeaseEvent("present", e.key, e.value, e.etcd_lease) for e in initial], output)
    click.echo(styled(f"watching {obj.prefix}/subnets/ from revision {watcher.revision + 1} (Ctrl-C to stop)",
                      dim=True), err=True)
    thread = threading.Thread(target=watcher.run, args=(events.put,), daemon=True)
    thread.start()
    try:
        while True:
            print_events(events.get(), output)
    except KeyboardInterrupt:
        watcher.stop()
        click.echo("stopped", err=True)


EVENT_COLOURS = {"added": "green", "changed": "yellow", "removed": "red", "present": None}


def print_events(batch: Sequence[LeaseEvent], output: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for ev in batch:
        lease = ev.lease
        if output == "json":
            doc = ctl_views.lease_document(lease, reserved=ev.etcd_lease == 0, etcd_lease=ev.etcd_lease)
            click.echo(json.dumps({"time": stamp, "event": ev.kind, **doc}))
            continue
        row = ctl_views.table_cells(ctl_views.Row(_listed(ev), None), wide=False)[:5]
        kind = styled(ev.kind.ljust(8), fg=EVENT_COLOURS.get(ev.kind))
        click.echo(f"{stamp}  {kind} {'  '.join(row)}")
    sys.stdout.flush()


def _listed(ev: LeaseEvent) -> Listed:
    from flanneld.etcd.client import KeyValue
    from flanneld.leases.listing import Listed

    return Listed(ev.lease, KeyValue(ev.key, ev.value, 0, 0, 0, ev.etcd_lease))


@subnets.command("reserve")
@click.argument("subnet")
@click.option("--public-ip", required=True, help="The node's public IP (IPv6 for an IPv6-only network).")
@click.option("--ipv6-subnet", default="", help="The IPv6 half of a dual-stack reservation.")
@click.option("--public-ipv6", default="", help="The node's public IPv6 address (dual-stack).")
@click.pass_obj
def subnets_reserve(obj: Context, subnet: str, public_ip: str, ipv6_subnet: str, public_ipv6: str) -> None:
    """Reserve SUBNET for a node: a lease key without TTL that flanneld never expires or gives away.

    Refused when the subnet is taken, outside the config, or the node already holds one.
    """
    from flanneld.leases import policy
    from flanneld.leases.manager import reserve
    from flanneld.model.family import family_of
    from flanneld.model.lease import UNSET_V4, Lease, leases_prefix

    try:
        net = ctl_views.parse_subnet_arg(subnet)
        net6 = ctl_views.parse_subnet_arg(ipv6_subnet) if ipv6_subnet else None
        ip = ipaddress.ip_address(public_ip)
        ip6 = ipaddress.ip_address(public_ipv6) if public_ipv6 else None
    except ValueError as exc:
        fail(str(exc))
    if net.version == 6:
        if net6 is not None:
            fail("give the IPv4 subnet as SUBNET and the IPv6 one as --ipv6-subnet")
        net, net6, ip6, ip = None, net, ip, None  # type: ignore[assignment]
    if net6 is not None and net6.version != 6:
        fail(f"--ipv6-subnet {net6} is not an IPv6 subnet")
    if ip is not None and ip.version != 4:
        fail(f"--public-ip {ip} must be IPv4 for an IPv4 subnet")
    if net6 is not None and (ip6 is None or ip6.version != 6):
        fail("an IPv6 subnet needs an IPv6 public address (--public-ipv6)")

    config = obj.require_config(": nothing to reserve from")
    for half in (net, net6):
        if half is not None and config.of(family_of(half.version)) is None:
            fail(f"refused: {half} is IPv{half.version} but the network config does not enable IPv{half.version}")
    listing = obj.listing()
    if (config.enable_ipv4 and net is None) or (config.enable_ipv6 and net6 is None):
        need = " and ".join(f"an IPv{f.version} subnet" for f in config.families())
        fail(f"the network config needs {need} per node; give {'--ipv6-subnet' if net6 is None else 'SUBNET'}")
    for half, address in ((net, ip), (net6, ip6)):
        if half is not None:
            why = policy.reservation_problem(half, address, config, listing)  # type: ignore[arg-type]
            if why:
                fail(f"refused: {why}")
    lease = Lease(net, net6, ip or UNSET_V4, ip6)  # type: ignore[arg-type]
    if not reserve(obj.etcd_client, obj.prefix, lease, listing.revision):
        fail("refused: the leases changed while checking (another node or operator); run it again")
    click.echo(f"reserved {lease.describe()} for {ip or ip6}" + (f" / {ip6}" if ip and ip6 else "")
               + f" (key {leases_prefix(obj.prefix)}{lease.key})")


@subnets.command("release")
@click.argument("subnet", shell_complete=_complete_subnets)
@click.option("--force", is_flag=True, help="Also delete a live lease (its node re-acquires a subnet).")
@click.pass_obj
def subnets_release(obj: Context, subnet: str, force: bool) -> None:
    """Remove the reservation of SUBNET (a live lease only with --force)."""
    from flanneld.leases.manager import release

    listing = obj.listing()
    try:
        found = ctl_views.find(listing, subnet)
    except ValueError as exc:
        fail(str(exc))
    if not found:
        fail(f"no reservation or lease for {subnet}")
    if len(found) > 1:
        fail(f"{subnet} matches {len(found)} leases ({', '.join(li.lease.key for li in found)}); give the subnet")
    listed = found[0]
    if not listed.reserved and not force:
        fail(f"refused: {listed.lease.key} is a live lease of {listed.lease.public_ip}, not a reservation "
             "(its node would re-acquire a subnet; --force to delete it anyway)")
    if not release(obj.etcd_client, listed):
        fail(f"refused: {listed.lease.key} changed while checking; run it again")
    click.echo(f"released {'reservation' if listed.reserved else 'lease'} {listed.lease.describe()}")


@cli.command()
@click.argument("query", metavar="SUBNET|PUBLIC_IP", shell_complete=_complete_subnets)
@click.option("--force", is_flag=True, help="Retire it even though it answers (its flanneld may be running).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--healthz-port", type=click.IntRange(0, 65535), default=8471, show_default=True,
              help="Where the node's flanneld answers /healthz (0: ask ping only).")
@click.pass_obj
def retire(obj: Context, query: str, force: bool, yes: bool, healthz_port: int) -> None:
    """Delete the lease of a node that is gone for good, so every peer drops it at once.

    A node that still answers (its flanneld's /healthz, or ping) is refused without --force: a
    running flanneld would re-acquire a subnet; on a node that is still there, stop flanneld and
    run `flanneld cleanup --release-lease` on it instead. The delete is guarded: it fails if the
    lease changed since it was read.
    """
    from flanneld.ctl.liveness import answers
    from flanneld.leases.manager import release

    found = _matching(obj.listing(), query)
    if len(found) > 1:
        fail(f"{query} matches {len(found)} leases ({', '.join(li.lease.key for li in found)}); give the subnet")
    listed = found[0]
    lease = listed.lease
    if listed.reserved:
        fail(f"{lease.key} is a reservation, not a node's lease: flannelctl subnets release {lease.describe()}")
    address = str(lease.public_ip) if int(lease.public_ip) else str(lease.public_ipv6)
    alive = answers(address, healthz_port)
    if alive and not force:
        fail(f"refused: the node of {lease.key} ({address}) looks alive: {alive}; on it, stop flanneld and run "
             "'flanneld cleanup --release-lease', or retire it with --force")
    if not yes:
        click.confirm(f"retire the node {address}: delete its lease {lease.key} (every peer drops it)?", abort=True)
    if not release(obj.etcd_client, listed):
        fail(f"refused: {lease.key} changed while checking (its node renewed it?); run it again")
    click.echo(f"retired {address}: lease {lease.key} deleted")


# -- config ----------------------------------------------------------------------------------


@cli.group("config")
def config_group() -> None:
    """Read, validate and change the network config (<prefix>/config)."""


def _read_file(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
    except UnicodeDecodeError:
        fail(f"{path} is not UTF-8 text")


@config_group.command("get")
@click.option("--summary", is_flag=True, help="Describe the config instead of printing it.")
@click.pass_obj
def config_get(obj: Context, summary: bool) -> None:
    """Print the config as stored."""
    kv = obj.stored_config()
    if summary:
        click.echo(ctl_views.describe_config(_parse(kv.value)))
    else:
        click.echo(kv.value.decode("utf-8", "replace").rstrip("\n"))


@config_group.command("validate")
@click.argument("file")
def config_validate(file: str) -> None:
    """Check FILE ('-': stdin) with the daemon's own validator (no etcd needed)."""
    config = _parse(_read_file(file))
    click.echo(f"valid: {ctl_views.describe_config(config)}")


def _pretty(text: str) -> list[str]:
    try:
        return json.dumps(json.loads(text), indent=2).splitlines()
    except ValueError:
        return text.splitlines()


@config_group.command("set")
@click.argument("file")
@click.option("--force", is_flag=True, help="Write even a change the running cluster cannot take.")
@click.option("--dry-run", is_flag=True, help="Validate and show the diff, write nothing.")
@click.pass_obj
def config_set(obj: Context, file: str, force: bool, dry_run: bool) -> None:
    """Validate FILE ('-': stdin), show the diff against etcd, and write it.

    Refuses what running nodes cannot take while leases exist — another backend type, another
    SubnetLen, a Network that existing leases do not fit — unless --force.
    """
    from flanneld.etcd.client import unchanged
    from flanneld.leases import policy
    from flanneld.model.config import ConfigError, parse_config

    text = _read_file(file).strip()
    new = _parse(text)
    key = f"{obj.prefix}/config"
    kv = obj.etcd_client.get(key)
    old_text = kv.value.decode("utf-8", "replace").strip() if kv is not None else ""
    try:
        old = parse_config(old_text) if kv is not None else None
    except ConfigError:
        old = None
    diff = list(difflib.unified_diff(_pretty(old_text) if kv else [], _pretty(text), f"etcd {key}", file,
                                     lineterm=""))
    if kv is not None and not diff and old_text == text:
        click.echo("config unchanged")
        return
    colours = {"+": "green", "-": "red", "@": "cyan"}
    for line in diff:
        click.echo(styled(line, fg=colours.get(line[:1])) if not line.startswith(("+++", "---")) else line)
    listing = obj.listing()
    problems = policy.config_change_problems(old, new, [li.lease for li in listing.leases.values()])
    for problem in problems:
        click.echo(styled(("forced: " if force else "refused: ") + problem, fg="yellow" if force else "red"),
                   err=True)
    if problems and not force:
        fail(f"config not written: {len(problems)} change(s) the running cluster cannot take (--force to override)")
    if dry_run:
        click.echo(f"dry run: valid ({ctl_views.describe_config(new)}), nothing written")
        return
    if not obj.etcd_client.txn([unchanged(key, kv.mod_revision if kv is not None else 0)], [(key, text.encode(), 0)]):
        fail("the config changed in etcd while this ran; run it again to see the new diff")
    click.echo(f"config written: {ctl_views.describe_config(new)}")


# -- doctor and stats --------------------------------------------------------------------------


LEVEL_STYLE = {"ok": ("ok", "green"), "warning": ("warn", "yellow"), "problem": ("FAIL", "red")}


@cli.command()
@click.option("--subnet-file", default=subnetenv.DEFAULT_PATH, show_default=True,
              envvar="FLANNELD_SUBNET_FILE", help="The node's subnet.env.")
@click.option("--iptables-forward-rules", type=bool, default=True, show_default=True,
              envvar="FLANNELD_IPTABLES_FORWARD_RULES", help="Whether flanneld installs forward rules.")
@click.option("--healthz-port", type=click.IntRange(0, 65535), default=8471, show_default=True,
              envvar="FLANNELD_HEALTHZ_PORT", help="Where this node's flanneld serves /probes (0: skip the probes).")
@output_option("text", "json", default="text")
@click.pass_obj
def doctor(obj: Context, subnet_file: str, iptables_forward_rules: bool, healthz_port: int, output: str) -> None:
    """Check this node: subnet.env, its lease in etcd and the kernel state agree, and packets pass.

    Looks at the backend's devices (VXLAN: VNI, port, MTU, MAC; WireGuard: public key against the
    lease, port, MTU; address, up), every peer's neighbour, FDB entry, route and WireGuard peer
    (missing, wrong or stale), the firewall rules, and the data path to every peer as flanneld's
    prober last found it (its /probes; failing peers first). Exit status 0 only when all is
    well, 1 otherwise.
    """
    from flanneld.ctl import doctor as doc
    from flanneld.ctl import probes

    config = obj.require_config()
    env, env_problem = None, ""
    try:
        env = subnetenv.read(subnet_file)
        if env is None:
            env_problem = f"{subnet_file} is missing: flanneld has not written it (not running, or not ready)"
    except subnetenv.SubnetEnvError as exc:
        env_problem = f"{subnet_file} is unreadable: {exc}"
    listing = obj.listing()
    own = doc.own_listed(listing, env)
    ttls = obj.ttls(listing, [own] if own is not None else [])
    kernel = doc.read_kernel(config.enable_nftables, [f.version for f in config.families()])
    findings, peers = doc.examine(doc.Inputs(config, env, env_problem, listing, ttls, kernel, iptables_forward_rules))
    if healthz_port:
        try:
            table = probes.fetch("127.0.0.1", healthz_port)
            probe_findings = [doc.Finding(row.level, "probe", row.text) for row in probes.rows(table)]
        except probes.FetchError as exc:
            probe_findings = [doc.Finding(doc.WARN, "probe", f"no data-path probes: {exc} (flanneld --healthz-port, "
                                                             "--probe-interval)")]
        findings = probe_findings + findings if any(f.level == doc.PROBLEM for f in probe_findings) else \
            findings + probe_findings
    ok = doc.healthy(findings)
    if output == "json":
        summary = {"healthy": ok, "peers": peers, "findings": [f.__dict__ for f in findings]}
        click.echo(json.dumps(summary, indent=2))
    else:
        for f in findings:
            label, colour = LEVEL_STYLE[f.level]
            click.echo(f"{styled(label.ljust(4), fg=colour, bold=f.level == 'problem')}  {f.area:<10} {f.text}")
        problems = sum(f.level == "problem" for f in findings)
        click.echo(styled("healthy" if ok else f"{problems} problem(s) found", fg="green" if ok else "red",
                          bold=True))
    if not ok:
        sys.exit(1)


@cli.command("probes")
@click.option("--healthz-port", type=click.IntRange(1, 65535), default=8471, show_default=True,
              help="Where every node's flanneld serves /probes.")
@output_option("text", "json", default="text")
@click.pass_obj
def probes_command(obj: Context, healthz_port: int, output: str) -> None:
    """The cluster's data paths: every node's probe table (asked of its flanneld at its public
    address), as a matrix for up to 16 nodes, else the failing pairs; nodes that could not be asked
    are named. Exit status 1 when a pair fails or a node could not be asked."""
    from concurrent.futures import ThreadPoolExecutor

    from flanneld.ctl import probes

    leases = [listed.lease for listed in obj.listing().leases.values() if not listed.reserved]
    nodes = sorted({probes.Node(str(lease.subnet or lease.subnet6), str(lease.public_ip if lease.subnet else
                                                                        lease.public_ipv6)) for lease in leases},
                   key=lambda n: ipaddress.ip_network(n.subnet))
    tables: dict[probes.Node, list[dict[str, Any]]] = {}
    unasked: dict[probes.Node, str] = {}

    def ask(node: probes.Node) -> None:
        try:
            tables[node] = probes.fetch(node.public_ip, healthz_port)
        except probes.FetchError as exc:
            unasked[node] = str(exc)

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(ask, nodes))
    failing = probes.failing_pairs(tables)
    if output == "json":
        click.echo(json.dumps({
            "nodes": [{"subnet": n.subnet, "public_ip": n.public_ip, "peers": tables.get(n), "error": unasked.get(n)}
                      for n in nodes],
            "failing": [{"from": f.subnet, "from_ip": f.public_ip, "to": to, "to_ip": to_ip, "state": state,
                         "cause": why} for f, to, to_ip, state, why in failing]}, indent=2))
    else:
        if 0 < len(nodes) <= probes.MATRIX_MAX:
            for line in probes.matrix(nodes, tables):
                click.echo(line)
        for f, to, to_ip, state, why in failing:
            click.echo(f"{f.subnet} ({f.public_ip}) -> {to} ({to_ip}): {state} — {why}")
        for node, why in sorted(unasked.items(), key=lambda item: item[0].subnet):
            click.echo(f"could not ask {node.subnet} ({node.public_ip}): {why}")
        click.echo(f"{len(nodes)} nodes, {len(tables)} asked, {len(failing)} failing pair(s)")
    if failing or unasked:
        sys.exit(1)


@cli.command()
@click.option("--expiring-within", type=click.IntRange(0), default=3600, show_default=True,
              help="List leases with at most this many seconds left (flanneld renews an hour before expiry "
                   "by default, so these belong to nodes that stopped renewing).")
@output_option("text", "json", default="text")
@click.pass_obj
def stats(obj: Context, expiring_within: int, output: str) -> None:
    """Subnet usage per family (leased / reserved / free of the range) and leases expiring soon."""
    config = obj.require_config()
    listing, ttls = obj.listing_and_ttls()
    rows = ctl_views.rows(listing, ttls)
    families = ctl_views.stats(config, rows)
    soon = ctl_views.expiring(rows, expiring_within)
    if output == "json":
        click.echo(json.dumps({
            "families": [{**f.__dict__, "free": f.free, "usedPercent": round(f.used_percent, 2)} for f in families],
            "malformed": len(listing.junk),
            "expiring": [ctl_views.as_document(r) for r in soon],
        }, indent=2))
        return
    header = ("FAMILY", "NETWORK", "SUBNETLEN", "TOTAL", "LEASED", "RESERVED", "FREE", "USED", "OUTSIDE CONFIG")
    body = [(f"IPv{f.version}", f.network, f"/{f.subnet_len}", str(f.total), str(f.leased), str(f.reserved),
             str(f.free), f"{f.used_percent:.1f}%", str(f.outside)) for f in families]
    echo_table(ctl_views.render_table(header, body))
    if listing.junk:
        click.echo(f"malformed entries: {len(listing.junk)} (see the warnings above)")
    click.echo(f"\nexpiring within {ctl_views.human_duration(expiring_within)}: {len(soon) or 'none'}")
    if soon:
        echo_table(ctl_views.render_table(ctl_views.TABLE_COLUMNS, (ctl_views.table_cells(r) for r in soon)),
                   bold_header=False)


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script: eval "$(flannelctl completion bash)"."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(cli, {}, "flannelctl", "_FLANNELCTL_COMPLETE").source())


def main() -> None:
    quiet_grpc()
    cli(prog_name="flannelctl")
