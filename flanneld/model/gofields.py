"""Field lookup the way Go's encoding/json fills a struct: an exact name wins, else any case.

Upstream Flannel decodes configs and leases into Go structs, so ``"VtepMac"`` fills ``VtepMAC``
and ``"network"`` fills ``Network``. Every JSON object either side reads goes through here, at
every level, so a document upstream accepts is never one we reject or half-read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def lookup(obj: Mapping[str, Any], name: str) -> Any:
    """The value of field `name` in `obj` (None if absent); exact match first, then the last case-insensitive one.

    Go keeps the last of several case-insensitive matches, and so do we.
    """
    if name in obj:
        return obj[name]
    lowered = name.lower()
    found = None
    for key, value in obj.items():
        if key.lower() == lowered:
            found = value
    return found


class GoObject(dict[str, Any]):
    """A decoded JSON object whose ``get`` matches field names as Go does (see :func:`lookup`)."""

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        found = lookup(self, name)
        return default if found is None else found
