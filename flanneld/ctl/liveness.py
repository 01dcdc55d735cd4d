"""Whether a node still answers, before flannelctl retires it: its flanneld's /healthz, or ping.

A best effort that errs towards "alive" only when something answered: a node behind a firewall
that drops both looks gone, so retiring still asks for confirmation.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import urllib.error
import urllib.request

TIMEOUT = 1.0  # seconds per question: a gone node answers neither, and nobody should wait long


def answers(address: str, healthz_port: int) -> str:
    """What answered from `address` ('' when nothing did)."""
    if healthz_port:
        host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
        url = f"http://{host}:{healthz_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT):
                return f"its flanneld answers {url}"
        except urllib.error.HTTPError:
            return f"its flanneld answers {url} (not healthy)"
        except (OSError, ValueError):
            pass
    ping = shutil.which("ping")
    if ping is not None:
        proc = subprocess.run([ping, "-c", "1", "-W", str(int(TIMEOUT)), address], capture_output=True, timeout=5)
        if proc.returncode == 0:
            return "it answers ping"
    return ""
