"""The etcd client (v3 gRPC): this package alone speaks etcd, so the client library can be swapped.

Built on etcd-sdk-python (``pyetcd``) for channels, TLS, authentication and endpoint failover,
with the watch stream driven directly through the generated stub so that resumption from a
revision and compaction are under our control. Endpoints get a short ``time_retry`` so that one
failed call does not blacklist an endpoint for minutes.

Every failure surfaces as :class:`~flanneld.etcd.errors.EtcdError` with a one-line reason;
the password is never part of a message, a log line or a repr.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pyetcd
from google.protobuf.message import DecodeError
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc

from flanneld.etcd import h2_unary
from flanneld.etcd.errors import (
    Compacted,
    EtcdError,
    describe_error,
    is_auth_expired,
    is_unreachable,
    token_rejected,
)
from flanneld.etcd.options import EndpointError, EtcdOptions, parse_endpoint
from flanneld.etcd.tls import checked_tls_context, read_file, tls_failure

log = logging.getLogger(__name__)


ENDPOINT_RETRY_SECONDS = 0.5


PIPELINE_MIN_CALLS = 32  # below this, grpcio's per-call cost does not matter


_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # pings only while a call is open (the daemon's watch always is): etcd's default policy answers
    # pings on an idle connection with GOAWAY "too_many_pings"
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),  # back within ~1 s of etcd's return
]


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease_id: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    deleted: bool
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One watch response: its header revision and events.

    ``created`` marks the stream's first response, whose header revision is etcd's current one,
    *not* a promise that events up to it were delivered (catch-up events follow it).
    """

    revision: int
    events: list[WatchEvent]
    created: bool = False


@dataclass(frozen=True)
class Compare:
    """One transaction guard on a key or key range [key, range_end)."""

    key: str
    target: str  # "version" | "mod" | "create"
    op: str  # "==" | "<" | ">" | "!="
    value: int
    range_end: str | bytes | None = None  # see prefix_range_end

    def build(self) -> Any:
        cls = {"version": pyetcd.transactions.Version, "mod": pyetcd.transactions.Mod,
               "create": pyetcd.transactions.Create}[self.target]
        cmp = cls(self.key, self.range_end)
        if self.op == "==":
            return cmp == self.value
        if self.op == "<":
            return cmp < self.value
        if self.op == ">":
            return cmp > self.value
        return cmp != self.value


def unchanged(key: str, mod_revision: int) -> Compare:
    """The guard "`key` is as it was read": its mod revision, or still absent when it was (0)."""
    return Compare(key, "mod", "==", mod_revision) if mod_revision else Compare(key, "version", "==", 0)


