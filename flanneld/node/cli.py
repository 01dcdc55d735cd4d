"""``flanneld`` command line: upstream flag names and defaults, ``FLANNELD_*`` environment forms.

Every flag may be spelled ``--name`` or Go-style ``-name``, with ``=value`` or a separate
value; boolean flags accept ``--flag`` or ``--flag=true|false`` (Go's ParseBool spellings).
The command line wins over the environment; an empty environment value counts as unset.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import click

from flanneld import __version__
from flanneld.etcd.options import quiet_grpc
from flanneld.flags import GoInt, IPAddress, Regex, bool_flag, etcd_flags, etcd_options, flag
from flanneld.model import subnetenv


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the structured fields a call gave."""

    FIELDS = ("lease", "peer", "event", "trigger", "key", "device")

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        for name in self.FIELDS:
            if name in record.__dict__:
                doc[name] = record.__dict__[name]
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(verbosity: int, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbosity >= 2 else logging.INFO, handlers=[handler])
    if verbosity < 4:  # gRPC internals only at -v=4
        logging.getLogger("grpc").setLevel(logging.WARNING)


# Flags upstream's binary accepts that mean nothing here: a unit or env file written for upstream
# must start this daemon unchanged. klog's logging flags (logging is -v and --log-format here) and
# the Kubernetes subnet manager's, which this build does not have (it runs on etcd).
KLOG_FLAGS = ("vmodule", "log_backtrace_at", "logtostderr", "alsologtostderr", "stderrthreshold", "log_dir")
KUBE_FLAGS = ("kube-subnet-mgr", "kube-api-url", "kubeconfig-file", "net-config-path")


def _accepted(names: tuple[str, ...]) -> Any:
    """Each name as a flag that takes a value or stands alone (Go's -flag / -flag=value), hidden."""
    def apply(fn: Any) -> Any:
        for name in reversed(names):
            fn = flag(name, default=None, is_flag=False, flag_value="true", hidden=True)(fn)
        return fn
    return apply


def _drop_in_flags(kw: dict[str, Any]) -> None:
    """Say once what upstream-only flags do here; refuse the one that asks for what is not here."""
    log = logging.getLogger("flanneld")
    for name in KLOG_FLAGS:
        if kw.pop(name) is not None:
            log.info("-%s is klog's flag: accepted for upstream's units, no effect here (use -v and --log-format)",
                     name)
    kube = {name: kw.pop(name.replace("-", "_")) for name in KUBE_FLAGS}
    if kube["kube-subnet-mgr"] not in (None, "false", "0", "f", "F", "FALSE", "False"):
        raise click.UsageError("--kube-subnet-mgr: this build keeps leases in etcd only (no Kubernetes subnet "
                               "manager); drop the flag and set --etcd-endpoints")
    for name in ("kube-api-url", "kubeconfig-file", "net-config-path"):
        if kube[name]:
            log.info("--%s has no effect without the Kubernetes subnet manager (leases are in etcd)", name)


@click.command(context_settings={"auto_envvar_prefix": "FLANNELD", "help_option_names": ["--help", "-h"]},
               epilog="Every flag can also be set as FLANNELD_<FLAG> (upper case, '-' as '_'); "
                      "the command line wins.")
@etcd_flags
@flag("iface", multiple=True, help="Interface name or IP to use (repeatable; first match wins).")
@flag("iface-regex", type=Regex(), multiple=True, help="Regex matched against interface IPs, then names (repeatable).")
@flag("iface-can-reach", type=IPAddress(), default="", help="Use the interface the kernel would route to this IP.")
@flag("public-ip", type=IPAddress(4), default="", help="IPv4 address published to peers (default: the interface's).")
@flag("public-ipv6", type=IPAddress(6), default="",
      help="IPv6 address published to peers (default: the interface's).")
@flag("subnet-file", default=subnetenv.DEFAULT_PATH, show_default=True, help="Where to write subnet.env.")
@flag("subnet-lease-renew-margin", type=GoInt(1, 1439), default=60, show_default=True,
      help="Renew the lease this many minutes before it expires.")
@bool_flag("ip-masq", False, "Install masquerade rules for traffic leaving the overlay.")
@bool_flag("ip-masq-fully-random-disable", False, "Masquerade without --random-fully.")
@flag("iptables-resync", type=GoInt(1, 86400), default=5, show_default=True,
      help="Seconds between firewall drift checks.")
