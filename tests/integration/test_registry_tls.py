"""TLS (CA-only and mutual) and username/password against real TLS etcd servers."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import time

import pytest

from flanneld import lab
from flanneld.etcd.client import EtcdClient
from flanneld.etcd.errors import EtcdError
from flanneld.etcd.options import EtcdOptions

PASSWORD = "s3cret-Pa55word-xyzzy"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return lab.make_certs(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture(scope="module")
def mutual_tls_etcd(session_lab, certs):
    server = lab.EtcdServer("mtls", tls=dataclasses.replace(certs, client_cert_auth=True))
    server.start()
    yield server
    server.destroy()


@pytest.fixture(scope="module")
def auth_etcd(session_lab, certs):
    """CA-only TLS, auth enabled, auth tokens that expire after 1 s of idleness."""
    server = lab.EtcdServer("auth", tls=certs, extra_args=["--auth-token", "simple", "--auth-token-ttl", "1"])
    server.start()
    lab.enable_auth(server, "flannel", PASSWORD, "/coreos.com/network/")
    yield server
    server.destroy()


@pytest.fixture(scope="module")
def plain_auth_etcd(session_lab):
    """Auth over plain http:// (etcdctl --user and upstream support it)."""
    server = lab.EtcdServer("pauth", extra_args=["--auth-token", "simple", "--auth-token-ttl", "1"])
    server.start()
    lab.enable_auth(server, "flannel", PASSWORD, "/coreos.com/network/")
    yield server
    server.destroy()


def client_dir(certs):
    return os.path.dirname(certs.ca)


def roundtrip(reg: EtcdClient) -> None:
    key = reg.options.prefix + "/subnets/198.18.1.0-24"
    reg.put(key, b"v1")
    assert reg.get(key).value == b"v1"
    revision, kvs = reg.list_prefix(reg.options.prefix + "/subnets/")
    assert [kv.key for kv in kvs] == [key]
    watch = reg.watch_prefix(reg.options.prefix + "/subnets/", revision)
    batch = next(b for b in watch if b.events)
    watch.cancel()
    assert batch.events[0].kv.value == b"v1"
    bulk_ttls(reg)


def bulk_ttls(reg: EtcdClient) -> None:
    """The pipelined HTTP/2 TTL lookup works over this TLS/auth set-up itself (no grpcio fallback)."""
    ids = [reg.grant(600) for _ in range(40)]
    fast = reg._pipelined_ttls(ids)
    assert sorted(fast) == sorted(ids) and all(590 <= ttl <= 600 for ttl in fast.values())
    both = reg.time_to_live_many([*ids, 0x7E57])  # an unknown lease answers -1, not an error
    assert set(both) == {*ids, 0x7E57} and both[0x7E57] == -1


def test_mutual_tls_with_client_certificate(mutual_tls_etcd, certs):
    d = client_dir(certs)
    reg = EtcdClient(EtcdOptions(endpoints=(mutual_tls_etcd.endpoint,), cafile=certs.ca,
                               certfile=f"{d}/client.crt", keyfile=f"{d}/client.key"))
    roundtrip(reg)
    reg.close()


def test_mutual_tls_without_client_certificate_fails_clearly(mutual_tls_etcd, certs):
    reg = EtcdClient(EtcdOptions(endpoints=(mutual_tls_etcd.endpoint,), cafile=certs.ca, timeout=2))
    with pytest.raises(EtcdError, match=r"^etcd get .* failed: .*TLS: etcd requires a client certificate "
                                            r"\(give --etcd-certfile and --etcd-keyfile\)$"):
        reg.get("/coreos.com/network/config")
    reg.close()


def test_client_certificate_from_another_ca_is_named(mutual_tls_etcd, tmp_path):
    other = lab.make_certs(str(tmp_path))
    d = client_dir(other)
    reg = EtcdClient(EtcdOptions(endpoints=(mutual_tls_etcd.endpoint,), cafile=mutual_tls_etcd.tls.ca,
                               certfile=f"{d}/client.crt", keyfile=f"{d}/client.key", timeout=2))
    with pytest.raises(EtcdError, match=r"TLS: etcd rejected our client certificate"):
        reg.get("/coreos.com/network/config")
    reg.close()


def test_auth_over_plain_http_on_every_path(plain_auth_etcd):
    """Unary calls, watch, keepalive and the pipelined TTL lookup, token as metadata without TLS."""
    reg = EtcdClient(EtcdOptions(endpoints=(plain_auth_etcd.endpoint,), username="flannel", password=PASSWORD))
    roundtrip(reg)
    lease_id = reg.grant(60)
    assert 50 <= reg.keepalive(lease_id) <= 60
    time.sleep(2.5)  # token TTL is 1 s: re-authenticates transparently over http too
    assert reg.keepalive(lease_id) > 0
    reg.close()


