"""Throwaway etcd for the lab: single members, 3-member clusters, the gRPC proxy, certificates, auth."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from flanneld.lab.netns import CTL_IP, LabError, free_port, sh, tail


def make_certs(directory: str, ips: Sequence[str] = ("127.0.0.1", CTL_IP)) -> EtcdTLS:
    """A CA, a server certificate for `ips` and a client certificate (openssl), for TLS tests and demos."""
    def ossl(*args: str) -> None:
        sh(["openssl", *args])

    os.makedirs(directory, exist_ok=True)

    path = lambda name: os.path.join(directory, name)  # noqa: E731
    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
         "-subj", "/CN=flanneld-lab-ca", "-keyout", path("ca.key"), "-out", path("ca.crt"))
    sans = ",".join([*(f"IP:{i}" for i in ips), "DNS:localhost"])
    for name, usage in (("server", "serverAuth,clientAuth"), ("client", "clientAuth")):
        with open(path(f"{name}.ext"), "w") as fh:
            fh.write(f"subjectAltName={sans}\nextendedKeyUsage={usage}\n")
        ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj",
             f"/CN=flanneld-lab-{name}", "-keyout", path(f"{name}.key"), "-out", path(f"{name}.csr"))
        ossl("x509", "-req", "-in", path(f"{name}.csr"), "-CA", path("ca.crt"), "-CAkey", path("ca.key"),
             "-CAcreateserial", "-days", "2", "-extfile", path(f"{name}.ext"), "-out", path(f"{name}.crt"))
    return EtcdTLS(cert=path("server.crt"), key=path("server.key"), ca=path("ca.crt"))


def jwt_auth_token(directory: str) -> list[str]:
    """etcd's flags for JWT auth tokens (etcd's advice for production) signed with a key made here.
    Unlike simple tokens, a JWT carries the auth revision it was issued at: any later change to
    users or roles makes etcd refuse it ("revision of auth store is old")."""
    os.makedirs(directory, exist_ok=True)
    key, pub = os.path.join(directory, "jwt.key"), os.path.join(directory, "jwt.pub")
    sh(["openssl", "genrsa", "-out", key, "2048"])
    sh(["openssl", "rsa", "-in", key, "-pubout", "-out", pub])
    return ["--auth-token", f"jwt,pub-key={pub},priv-key={key},sign-method=RS256,ttl=10m"]


def enable_auth(server: EtcdServer, user: str, password: str, prefix: str) -> None:
    """Turn on etcd auth with a root user and `user`, who may read and write keys under `prefix`."""
    server.etcdctl("user", "add", "root", "--new-user-password=rootpw", "--interactive=false")
    server.etcdctl("user", "add", user, f"--new-user-password={password}", "--interactive=false")
    server.etcdctl("role", "add", user)
    server.etcdctl("role", "grant-permission", user, "--prefix=true", "readwrite", prefix)
    server.etcdctl("user", "grant-role", user, user)
    server.etcdctl("auth", "enable")
    server.root_user = "root:rootpw"


@dataclass
class EtcdTLS:
    cert: str
    key: str
    ca: str
    client_cert_auth: bool = False


class EtcdServer:
    """A throwaway single-member etcd 3.4 (own data dir on tmpfs, fast election, stopped at the end)."""

    def __init__(self, name: str, *, listen_ip: str = "0.0.0.0", tls: EtcdTLS | None = None,
                 ns: str | None = None, extra_args: Sequence[str] = (),
                 initial_cluster: str | None = None, peer_port: int | None = None) -> None:
        self.extra_args = list(extra_args)
        self.initial_cluster = initial_cluster
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = tempfile.mkdtemp(prefix=f"etcd-{name}-", dir=base)
        self.name = name
        self.tls = tls
        self.ns = ns
        self.client_port = free_port()
        self.peer_port = peer_port or free_port()
        self.listen_ip = listen_ip
        scheme = "https" if tls else "http"
        self.endpoint = f"{scheme}://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(self.dir, "etcd.log")
        self.root_user: str | None = None  # "root:password" once auth is on (etcdctl needs it then)

    def endpoint_for(self, host: str) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host}:{self.client_port}"

    @property
    def endpoints(self) -> tuple[str, ...]:
        return (self.endpoint,)

    def start(self, timeout: float = 20) -> None:
        scheme = "https" if self.tls else "http"
        argv = [
            "etcd", "--name", self.name, "--data-dir", os.path.join(self.dir, "data"),
            "--listen-client-urls", f"{scheme}://{self.listen_ip}:{self.client_port}",
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", self.initial_cluster or f"{self.name}=http://127.0.0.1:{self.peer_port}",
            "--heartbeat-interval", "10", "--election-timeout", "100",
            "--snapshot-count", "100000", "--log-level", "warn", "--logger", "zap",
        ]
        if self.tls:
            argv += ["--cert-file", self.tls.cert, "--key-file", self.tls.key]
            if self.tls.client_cert_auth:  # etcd demands client certificates once it has a client CA
                argv += ["--client-cert-auth", "--trusted-ca-file", self.tls.ca]
        argv += self.extra_args
        if self.ns:
            argv = ["ip", "netns", "exec", self.ns, *argv]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        env = {**os.environ, "ETCD_UNSUPPORTED_ARCH": "", "ETCDCTL_API": "3"}
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env, start_new_session=True)
        log.close()
        self._wait_ready(timeout)

    def launch(self) -> None:
        """Start without waiting for health (members of a new cluster need each other first)."""
        self.start(timeout=0)

    def _wait_ready(self, timeout: float) -> None:
        if timeout <= 0:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"etcd exited ({self.proc.returncode}); log: {self.log_tail()}")
            if self.etcdctl("endpoint", "health", check=False, user=self.root_user).returncode == 0:
                return
            time.sleep(0.05)
        raise LabError(f"etcd did not become healthy in {timeout}s; log: {self.log_tail()}")

    def etcdctl(self, *args: str, check: bool = True, input: str | None = None,
                user: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = ["etcdctl", f"--endpoints={self.endpoint}", "--command-timeout=3s"]
        if self.tls:
            argv += [f"--cacert={self.tls.ca}"]
            if self.tls.client_cert_auth:
                argv += [f"--cert={self.tls.cert}", f"--key={self.tls.key}"]
        if user:
            argv.append(f"--user={user}")
        return sh([*argv, *args], ns=self.ns, check=check, input=input)

    def lease_ids(self) -> set[int]:
        """Every etcd lease in the cluster (etcdctl lease list)."""
        out = self.etcdctl("lease", "list").stdout.splitlines()
        return {int(line.strip(), 16) for line in out[1:] if line.strip()}

    def log_tail(self, lines: int = 20) -> str:
        return tail(self.log_path, lines)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL: a member crashing, not shutting down."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class EtcdCluster:
    """Three (or `size`) etcd members on one host, each with its own client port."""

    def __init__(self, name: str, size: int = 3, extra_args: Sequence[str] = ()) -> None:
        ports = [free_port() for _ in range(size)]
        initial = ",".join(f"{name}{i}=http://127.0.0.1:{port}" for i, port in enumerate(ports))
        self.members = [EtcdServer(f"{name}{i}", initial_cluster=initial, peer_port=port,
                                   extra_args=[*extra_args, "--initial-cluster-token", f"{name}-{os.getpid()}"])
                        for i, port in enumerate(ports)]

    def start(self, timeout: float = 30) -> None:
        for member in self.members:
            member.launch()
        for member in self.members:
            member._wait_ready(timeout)

    def endpoint_for(self, host: str) -> str:
        """Every member's endpoint as seen from `host`, comma-separated (a --etcd-endpoints value)."""
        return ",".join(m.endpoint_for(host) for m in self.members)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(m.endpoint for m in self.members)

    def member_on_port(self, port: int) -> EtcdServer:
        return next(m for m in self.members if m.client_port == port)

    def destroy(self) -> None:
        for member in self.members:
            member.destroy()


