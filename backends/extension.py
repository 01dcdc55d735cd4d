"""The extension backend: upstream's hooks, run as commands on lease events; no data path of our own.

Options (upstream's names): ``PreStartupCommand`` (its stdout becomes our BackendData, a JSON
string), ``PostStartupCommand``, ``SubnetAddCommand`` and ``SubnetRemoveCommand`` (a peer's
BackendData on stdin), plus ours, ``CommandTimeout`` (seconds, 10). Environment: ``SUBNET``,
``PUBLIC_IP`` (and ``NETWORK`` for PostStartupCommand) as upstream, and when IPv6 is enabled
``PUBLIC_IPV6`` and ``IPV6SUBNET`` (upstream's names) with ``IPV6_SUBNET`` and ``IPV6_NETWORK``
(ours, kept for hooks written for them).

Commands run without a shell (as upstream since v0.28): split like a shell would (shlex), with
``$NAME``/``${NAME}`` in an argument replaced by the hook's environment, so upstream's simple
examples (``ip route add $SUBNET via $PUBLIC_IP``) work, while lease contents can never become
shell syntax. Write ``sh -c '...'`` for pipes and ``&&``. Each command has a timeout; a failing,
hanging or missing command is logged with its exit status and stderr and never stops the
daemon. Peer hooks run in order on one worker thread, so a slow hook never stalls the daemon's
loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shlex
import signal
import string
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace

from flanneld.model.config import BackendConfig, ConfigError, NetworkConfig
from flanneld.model.lease import Lease, LeaseAttrs, compact_json
from flanneld.plan.backend import BackendBase, BackendType, External, PeerPlan, published_addresses, register
from flanneld.plan.state import DesiredState, ObservedLink

log = logging.getLogger("flanneld.extension")
COMMANDS = ("PreStartupCommand", "PostStartupCommand", "SubnetAddCommand", "SubnetRemoveCommand")


@dataclass(frozen=True)
class ExtensionOptions:
    pre_startup: str = ""
    post_startup: str = ""
    subnet_add: str = ""
    subnet_remove: str = ""
    timeout: float = 10.0

    @classmethod
    def parse(cls, backend: BackendConfig) -> ExtensionOptions:
        values = []
        for name in COMMANDS:
            value = backend.get(name, "")
            if not isinstance(value, str):
                raise ConfigError(f"Backend.{name} must be a string, got {json.dumps(value)}")
            try:
                shlex.split(value)
            except ValueError as exc:
                raise ConfigError(f"Backend.{name} cannot be split into arguments: {exc}") from None
            values.append(value)
        timeout = backend.get("CommandTimeout", 10)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0.1 <= timeout <= 3600:
            raise ConfigError(f"Backend.CommandTimeout must be a number of seconds in 0.1..3600, got {timeout!r}")
        return cls(*values, timeout=float(timeout))


def argv_for(command: str, env: Mapping[str, str]) -> list[str]:
    """The command's arguments with $NAME / ${NAME} replaced from `env` (unknown names stay as written)."""
    return [string.Template(arg).safe_substitute(env) for arg in shlex.split(command)]


class HookError(Exception):
    """A hook could not run, failed or timed out; the message says which, with its stderr."""