@bool_flag("iptables-forward-rules", True, "Install FORWARD accept rules for the overlay network.")
@bool_flag("ip-blackhole-route", False, "Keep a (low-priority) blackhole route for our subnet.")
@flag("healthz-ip", type=IPAddress(), default="0.0.0.0", show_default=True,
      help="Address for /healthz, /readyz, /metrics.")
@flag("healthz-port", type=GoInt(0, 65535), default=0, show_default=True, help="Port for them (0: off).")
@flag("wireguard-provider", type=click.Choice(["auto", "kernel", "userspace"]), default="auto", show_default=True,
      help="wireguard backend: the kernel module, userspace wireguard-go, or the kernel's when it has one.")
@flag("reconcile-interval", type=GoInt(1, 86400), default=30, show_default=True,
      help="Seconds between full kernel-state reconciles (drift is also repaired on netlink events).")
@flag("probe-interval", type=GoInt(0, 86400), default=30, show_default=True,
      help="Seconds in which every peer's data path is probed once (ICMP over the overlay; 0: off).")
@click.option("-v", "--v", "verbosity", type=GoInt(0, 10), default=0, envvar="FLANNELD_V",
              help="Log verbosity (2: debug).")
@flag("log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
      help="Log lines as text, or one JSON object per line (time, level, logger, message, fields).")
@click.option("--version", "-version", "show_version", is_flag=True, help="Print the version and exit.")
@_accepted(KLOG_FLAGS + KUBE_FLAGS)
def flanneld_command(show_version: bool, verbosity: int, log_format: str, **kw: Any) -> None:
    """flanneld: the per-node overlay network daemon (etcd v3; vxlan, host-gw, wireguard, alloc, extension)."""
    if show_version:
        click.echo(__version__)
        return
    quiet_grpc(verbose=verbosity >= 4)  # before grpc is imported (the same level shows grpc's Python logs)
    from flanneld.dataplane.iface import IfaceOptions
    from flanneld.node.daemon import Daemon, DaemonOptions  # keeps --help and --version fast

    setup_logging(verbosity, log_format)
    logging.getLogger("flanneld").debug("log verbosity %d (-v, FLANNELD_V)", verbosity)
    _drop_in_flags(kw)
    etcd = etcd_options(kw)
    options = DaemonOptions(
        etcd=etcd,
        iface=IfaceOptions(tuple(_split(kw["iface"])), tuple(kw["iface_regex"]), kw["iface_can_reach"],
                           kw["public_ip"], kw["public_ipv6"]),
        subnet_file=kw["subnet_file"],
        renew_margin_minutes=kw["subnet_lease_renew_margin"],
        ip_masq=kw["ip_masq"],
        masq_random_fully=not kw["ip_masq_fully_random_disable"],
        iptables_resync=kw["iptables_resync"],
        forward_rules=kw["iptables_forward_rules"],
        blackhole_route=kw["ip_blackhole_route"],
        wireguard_provider=kw["wireguard_provider"],
        healthz_ip=kw["healthz_ip"],
        healthz_port=kw["healthz_port"],
        reconcile_interval=kw["reconcile_interval"],
        probe_interval=kw["probe_interval"],
    )
    sys.exit(Daemon(options).run())


def _split(values: tuple[str, ...]) -> list[str]:
    """FLANNELD_IFACE may hold several comma-separated values; names and IPs never contain commas."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "install-cni":
        from flanneld.cni.install import install_command

        install_command(args=sys.argv[2:], prog_name="flanneld install-cni")
        return
    if len(sys.argv) > 1 and sys.argv[1] == "install-unit":
        from flanneld.node.systemd import install_unit_command

        install_unit_command(args=sys.argv[2:], prog_name="flanneld install-unit")
        return
    if len(sys.argv) > 1 and sys.argv[1] == "cleanup":
        from flanneld.node.cleanup import cleanup_command

        cleanup_command(args=sys.argv[2:], prog_name="flanneld cleanup")
        return
    try:
        flanneld_command.main(prog_name="flanneld", standalone_mode=False)
    except click.UsageError as exc:  # one line for the journal, not click's usage block
        click.echo(f"flanneld: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(1)
