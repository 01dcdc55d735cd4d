"""The etcd TLS files, checked at start, and why a handshake fails, in words.

grpcio reports every TLS problem as "connection failed"; these name the file or the refusal
instead (an untrusted server certificate, a client certificate etcd wants or rejects).
"""

from __future__ import annotations

import socket
import ssl

from flanneld.etcd import h2_unary
from flanneld.etcd.errors import EtcdError
from flanneld.etcd.options import EtcdOptions


def read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise EtcdError(f"cannot read etcd {what} {path}: {exc.strerror}") from None


def checked_tls_context(options: EtcdOptions) -> ssl.SSLContext:
    """The TLS files as a client context; EtcdError naming the file that is not usable."""
    try:
        ctx = h2_unary.tls_context(options.cafile)
    except ssl.SSLError as exc:
        raise EtcdError(f"etcd CA file {options.cafile} holds no usable certificate: {exc.reason}") from None
    if options.certfile:
        def no_passphrase() -> bytes:
            raise EtcdError(f"etcd key file {options.keyfile} is encrypted; give an unencrypted key")
        try:
            ctx.load_cert_chain(options.certfile, options.keyfile, password=no_passphrase)
        except ssl.SSLError as exc:
            raise EtcdError(f"etcd certificate file {options.certfile} and key file {options.keyfile} are not "
                                f"a usable PEM certificate and matching key ({exc.reason or 'not PEM'})") from None
    return ctx


_TLS_ALERTS = {
    "CERTIFICATE_REQUIRED": "etcd requires a client certificate (give --etcd-certfile and --etcd-keyfile)",
    "BAD_CERTIFICATE": "etcd rejected our client certificate (is it signed by a CA etcd trusts?)",
    "UNKNOWN_CA": "etcd does not trust the CA that signed our client certificate",
    "CERTIFICATE_UNKNOWN": "etcd rejected our client certificate",
    "CERTIFICATE_EXPIRED": "etcd says our client certificate has expired",
    "HANDSHAKE_FAILURE": "etcd and we share no TLS version or cipher",
}


def tls_failure(host: str, port: int, ctx: ssl.SSLContext, timeout: float, has_cert: bool) -> str | None:
    """Why a TLS connection to host:port fails, in words; None when TLS is not the problem.

    grpcio reports every handshake failure as "connection failed" (the real reason goes to its
    own log), so after a failed call we shake hands ourselves with the same files. A missing or
    rejected client certificate surfaces only after the handshake in TLS 1.3, hence one read.
    """
    name = host.strip("[]")
    shaken = False
    try:
        with socket.create_connection((name, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=name) as conn:
            shaken = True
            conn.sendall(h2_unary.PREFACE + h2_unary.frame(h2_unary.SETTINGS, 0, 0))
            if conn.recv(1):
                return None  # etcd talks to us: TLS is fine
            raise ConnectionResetError
    except ssl.SSLCertVerificationError as exc:
        return f"TLS: etcd's certificate is not trusted ({exc.verify_message}); check --etcd-cafile"
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
        reason = (getattr(exc, "reason", None) or "").upper()
        alert = next((a for a in _TLS_ALERTS if a in reason), None)
        if alert is None and (shaken or "CERTIFICATE" in reason):
            # a certificate complaint without a known alert, or closed right after the handshake
            # before the alert could be read: a refusal of our certificate
            alert = "BAD_CERTIFICATE"
        if alert is None:
            return f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}"
        if "CERTIFICATE" in alert and not has_cert:
            alert = "CERTIFICATE_REQUIRED"
        return f"TLS: {_TLS_ALERTS[alert]}"
    except OSError:
        return None  # refused, unreachable, timed out: not a TLS matter