class EtcdProxy:
    """etcd's own gRPC proxy (``etcd grpc-proxy start``) in front of a cluster: coalesces watches."""

    def __init__(self, cluster: EtcdCluster, extra_args: Sequence[str] = ()) -> None:
        self.cluster = cluster
        self.client_port = free_port()
        self.metrics_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.client_port}"
        self.extra_args = list(extra_args)
        self.dir = tempfile.mkdtemp(prefix="etcd-proxy-")
        self.log_path = os.path.join(self.dir, "proxy.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoints(self) -> tuple[str, ...]:
        return (self.endpoint,)

    def endpoint_for(self, host: str) -> str:
        return f"http://{host}:{self.client_port}"

    def start(self, timeout: float = 20) -> None:
        members = ",".join(f"127.0.0.1:{m.client_port}" for m in self.cluster.members)
        argv = ["etcd", "grpc-proxy", "start", f"--endpoints={members}", f"--listen-addr=0.0.0.0:{self.client_port}",
                f"--advertise-client-url=127.0.0.1:{self.client_port}",
                f"--metrics-addr=http://127.0.0.1:{self.metrics_port}", *self.extra_args]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                with open(self.log_path, errors="replace") as fh:
                    raise LabError(f"grpc-proxy exited ({self.proc.returncode}): {fh.read()[-2000:]}")
            probe = sh(["etcdctl", f"--endpoints={self.endpoint}", "--command-timeout=1s", "get", "probe"],
                       check=False)
            if probe.returncode == 0:
                return
            time.sleep(0.05)
        raise LabError(f"grpc-proxy not serving after {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def etcd_metric(endpoint: str, name: str, having: str = "") -> float:
    """The sum of one metric's samples on an etcd member's (or proxy's) /metrics; with `having`,
    only the samples whose line contains it (a label, e.g. 'grpc_method="Range"')."""
    import urllib.request

    with urllib.request.urlopen(f"{endpoint}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and (line[len(name):len(name) + 1] in (" ", "{")) and having in line)


# ---------------------------------------------------------------------------------------------
