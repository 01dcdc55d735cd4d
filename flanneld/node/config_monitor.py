"""Watching over the network config while the daemon runs.

The daemon applies the config it started with (upstream, too, needs a restart for a new backend,
network or SubnetLen). What it must not do is stay silent when the stored config changes under
it: an operator who broke the config, or changed it expecting an effect, is told once, with the
key and what the daemon does about it, and told again when it is back in order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from flanneld.etcd.client import EtcdClient
from flanneld.etcd.errors import EtcdError
from flanneld.model.config import ConfigError, NetworkConfig, parse_config

log = logging.getLogger("flanneld")


def judge(running: NetworkConfig, stored: bytes | None, validate: Callable[[NetworkConfig], None]) -> str:
    """What to tell the operator about the stored config ('' when it is the running one), pure."""
    if stored is None:
        return "was deleted; this daemon keeps running with the config it started with"
    try:
        config = parse_config(stored)
        validate(config)
    except ConfigError as exc:
        return f"is now invalid ({exc}); this daemon keeps running with the config it started with"
    if config != running:
        return "changed; this daemon keeps running with the config it started with: restart it to apply the new one"
    return ""


class ConfigMonitor:
    """Reads `<prefix>/config` every `interval` seconds on its own thread; logs each change of verdict once."""

    def __init__(self, etcd_client: EtcdClient, key: str, running: NetworkConfig,
                 validate: Callable[[NetworkConfig], None], interval: float) -> None:
        self.etcd_client = etcd_client
        self.key = key
        self.running = running
        self.validate = validate
        self.interval = interval
        self.verdict = ""
        self._stop = threading.Event()

    def check(self) -> None:
        try:
            kv = self.etcd_client.get(self.key)
        except EtcdError:
            return  # etcd trouble is reported by the watch and /healthz, not here
        verdict = judge(self.running, kv.value if kv else None, self.validate)
        if verdict and verdict != self.verdict:
            log.warning("network config at %s %s", self.key, verdict)
        elif not verdict and self.verdict:
            log.info("network config at %s is the one this daemon runs with again", self.key)
        self.verdict = verdict

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()

    def stop(self) -> None:
        self._stop.set()