def run(name: str, command: str, env: Mapping[str, str], stdin: str, timeout: float) -> str:
    """Run one hook in a process group of its own; its stdout (stripped), or HookError.

    On a timeout the whole group is killed: a pipeline (``sh -c 'a | b'``) leaves no process behind.
    """
    try:
        argv = argv_for(command, env)
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, **env}, start_new_session=True)
    except (OSError, ValueError) as exc:
        raise HookError(f"{name} {command!r} could not run: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        stdout, stderr = proc.communicate(stdin + "\n", timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise HookError(f"{name} {command!r} timed out after {timeout:g}s and was killed") from None
    if proc.returncode != 0:
        said = "; ".join(line.strip() for line in stderr.strip()[-500:].splitlines() if line.strip())
        raise HookError(f"{name} {command!r} failed with exit status {proc.returncode}: {said or '(no stderr)'}")
    log.info("%s %r ran%s", name, command, f": {stdout.strip()[:200]}" if stdout.strip() else "")
    return stdout.strip()


def run_hook(name: str, command: str, env: Mapping[str, str], stdin: str, timeout: float) -> str | None:
    """Run one peer hook; its stdout, or None when it failed (logged, never raised: a peer's hook
    failing never stops the daemon)."""
    try:
        return run(name, command, env, stdin, timeout)
    except HookError as exc:
        log.error("%s", exc)
        return None


class ExtensionBackend(BackendBase):
    type = "extension"

    def __init__(self, config: NetworkConfig, ext: External, options: ExtensionOptions) -> None:
        self.config = config
        self.ext = ext
        self.options = options
        self.publics = published_addresses(config, ext)
        self.data: str | None = None  # our BackendData: PreStartupCommand's output as a JSON string
        self._jobs: queue.Queue[tuple[str, str, dict[str, str], str] | None] = queue.Queue()
        self._worker: threading.Thread | None = None

    def mtu(self) -> int:
        return self.ext.mtu

    def prepare(self) -> None:
        """PreStartupCommand, before the lease is acquired: its output is what we publish. One that
        fails is a ConfigError (start-up retries it): publishing empty BackendData would hand every
        peer's SubnetAddCommand empty input (upstream refuses to start)."""
        if self.options.pre_startup:
            try:
                output = run("PreStartupCommand", self.options.pre_startup, {}, "", self.options.timeout)
            except HookError as exc:
                raise ConfigError(str(exc)) from None
            self.data = compact_json(json.dumps(output, ensure_ascii=False))

    def lease_attrs(self, devices: Mapping[str, ObservedLink]) -> LeaseAttrs:
        return replace(self.publics, backend_type="extension", backend_data=self.data)

    def _env(self, lease: Lease, with_networks: bool) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.config.ipv4 is not None:
            if with_networks:
                env["NETWORK"] = str(self.config.ipv4.network)
            if lease.subnet is not None:
                env["SUBNET"] = str(lease.subnet)
            env["PUBLIC_IP"] = str(lease.public_ip)
        if self.config.ipv6 is not None:
            if with_networks:
                env["IPV6_NETWORK"] = str(self.config.ipv6.network)
            if lease.subnet6 is not None:
                env["IPV6_SUBNET"] = env["IPV6SUBNET"] = str(lease.subnet6)
            if lease.public_ipv6 is not None:
                env["PUBLIC_IPV6"] = str(lease.public_ipv6)
        return env

    def start(self, own: Lease) -> None:
        self._worker = threading.Thread(target=self._work, name="extension-hooks", daemon=True)
        self._worker.start()
        if self.options.post_startup:
            self._jobs.put(("PostStartupCommand", self.options.post_startup, self._env(own, True), ""))

    def peer_changed(self, kind: str, peer: Lease) -> None:
        command = self.options.subnet_remove if kind == "removed" else self.options.subnet_add
        if not command or peer.backend_type != "extension":
            return
        stdin = ""
        if peer.backend_data is not None:
            try:
                decoded = json.loads(peer.backend_data)
            except ValueError:
                decoded = None
            if not isinstance(decoded, str):
                log.error("lease %s: its BackendData is not a JSON string; not running the %s hook", peer.describe(),
                          "remove" if kind == "removed" else "add")
                return
            stdin = decoded
        name = "SubnetRemoveCommand" if kind == "removed" else "SubnetAddCommand"
        self._jobs.put((name, command, self._env(peer, False), stdin))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            run_hook(*job, timeout=self.options.timeout)

    def base_state(self, own: Lease) -> DesiredState:
        return DesiredState()  # the hooks own the data path; we own nothing in the kernel

    def plan_peer(self, peer: Lease) -> PeerPlan:
        plan = PeerPlan()
        if peer.backend_type != "extension":
            plan.skip(f"backend type {peer.backend_type or 'none'!r} is not extension", "backend-type")
        return plan


EXTENSION = register(BackendType(
    "extension", ExtensionOptions.parse,
    lambda config, ext, options, _settings: ExtensionBackend(config, ext, options),
))
