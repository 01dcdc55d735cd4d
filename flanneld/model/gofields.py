"""Field lookup the way Go's encoding/json fills a struct: any case, the last matching key wins.

Upstream Flannel decodes configs and leases into Go structs, so ``"VtepMac"`` fills ``VtepMAC``
and ``"network"`` fills ``Network``. Every JSON object either side reads goes through here, at
every level, so a document upstream accepts is never one we reject or half-read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def lookup(obj: Mapping[str, Any], name: str) -> Any:
    """The value of field `name` in `obj` (None if absent), as Go fills a struct field.

    Go's decoder walks the object's keys in document order and sets the field for each key that
    names it, exactly or in another case, so the last such key wins: ``{"Type": "vxlan",
    "type": "host-gw"}`` is host-gw upstream, and so here.
    """
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