def prefix_range_end(prefix: str) -> bytes:
    """The range_end that selects every key starting with `prefix` (bytes: etcd compares keys as
    bytes, and the end of a prefix of non-ASCII text need not be UTF-8)."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"


def _kv(kv: Any) -> KeyValue:
    return KeyValue(kv.key.decode("utf-8", "replace"), bytes(kv.value), kv.mod_revision,
                    kv.create_revision, kv.version, kv.lease)


def _next_endpoint(client: pyetcd.MultiEndpointEtcd3Client) -> None:
    """Mark the member in use failed: the client's next call goes to another (pyetcd's failover)."""
    if client.endpoint_in_use is not None:
        client.endpoint_in_use.fail()
        client._clear_old_stubs()


class EtcdClient:
    """A connection to etcd with the handful of operations flannel needs."""

    def __init__(self, options: EtcdOptions) -> None:
        self.options = options
        if not options.endpoints:
            raise EtcdError("no etcd endpoints given")
        try:
            self._endpoints = [parse_endpoint(e) for e in options.endpoints]
        except EndpointError as exc:
            raise EtcdError(str(exc)) from None
        if bool(options.certfile) != bool(options.keyfile):
            raise EtcdError("--etcd-certfile and --etcd-keyfile must be given together")
        wants_tls = bool(options.cafile or options.certfile)
        secure = {s for _, _, s in self._endpoints}
        if wants_tls and False in secure:
            raise EtcdError(
                "etcd TLS files were given but an endpoint uses http://; use https:// endpoints"
            )
        self._creds = None
        self._tls_context: ssl.SSLContext | None = None
        if True in secure:
            self._creds = grpc.ssl_channel_credentials(
                root_certificates=read_file(options.cafile, "CA file") if options.cafile else None,
                private_key=read_file(options.keyfile, "key file") if options.keyfile else None,
                certificate_chain=read_file(options.certfile, "certificate file") if options.certfile else None,
            )
            # grpcio only finds out at the first handshake, and then says "connection failed"
            self._tls_context = checked_tls_context(options)
        if bool(options.username) != bool(options.password):
            raise EtcdError("--etcd-username and --etcd-password must be given together")
        self._lock = threading.Lock()
        self._client: pyetcd.MultiEndpointEtcd3Client | None = None

    def _explain(self, exc: BaseException) -> str:
        """The one-line reason for a failed call, naming the TLS problem grpcio only calls 'connection failed'."""
        text = describe_error(exc)
        if self._tls_context is None or not is_unreachable(exc):
            return text
        for host, port, secure in self._endpoints:
            if secure and (why := tls_failure(host, port, self._tls_context, min(self.options.timeout, 2.0),
                                              bool(self.options.certfile))):
                return f"{text}: {why}"
        return text

    # -- connection --------------------------------------------------------------------------

    def _connect(self) -> pyetcd.MultiEndpointEtcd3Client:
        endpoints = [
            pyetcd.Endpoint(host, port, secure=secure, creds=self._creds if secure else None,
                            time_retry=ENDPOINT_RETRY_SECONDS, opts=_CHANNEL_OPTIONS)
            for host, port, secure in self._endpoints
        ]
        try:
            # no credentials here: the library would log in on one member picked at random, with
            # no failover (one start in three failing with a member down); we log in ourselves
            client = pyetcd.MultiEndpointEtcd3Client(endpoints=endpoints, timeout=self.options.timeout,
                                                     failover=True)
            if self.options.username:
                self._authenticate(client)
        except Exception as exc:
            for ep in endpoints:
                ep.close()
            raise EtcdError(f"cannot connect to etcd at {','.join(self.options.endpoints)}: "
                                f"{self._explain(exc)}") from None
        # The token travels as plain metadata, as etcdctl sends it. pyetcd also wraps it in gRPC
        # call credentials, which grpcio refuses on an http:// channel ("does not have a sufficient
        # security level"), so username/password would never work without TLS.
        client.call_credentials = None
        return client

    def _authenticate(self, client: pyetcd.MultiEndpointEtcd3Client) -> None:
        """Get an auth token from the first member that answers (each tried once)."""
        request = etcdrpc.AuthenticateRequest(name=self.options.username, password=self.options.password)
        tries = len(client.endpoints)
        for tried in range(1, tries + 1):
            try:
                client.metadata = (("token", client.authstub.Authenticate(request, self.options.timeout).token),)
                return
            except grpc.RpcError as exc:
                if tried == tries or not is_unreachable(exc):
                    raise
                log.info("etcd authentication: endpoint unreachable (%s), trying another", describe_error(exc))
                _next_endpoint(client)

    def _get_client(self) -> pyetcd.MultiEndpointEtcd3Client:
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _reset_client(self, stale: pyetcd.MultiEndpointEtcd3Client) -> None:
        with self._lock:
            if self._client is stale:
                self._client = None
                stale.close()

    def _call(self, what: str, fn: Any) -> Any:
        """Run fn(client); re-authenticate once on a rejected token, fail over to each other
        endpoint on a connection failure; wrap every error."""
        reauthenticated = False
        failovers = len(self._endpoints) - 1
        while True:
            client = self._get_client()
            try:
                return fn(client)
            except EtcdError:
                raise
            except Exception as exc:
                if not reauthenticated and is_auth_expired(exc):
                    reauthenticated = True
                    log.info("etcd refused our auth token (%s), logging in again", describe_error(exc))
                    self._reset_client(client)
                    continue
                if failovers > 0 and is_unreachable(exc) and not isinstance(exc, etcd_exc.NoServerAvailableError):
                    failovers -= 1
                    if isinstance(exc, grpc.RpcError):
                        _next_endpoint(client)  # our own streams (keepalive) bypass pyetcd's marking
                    log.info("etcd %s: endpoint unreachable (%s), trying another", what, describe_error(exc))
                    continue
                raise EtcdError(f"etcd {what} failed: {self._explain(exc)}") from None

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _auth(self, client: pyetcd.MultiEndpointEtcd3Client) -> dict[str, Any]:
        return {"metadata": client.metadata}

    # -- key/value ---------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        resp = self._call(f"get {key}", lambda c: c.get_response(key))
        return _kv(resp.kvs[0]) if resp.kvs else None

    def list_prefix(self, prefix: str, revision: int | None = None,
                    serializable: bool = False) -> tuple[int, list[KeyValue]]:
        """All keys under `prefix` (at `revision` if given) and the revision they were read at.

        `serializable`: any member (or a gRPC proxy's cache) may answer from its own state without
        asking the leader; the revision returned is the one that state is at.
        """
        resp = self._call(f"list {prefix}", lambda c: c.get_prefix_response(prefix, revision=revision,
                                                                             serializable=serializable))
        return resp.header.revision, [_kv(kv) for kv in resp.kvs]

    def check_history(self, prefix: str, revision: int) -> None:
        """Raise Compacted when etcd no longer keeps `revision` (one key of `prefix` read at it,
        keys only): asked before a watch resumes after it. A gRPC proxy restarted after a
        compaction can accept a watch at a compacted revision and then deliver nothing
        (etcd-io/etcd#10650); this question goes to the leader, whose answer is not the proxy's."""
        def run(client: pyetcd.MultiEndpointEtcd3Client) -> None:
            try:
                client.get_prefix_response(prefix, revision=revision, keys_only=True, limit=1)
            except grpc.RpcError as exc:
                # "required revision has been compacted", or "... is a future revision" (etcd restored
                # from an older backup): re-list. OUT_OF_RANGE from etcd, UNKNOWN through a gRPC proxy.
                if exc.code() == grpc.StatusCode.OUT_OF_RANGE or "required revision" in (exc.details() or ""):
                    raise Compacted(0) from None
                raise
        self._call(f"read {prefix} at revision {revision}", run)

    def put(self, key: str, value: bytes, lease_id: int = 0) -> int:
        resp = self._call(f"put {key}", lambda c: c.put(key, value, lease=lease_id or None))
        return resp.header.revision

    def delete(self, key: str) -> bool:
        return bool(self._call(f"delete {key}", lambda c: c.delete(key)))

    def txn(self, compares: Sequence[Compare], puts: Sequence[tuple[str, bytes, int]] = (),
            deletes: Sequence[str] = ()) -> bool:
        """Apply puts (key, value, lease id) and deletes iff every compare holds."""
        def run(client: pyetcd.MultiEndpointEtcd3Client) -> bool:
            ops: list[Any] = [client.transactions.put(k, v, lease=lid or None) for k, v, lid in puts]
            ops += [client.transactions.delete(k) for k in deletes]
            ok, _ = client.transaction(compare=[c.build() for c in compares], success=ops, failure=[])
            return bool(ok)
        return self._call("transaction", run)

    def compact(self, revision: int) -> None:
        self._call("compact", lambda c: c.compact(revision, physical=True))

    # -- leases ------------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        return self._call("lease grant", lambda c: c.lease(ttl)).id

    def keepalive(self, lease_id: int) -> int:
        """Refresh an etcd lease; its new TTL, or 0 when it no longer exists.

        The request stream stays open until the answer arrives: etcd's gRPC proxy cancels a
        LeaseKeepAlive stream the client half-closes before it has answered ("context
        canceled"), where etcd itself answers anyway.
        """
        def run(client: pyetcd.MultiEndpointEtcd3Client) -> int:
            answered = threading.Event()

            def requests() -> Iterator[Any]:
                yield etcdrpc.LeaseKeepAliveRequest(ID=lease_id)
                answered.wait(self.options.timeout)

            call = client.leasestub.LeaseKeepAlive(requests(), self.options.timeout, **self._auth(client))
            try:
                return next((resp.TTL for resp in call), 0)
            finally:
                answered.set()
                call.cancel()
        return self._call("lease keepalive", run)

    def time_to_live_many(self, lease_ids: Sequence[int]) -> dict[int, int]:
        """TTLs of many etcd leases (flannelctl, not the daemon).

        etcd has no bulk call, so many lookups go pipelined over one raw HTTP/2 connection
        (``h2_unary``, ~10x cheaper than grpcio per call); whatever that leaves unanswered — a
        refused stream, an expired auth token, a proxy without h2c — is asked through grpcio.
        """
        unique = list(dict.fromkeys(lease_ids))
        ttls = self._pipelined_ttls(unique) if len(unique) >= PIPELINE_MIN_CALLS else {}
        missing = [lid for lid in unique if lid not in ttls]
        if not missing:
            return ttls

        def run(client: pyetcd.MultiEndpointEtcd3Client) -> dict[int, int]:
            stub = client.leasestub
            futures = {
                lid: stub.LeaseTimeToLive.future(etcdrpc.LeaseTimeToLiveRequest(ID=lid),
                                                 client.timeout, **self._auth(client))
                for lid in missing
            }
            return {lid: fut.result().TTL for lid, fut in futures.items()}
        ttls.update(self._call("lease ttl", run))
        return ttls

    def _pipelined_ttls(self, lease_ids: list[int]) -> dict[int, int]:
        client = self._get_client()
        in_use = client.endpoint_in_use
        host, port, secure = next((ep for ep in self._endpoints if in_use is not None
                                    and f"{ep[0]}:{ep[1]}" == in_use.netloc), self._endpoints[0])
        try:
            target = h2_unary.Target(host.strip("[]"), port, self._tls_context if secure else None,
                                     tuple(client.metadata or ()))
            requests = [etcdrpc.LeaseTimeToLiveRequest(ID=lid).SerializeToString() for lid in lease_ids]
            answers = h2_unary.call_many(target, "/etcdserverpb.Lease/LeaseTimeToLive", requests,
                                         self.options.timeout)
        except (h2_unary.H2Error, OSError, ValueError) as exc:
            log.debug("pipelined lease TTL lookup failed (%s); using grpc", exc)
            return {}
        ttls = {}
        for lid, body in zip(lease_ids, answers, strict=True):
            if body is not None:
                try:
                    ttls[lid] = etcdrpc.LeaseTimeToLiveResponse.FromString(body).TTL
                except DecodeError:
                    continue
        return ttls

    def revoke(self, lease_id: int) -> None:
        """Revoke an etcd lease; one that is gone already (expired, revoked) is no error: the goal
        of a revoke, no such lease, holds."""
        def run(client: pyetcd.MultiEndpointEtcd3Client) -> None:
            try:
                client.revoke_lease(lease_id)
            except grpc.RpcError as exc:
                if not (hasattr(exc, "code") and exc.code() == grpc.StatusCode.NOT_FOUND):
                    raise

        self._call("lease revoke", run)

    def healthy(self) -> bool:
        try:
            self._call("status", lambda c: c.status())
        except EtcdError:
            return False
        return True

    # -- watch -------------------------------------------------------------------------------

    def watch_prefix(self, prefix: str, start_revision: int) -> Watch:
        return self._call("watch", lambda c: Watch(self, c, prefix, start_revision))


class Watch:
    """A watch stream on a key prefix from a revision; iterate for batches, cancel() to stop.

    Iteration raises Compacted when the start revision is gone and EtcdError when the
    stream breaks; the caller decides how to resume.
    """

    def __init__(self, etcd_client: EtcdClient, client: pyetcd.MultiEndpointEtcd3Client, prefix: str,
                 start_revision: int) -> None:
        self._etcd_client = etcd_client
        self._client = client
        self._requests: queue.Queue[Any] = queue.Queue()
        self._cancelled = False
        create = etcdrpc.WatchCreateRequest(
            key=prefix.encode(), range_end=prefix_range_end(prefix),
            start_revision=start_revision, progress_notify=True,
        )
        self._requests.put(etcdrpc.WatchRequest(create_request=create))
        stub = etcdrpc.WatchStub(client.channel)
        metadata = (*(client.metadata or ()), ("hasleader", "true"))
        self._call = stub.Watch(iter(self._requests.get, None), metadata=metadata)

    def __iter__(self) -> Iterator[WatchBatch]:
        try:
            for resp in self._call:
                if resp.compact_revision:
                    raise Compacted(resp.compact_revision)
                if resp.canceled:
                    if self._etcd_client.options.username and token_rejected(resp.cancel_reason, watch=True):
                        # a token etcd forgot (it restarted) or no longer takes (a JWT from before
                        # a change to users or roles): the next watch logs in afresh
                        log.info("etcd refused our auth token (watch canceled: %s), logging in again",
                                 resp.cancel_reason)
                        self._etcd_client._reset_client(self._client)
                    raise EtcdError(f"etcd canceled the watch: {resp.cancel_reason or 'no reason given'}")
                events = [WatchEvent(ev.type == ev.DELETE, _kv(ev.kv)) for ev in resp.events]
                yield WatchBatch(resp.header.revision, events, resp.created)
        except grpc.RpcError as exc:
            if self._cancelled:
                return
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                endpoint = self._client.endpoint_in_use
                if endpoint is not None:
                    endpoint.fail()
            if is_auth_expired(exc):
                self._etcd_client._reset_client(self._client)
            raise EtcdError(f"etcd watch broke: {describe_error(exc)}") from None
        finally:
            self._requests.put(None)

    def cancel(self) -> None:
        self._cancelled = True
        self._requests.put(None)
        self._call.cancel()