def test_ca_only_tls(auth_etcd, certs):
    # CA-only (no client cert) is honoured, not silently ignored as upstream does
    reg = EtcdClient(EtcdOptions(endpoints=(auth_etcd.endpoint,), cafile=certs.ca, username="flannel",
                               password=PASSWORD))
    roundtrip(reg)
    reg.close()


def test_unknown_ca_is_rejected(auth_etcd):
    reg = EtcdClient(EtcdOptions(endpoints=(auth_etcd.endpoint,), username="flannel", password=PASSWORD, timeout=2))
    with pytest.raises(EtcdError, match=r"cannot connect to etcd.*TLS: etcd's certificate is not trusted "
                                            r"\(.*\); check --etcd-cafile"):
        reg.get("/coreos.com/network/config")


def test_auth_survives_token_expiry(auth_etcd, certs):
    reg = EtcdClient(EtcdOptions(endpoints=(auth_etcd.endpoint,), cafile=certs.ca, username="flannel",
                               password=PASSWORD))
    reg.put("/coreos.com/network/config", b"{}")
    time.sleep(2.5)  # token TTL is 1 s: the next call must re-authenticate transparently
    assert reg.get("/coreos.com/network/config").value == b"{}"
    reg.close()


def test_wrong_password_is_a_clear_error_without_the_password(auth_etcd, certs, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = PASSWORD + "-wrong"
    opts = EtcdOptions(endpoints=(auth_etcd.endpoint,), cafile=certs.ca, username="flannel", password=wrong)
    reg = EtcdClient(opts)
    with pytest.raises(EtcdError) as info:
        reg.get("/coreos.com/network/config")
    message = str(info.value)
    assert "authentication failed" in message
    assert wrong not in message and PASSWORD not in message
    assert PASSWORD not in repr(opts) and PASSWORD not in opts.describe()
    assert PASSWORD not in caplog.text


def test_permission_denied_outside_prefix(auth_etcd, certs):
    reg = EtcdClient(EtcdOptions(endpoints=(auth_etcd.endpoint,), cafile=certs.ca, username="flannel",
                               password=PASSWORD))
    with pytest.raises(EtcdError, match="PERMISSION_DENIED"):
        reg.put("/elsewhere/key", b"x")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (EtcdOptions(endpoints=("http://127.0.0.1:2379",), cafile="/etc/hostname"), "use https://"),
        (EtcdOptions(endpoints=("https://127.0.0.1:2379",), cafile="/nonexistent/ca.crt"),
         "cannot read etcd CA file /nonexistent/ca.crt: No such file or directory"),
        (EtcdOptions(endpoints=("https://127.0.0.1:2379",), certfile="/etc/hostname"), "must be given together"),
        (EtcdOptions(endpoints=("ftp://127.0.0.1:2379",)), "invalid etcd endpoint 'ftp://127.0.0.1:2379'"),
        (EtcdOptions(endpoints=("http://127.0.0.1:99999",)), "the port must be a number in 1..65535"),
        (EtcdOptions(endpoints=("notaurl",)), "invalid etcd endpoint 'notaurl': not a URL"),
        (EtcdOptions(username="flannel"), "--etcd-username and --etcd-password must be given together"),
    ],
)
def test_bad_connection_options(options, message):
    with pytest.raises(EtcdError, match=message):
        EtcdClient(options)


def test_unusable_tls_files_are_named_at_start(tmp_path, certs):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    d = client_dir(certs)
    with pytest.raises(EtcdError, match=rf"^etcd CA file {junk} holds no usable certificate"):
        EtcdClient(EtcdOptions(endpoints=("https://127.0.0.1:2379",), cafile=str(junk)))
    with pytest.raises(EtcdError, match=rf"^etcd certificate file {junk} and key file {d}/client.key are not a "
                                            "usable PEM certificate and matching key"):
        EtcdClient(EtcdOptions(endpoints=("https://127.0.0.1:2379",), cafile=certs.ca, certfile=str(junk),
                             keyfile=f"{d}/client.key"))
    with pytest.raises(EtcdError, match="are not a usable PEM certificate and matching key"):  # a mismatched pair
        EtcdClient(EtcdOptions(endpoints=("https://127.0.0.1:2379",), cafile=certs.ca, certfile=f"{d}/client.crt",
                             keyfile=certs.key))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-passout", "pass:secret", "-subj", "/CN=encrypted", "-days", "1", "-keyout",
                    str(tmp_path / "enc.key"), "-out", str(tmp_path / "enc.crt")], check=True, capture_output=True)
    with pytest.raises(EtcdError, match=rf"^etcd key file {tmp_path}/enc.key is encrypted; give an unencrypted"):
        EtcdClient(EtcdOptions(endpoints=("https://127.0.0.1:2379",), certfile=str(tmp_path / "enc.crt"),
                             keyfile=str(tmp_path / "enc.key")))  # never a passphrase prompt
