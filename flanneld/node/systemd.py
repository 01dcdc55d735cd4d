"""The systemd unit flanneld ships with, and ``flanneld install-unit`` that installs it.

Hardened to what the daemon needs: capabilities CAP_NET_ADMIN and CAP_NET_RAW only (netlink,
iptables/nftables, the ethtool ioctl; verified by running the daemon with a bounding set of just
those two), a read-only file system but for /run/flannel (subnet.env and the WireGuard key; kept across
restarts so a restart stays hitless), /run/wireguard (wireguard-go's sockets), the xtables lock and
the CNI state, no new privileges, no home, private /tmp, no devices but /dev/net/tun (for
wireguard-go), only the socket families it uses. ``KillMode=process``: stopping the daemon leaves a
wireguard-go process it started running, so the encrypted overlay survives a restart.
``Type=notify``: READY=1 comes once the lease, the data plane, the firewall rules and subnet.env
are in place.
"""

from __future__ import annotations

import os
import subprocess
import sys

import click

from flanneld.model.atomicfile import write_atomically

UNIT = """\
[Unit]
Description=flanneld: Flannel-compatible overlay network for containers (Python)
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
NotifyAccess=main
EnvironmentFile=-/etc/default/flanneld
ExecStart={flanneld}
# SIGTERM leaves the data plane, subnet.env and the lease in place: restarts cost pods no packets.
# Only the daemon is stopped: a wireguard-go process it started (userspace WireGuard) carries the
# encrypted overlay across the restart, and the new daemon adopts it
KillMode=process
Restart=always
RestartSec=5
TimeoutStartSec=120
LimitNOFILE=65536

# Least privilege: netlink, iptables/nftables and ethtool need these two capabilities, nothing else
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW
AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW
NoNewPrivileges=yes
ProtectSystem=strict
RuntimeDirectory=flannel wireguard
RuntimeDirectoryPreserve=yes
ReadWritePaths=/run/flannel /run/wireguard -/run/xtables.lock -/var/lib/cni
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
# wireguard-go's TUN device: the one device node allowed
BindPaths=-/dev/net/tun
DeviceAllow=/dev/net/tun rw
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
PrivateMounts=yes
ProtectProc=invisible
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
# subnet.env is chmod'ed 0644 explicitly; anything else the daemon creates stays private
UMask=0027

[Install]
WantedBy=multi-user.target
"""

# where systemd looks for units an operator installs: only a unit put there is worth a reload
SYSTEMD_UNIT_DIRS = frozenset({"/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
                               "/usr/lib/systemd/system", "/lib/systemd/system"})

DEFAULTS = """\
# flanneld settings: every flag can be given as FLANNELD_<FLAG> (see flanneld --help).
#FLANNELD_ETCD_ENDPOINTS=https://10.0.0.5:2379
#FLANNELD_ETCD_CAFILE=/etc/flannel/ca.pem
#FLANNELD_ETCD_CERTFILE=/etc/flannel/node.pem
#FLANNELD_ETCD_KEYFILE=/etc/flannel/node-key.pem
#FLANNELD_IFACE=eth0
#FLANNELD_IP_MASQ=true
#FLANNELD_HEALTHZ_PORT=8471
"""


def render(flanneld: str) -> str:
    return UNIT.format(flanneld=flanneld)


def this_flanneld() -> str:
    """The flanneld console script of the running installation."""
    return os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "flanneld")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--unit-dir", default="/etc/systemd/system", show_default=True, help="Where to put flanneld.service.")
@click.option("--defaults", "defaults_file", default="/etc/default/flanneld", show_default=True,
              help="Settings file the unit reads (written only when absent).")
@click.option("--force", is_flag=True, help="Replace a unit that differs (an operator's edit).")
def install_unit_command(unit_dir: str, defaults_file: str, force: bool) -> None:
    """Install flanneld's hardened systemd unit for this installation."""
    path = os.path.join(unit_dir, "flanneld.service")
    text = render(this_flanneld())
    try:
        with open(path) as fh:
            current = fh.read()
    except FileNotFoundError:
        current = None
    if current is not None and current != text and not force:
        raise click.ClickException(f"{path} exists and differs (edited?); use --force to replace it")
    try:
        write_atomically(path, text, 0o644)
        if not os.path.exists(defaults_file):
            write_atomically(defaults_file, DEFAULTS, 0o644)
    except OSError as exc:
        raise click.ClickException(f"cannot write {exc.filename}: {exc.strerror}") from None
    click.echo(f"installed {path}")
    if os.path.realpath(unit_dir) not in SYSTEMD_UNIT_DIRS:
        click.echo("not a directory systemd reads units from: link or copy it there")
    elif not systemd_running():
        click.echo("systemd is not running here (PID 1 is not systemd): the unit is written, not loaded", err=True)
    else:
        reload = subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True)
        if reload.returncode != 0:
            detail = reload.stderr.strip().splitlines()[-1:] or [f"exit status {reload.returncode}"]
            raise click.ClickException(f"unit written, but systemctl daemon-reload failed: {detail[0]}")
        click.echo("systemd reloaded; now: systemctl enable --now flanneld")


def systemd_running() -> bool:
    """sd_booted(3): PID 1 is systemd."""
    return os.path.isdir("/run/systemd/system")
