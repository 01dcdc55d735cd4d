"""The tree's shape: every module imports from a plain checkout exactly as it does installed.

``flanneld.backends`` and ``flanneld.cni`` live in ``backends/`` and ``cni/`` on disk; the links
``flanneld/backends`` and ``flanneld/cni`` make a plain checkout (no install, the repository on
``sys.path``) import them under the same names, and let the import-layer contracts scan them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def product_modules() -> list[str]:
    """Every module below flanneld/, the linked plug-in folders included."""
    found = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "flanneld"), followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d.isidentifier())
        package = os.path.relpath(dirpath, ROOT).replace(os.sep, ".")
        found += [package if name == "__init__.py" else f"{package}.{name[:-3]}"
                  for name in sorted(filenames) if name.endswith(".py")]
    return found


IMPORT_ALL = """
import importlib, json, os, sys
if sys.argv[1] == "checkout":
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", "")).lower()]
    sys.path.insert(0, sys.argv[2])
files = {}
for name in json.loads(sys.stdin.read()):
    files[name] = os.path.realpath(importlib.import_module(name).__file__)
print(json.dumps(files))
"""


def import_all(mode: str, modules: list[str]) -> dict[str, str]:
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL, mode, ROOT], input=json.dumps(modules),
                          capture_output=True, text=True, cwd="/", timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_every_module_imports_from_a_plain_checkout_as_installed() -> None:
    modules = product_modules()
    assert {"flanneld.backends.vxlan", "flanneld.cni.install", "flanneld.plan.backend"} <= set(modules)
    checkout, installed = import_all("checkout", modules), import_all("installed", modules)
    assert checkout == installed
    assert all(path.startswith(ROOT + os.sep) for path in checkout.values())


def test_the_plug_in_folders_are_the_linked_ones() -> None:
    for name in ("backends", "cni"):
        link = os.path.join(ROOT, "flanneld", name)
        assert os.path.islink(link) and os.path.realpath(link) == os.path.join(ROOT, name)
