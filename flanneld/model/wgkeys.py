"""WireGuard keys: the node's private key file, public keys, and the two spellings peers use.

The private key lives where upstream keeps it (``/run/flannel/wgkey``, mode 0400, or
``$WIREGUARD_KEY_FILE``) in WireGuard's base64 form, one key for both devices. It is generated
once and reused, so a restarted daemon keeps its public key and peers need no change. Keys
travel as :class:`Key` values whose ``repr`` never shows the secret: a key that reaches a log
line, an exception or a dataclass repr prints as ``<key>``.

Leases carry base64 (upstream's wgtypes.Key.String()); wireguard-go's UAPI speaks hex.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets

from flanneld.model.atomicfile import write_atomically

DEFAULT_KEY_FILE = "/run/flannel/wgkey"
KEY_LEN = 32


class WgKeyError(ValueError):
    """A key file or key text that is not a WireGuard key; the message names the problem, not the key."""


class Key:
    """32 bytes of key material; compares by value, never prints it."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_LEN:
            raise WgKeyError(f"a WireGuard key is {KEY_LEN} bytes, got {len(raw)}")
        self.raw = bytes(raw)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and secrets.compare_digest(self.raw, other.raw)

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return "<key>"

    __str__ = __repr__

    @property
    def base64(self) -> str:
        return base64.b64encode(self.raw).decode()

    @property
    def hex(self) -> str:
        return self.raw.hex()

    @classmethod
    def from_base64(cls, text: str) -> Key:
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise WgKeyError("not valid base64") from None
        if len(raw) != KEY_LEN:
            raise WgKeyError(f"decodes to {len(raw)} bytes, a WireGuard key is {KEY_LEN}")
        return cls(raw)

    @classmethod
    def from_hex(cls, text: str) -> Key:
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise WgKeyError("not a 64-digit hex key") from None


ZERO = Key(bytes(KEY_LEN))  # what the UAPI reports for "no preshared key"


def generate_private() -> Key:
    """A new Curve25519 private key, clamped as ``wg genkey`` does."""
    raw = bytearray(secrets.token_bytes(KEY_LEN))
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return Key(bytes(raw))


def public_of(private: Key) -> Key:
    """The public key of `private` (X25519 with the base point, via the cryptography library)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    public = X25519PrivateKey.from_private_bytes(private.raw).public_key()
    return Key(public.public_bytes(Encoding.Raw, PublicFormat.Raw))


def key_file() -> str:
    return os.environ.get("WIREGUARD_KEY_FILE") or DEFAULT_KEY_FILE


def load(path: str) -> Key | None:
    """The private key in `path`, None when there is no such file.

    A file that exists but holds no key is an error, never silently replaced: peers know its
    public key.
    """
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            text = fh.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise WgKeyError(f"cannot read WireGuard key file {path}: {exc.strerror}") from None
    try:
        return Key.from_base64(text)
    except WgKeyError as exc:
        raise WgKeyError(f"WireGuard key file {path} holds no valid key ({exc}); remove it to have a new "
                         "key generated (peers then learn the new public key from our lease)") from None


def load_or_create(path: str) -> tuple[Key, bool]:
    """The private key in `path`, or a new one written there (mode 0400); (key, created)."""
    key = load(path)
    if key is not None:
        return key, False
    key = generate_private()
    write_atomically(path, key.base64 + "\n", 0o400)
    return key, True
