"""``flanneld install-cni``: put the ``flannel`` plugin into the CNI bin dir and write the conflist.

The wrapper is a two-line Python script whose shebang runs this installation's base interpreter
with ``-I -S``: no site-packages, no ``.pth`` hooks, no environment variables, so whatever is
installed in the environment cannot slow down every pod. It imports the plugin module straight
from this installation (byte-compiled here, so nothing is compiled per pod).
"""

from __future__ import annotations

import json
import os
import py_compile
import sys

import click

from flanneld import __version__
from flanneld.cni import plugin
from flanneld.model.atomicfile import write_atomically
from flanneld.model.subnetenv import DEFAULT_PATH

CONFLIST_NAME = "10-flannel.conflist"


def interpreter() -> str:
    """The real interpreter behind this installation (a venv's base python, not its symlink)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(base)


def wrapper_text() -> str:
    plugin_dir = os.path.dirname(os.path.abspath(plugin.__file__))
    return (f"#!{interpreter()} -IS\n"
            f"# flannel CNI plugin, installed by flanneld {__version__} install-cni; runs {plugin_dir}/plugin.py\n"
            f"import sys\nsys.path.insert(0, {plugin_dir!r})\nfrom plugin import main\nsys.exit(main())\n")


def conflist(name: str, cni_version: str, subnet_file: str | None, data_dir: str | None) -> dict:
    """Upstream's conflist (flannel + portmap), with non-default paths if given."""
    flannel: dict = {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}}
    if subnet_file:
        flannel["subnetFile"] = subnet_file
    if data_dir:
        flannel["dataDir"] = data_dir
    return {"name": name, "cniVersion": cni_version,
            "plugins": [flannel, {"type": "portmap", "capabilities": {"portMappings": True}}]}


@click.command(context_settings={"help_option_names": ["--help", "-h"]})
@click.option("--bin-dir", default="/opt/cni/bin", show_default=True, help="CNI plugin directory.")
@click.option("--conf-dir", default="/etc/cni/net.d", show_default=True, help="CNI network config directory.")
@click.option("--network-name", default="cbr0", show_default=True, help="Network name in the conflist.")
@click.option("--cni-version", default="0.3.1", show_default=True, type=click.Choice(plugin.SUPPORTED_VERSIONS),
              help="cniVersion of the conflist.")
@click.option("--subnet-file", default=None, help=f"subnet.env path, if not {DEFAULT_PATH}.")
@click.option("--data-dir", default=None, help="Plugin state directory, if not /var/lib/cni/flannel.")
@click.option("--no-conflist", is_flag=True, help="Install the plugin only.")
@click.option("--force", is_flag=True, help="Overwrite a conflist that differs from ours (e.g. edited by hand).")
def install_command(bin_dir: str, conf_dir: str, network_name: str, cni_version: str, subnet_file: str | None,
                    data_dir: str | None, no_conflist: bool, force: bool) -> None:
    """Install the flannel CNI plugin wrapper and its network config."""
    source = plugin.__file__
    try:
        py_compile.compile(source, doraise=True)
    except (py_compile.PyCompileError, OSError) as exc:
        raise click.ClickException(f"cannot byte-compile {source}: {exc}") from None
    target = os.path.join(bin_dir, "flannel")
    try:
        write_atomically(target, wrapper_text(), 0o755)
    except OSError as exc:
        raise click.ClickException(f"cannot install {target}: {exc.strerror}") from None
    click.echo(f"installed {target} (runs {interpreter()} -IS)")
    if no_conflist:
        return
    path = os.path.join(conf_dir, CONFLIST_NAME)
    text = json.dumps(conflist(network_name, cni_version, subnet_file, data_dir), indent=2) + "\n"
    try:
        with open(path) as fh:
            current = fh.read()
    except FileNotFoundError:
        current = None
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror}") from None
    if current == text:
        click.echo(f"{path} is up to date")
        return
    if current is not None and not force:
        raise click.ClickException(f"{path} exists and differs from flannel's (edited by hand?); left unchanged, "
                                   "use --force to overwrite it")
    try:
        write_atomically(path, text, 0o644)
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc.strerror}") from None
    click.echo(f"wrote {path}")
