"""The agent's etcd registry: one lease session, and a desired-state reconcile of its keys.

Responsibility: make etcd show what this agent runs (SPEC.md "etcd layout"), and nothing
else: `{prefix}/agents/{agent}` plus one key per worker slot (and, optionally, gRPC
naming keys), all hanging on the agent's one lease, so that a dead host's keys vanish
within the TTL.

Invariants:
- A worker's key lives from its start until it stops for good (`desired_keys`): a
  crash, a failing health check or any other replacement in place rewrites it (state
  stopping/backoff/starting, `ready` false, the new pid) but never deletes it. A worker
  that stops for good (`WorkerStatus.leaving`: stop, scale down, removal, the old
  generation of a reload, shutdown) loses its key as soon as it starts stopping, before
  it is signalled, so clients stop sending to it first. FATAL slots have no key.
- One mechanism writes keys: `publish()` records the desired state (the latest
  `ServiceStatus` list); the reconcile loop computes the keys that should exist, diffs
  them against what it last wrote (`_remote`) and applies only the difference, in
  transactions of at most `MAX_TXN_OPS` operations. A failed or timed-out transaction
  marks its keys "unknown", so they are rewritten (or deleted) after the reconnect.
  Bursts of `publish()` are coalesced, except a snapshot in which a registered worker
  leaves rotation (health turns failing, or ready turns false): that one is written
  before anything newer, so the key shows it even when the worker is replaced within
  milliseconds.
- Every etcd call has a timeout (`settings.timeout`); `run()` never raises on etcd
  trouble. The registry runs as its own task and never touches workers: an etcd outage
  only flips `state` to "disconnected" (and publishes registry_disconnected).
- The lease is kept alive by its own task that awaits nothing but the keepalive, so a
  slow transaction never delays a refresh. A keepalive answering TTL <= 0 (expired
  during an outage, revoked, or the data dir wiped) means every key is gone: take a new
  lease and write everything again.
- `/agents/{agent}` is created only if absent. If another lease holds it, the name is
  taken (another host, or this agent's previous life whose lease has not expired yet):
  report it, write no service key, and retry until the key frees up.

etcd3aio is imported here only (and used by agent.discovery through `EtcdClient`), so
the rest of the agent neither knows nor cares which etcd client library is in use. This
module imports nothing from supervisor/ at run time, so svctl can use `EtcdClient`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import json
import logging
import math
import random
import socket
import ssl
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, cast

import grpc
import grpc.aio

_sys_path_before = list(sys.path)
import etcd3aio  # noqa: E402 - sys.path is restored right below

# etcd3aio puts its generated-code folder first on sys.path (its modules are named
# `etcd`, `google.api`, ...). It imports all of them eagerly, so move that folder to the
# end: it must not shadow anything the rest of the process imports later.
for _entry in [p for p in sys.path if p not in _sys_path_before]:
    sys.path.remove(_entry)
    sys.path.append(_entry)
del _sys_path_before

if TYPE_CHECKING:
    from supervisor.events import EventBus
    from supervisor.status import ServiceStatus, WorkerStatus

log = logging.getLogger(__name__)

T = TypeVar("T")

#: etcd's default --max-txn-ops.
MAX_TXN_OPS = 128
#: Coalesce a burst of publish() calls into one transaction (ready -> visible stays fast).
DEBOUNCE = 0.005
#: Reconnect pacing: fast first retry, capped low so that a recovered etcd sees every
#: agent back within ~2 s.
RECONNECT_INITIAL = 0.1
RECONNECT_MAX = 1.0
RECONNECT_JITTER = 0.2
#: Refresh the lease this many times per TTL, but never more often than the minimum.
KEEPALIVES_PER_TTL = 3
KEEPALIVE_MIN_INTERVAL = 0.2
#: How often to retry taking the agent name while another lease holds it.
NAME_CLASH_RETRY = 1.0
#: Upper bound on revoking the lease at shutdown (keys expire within the TTL anyway).
REVOKE_TIMEOUT = 2.0
#: etcd's simple auth tokens live 300 s by default; refresh well before.
TOKEN_REFRESH = 240.0
DEFAULT_ETCD_PORT = 2379
#: UDP "connect" (no packet is sent) to a non-routed address finds the source address
#: of the default route: the host's primary address.
_PRIMARY_PROBE = ("10.255.255.255", 1)
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "", "*"})
#: States in which a slot that is not leaving keeps its key: a process is there, or one
#: is about to be (BACKOFF; EXITED between a process's end and its replacement). FATAL
#: waits a long while: no key until its next try.
REGISTERED_STATES = frozenset({"starting", "running", "stopping", "backoff", "exited"})
#: Snapshots kept from coalescing (see Registry.publish), oldest dropped beyond this.
MAX_KEPT_SNAPSHOTS = 64
#: Encoded worker values kept (a few per worker: its current and recent states).
VALUE_CACHE_SIZE = 8192

RegistryState = Literal["connected", "disconnected", "disabled"]


class RegistrySettingsLike(Protocol):
    """The `[registry]` settings this module reads (agent.config.RegistrySettings)."""

    @property
    def endpoints(self) -> tuple[str, ...]: ...
    @property
    def prefix(self) -> str: ...
    @property
    def ttl(self) -> float: ...
    @property
    def timeout(self) -> float: ...
    @property
    def username(self) -> str | None: ...
    @property
    def password(self) -> str | None: ...
    @property
    def ca_cert(self) -> str | Path | None: ...
    @property
    def cert(self) -> str | Path | None: ...
    @property
    def key(self) -> str | Path | None: ...
    @property
    def grpc_naming_prefix(self) -> str | None: ...


class RegistryError(Exception):
    """Base of the registry's errors."""


class EtcdUnavailable(RegistryError):
    """A call to etcd failed or did not answer in time (the message says which)."""


class LeaseLost(RegistryError):
    """The lease no longer exists: every key on it is gone."""


# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    lease: int = 0
    #: the revision of the last change of this key (of the delete, in a delete event)
    mod_revision: int = 0


@dataclass(frozen=True)
class WatchBatch:
    """One watch response: the events of one revision range, in order."""

    revision: int
    events: tuple[tuple[Literal["put", "delete"], KeyValue], ...] = ()
    #: the watch was cancelled by etcd (compaction, or a restart of the stream is needed)
    restart: bool = False
    #: etcd's answer to the watch's creation: from here on the watch is in place
    created: bool = False


def parse_endpoint(url: str) -> tuple[str, int, bool]:
    """`http://h:p`, `https://h:p`, `h:p` or `h` -> (host, port, tls)."""
    tls = url.startswith("https://")
    rest = url.split("://", 1)[1] if "://" in url else url
    rest = rest.rstrip("/")
    if rest.startswith("["):  # [v6]:port
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host, port = rest, ""
    try:
        return host, int(port) if port else DEFAULT_ETCD_PORT, tls
    except ValueError:
        raise ValueError(f"bad etcd endpoint {url!r}: the port is not a number") from None


#: gRPC channel options added to etcd3aio's own. gRPC shares subchannels (connections)
#: between channels to the same address by default, with their reconnect backoff (up to
#: 120 s): a new client right after an etcd restart would then fail at once with the old
#: "connection refused". A private pool per client, and a short backoff cap, make a
#: reconnect a real, prompt connection attempt.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def _tune_channel(client: etcd3aio.Etcd3Client) -> None:
    # etcd3aio 0.3 takes no channel options; its ConnectionManager keeps them in a list
    # that connect() reads (checked by tests/test_registry.py::test_channel_options_apply)
    manager = getattr(client, "_manager", None)
    options = getattr(manager, "grpc_options", None)
    if isinstance(options, list):
        options.extend(CHANNEL_OPTIONS)
    else:
        log.warning("etcd3aio changed: cannot set gRPC channel options; reconnects may lag")


def _read_file(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


class EtcdClient:
    """The few etcd calls svcd needs, each bounded by `timeout`, errors made ours.

    Every method raises `EtcdUnavailable` (or `LeaseLost`) instead of a library or gRPC
    error. `connect()` resolves the endpoints (etcd3aio dials `ipv4:` targets), opens
    the channel and, with a username, logs in and keeps the token fresh. `close()` is
    idempotent. Cancellation of any call cancels the RPC.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 5.0,
        username: str | None = None,
        password: str | None = None,
        ca_cert: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = tuple(endpoints)
        self.timeout = timeout
        self._username = username
        self._password = password or ""
        self._ca_cert = ca_cert
        self._cert = cert
        self._key = key
        self._client: etcd3aio.Etcd3Client | None = None
        self._token_task: asyncio.Task[None] | None = None

    @property
    def _c(self) -> etcd3aio.Etcd3Client:
        if self._client is None:
            raise EtcdUnavailable("not connected")
        return self._client

    async def connect(self) -> None:
        """Open the channel (and log in). Raises EtcdUnavailable; closes itself on error."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._connect()
        except BaseException as exc:
            await self.close()
            if isinstance(exc, TimeoutError):
                raise EtcdUnavailable(
                    f"connect to {','.join(self.endpoints)}: no answer in {self.timeout}s"
                ) from None
            if isinstance(exc, (OSError, ValueError)):
                raise EtcdUnavailable(f"connect to {','.join(self.endpoints)}: {exc}") from exc
            raise

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        targets: list[str] = []
        names: set[str] = set()
        tls = False
        for url in self.endpoints:
            host, port, url_tls = parse_endpoint(url)
            tls = tls or url_tls
            if ":" in host:  # an IPv6 literal: say so, not "address family not supported"
                raise ValueError(f"IPv6 etcd endpoints ([{host}]) are not supported "
                                 "(the etcd client speaks IPv4)")
            try:
                ipaddress.IPv4Address(host)
                targets.append(f"{host}:{port}")
                continue
            except ValueError:
                pass
            names.add(host)
            infos = await loop.getaddrinfo(
                host, port, family=socket.AF_INET, type=socket.SOCK_STREAM
            )
            targets.extend(f"{info[4][0]}:{port}" for info in infos)
        ca = _read_file(self._ca_cert)
        if ca is None and (tls or self._cert is not None):
            ca = _read_file(ssl.get_default_verify_paths().cafile)
        tls_on = ca is not None
        client = etcd3aio.Etcd3Client(
            list(dict.fromkeys(targets)),
            rpc_max_attempts=1,  # the caller retries (reconnect with backoff)
            # a certificate names hosts; when the endpoints were host names, verify those
            tls_server_name=sorted(names)[0] if names and tls_on else None,
            ca_cert=ca,
            cert_key=_read_file(self._key) if tls_on else None,
            cert_chain=_read_file(self._cert) if tls_on else None,
        )
        _tune_channel(client)
        self._client = client
        await client.connect()
        if self._username:
            await self._login()
            self._token_task = asyncio.create_task(self._refresh_token(), name="etcd-token")

    async def _login(self) -> None:
        assert self._username is not None
        auth = self._c.auth
        assert auth is not None
        resp = await self._call(
            "authenticate", auth.authenticate(self._username, self._password, timeout=self.timeout)
        )
        self._c.set_token(resp.token)

    async def _refresh_token(self) -> None:
        while True:
            await asyncio.sleep(TOKEN_REFRESH)
            try:
                await self._login()
            except EtcdUnavailable as exc:
                # calls fail with UNAUTHENTICATED later and the owner reconnects
                log.warning("etcd: refreshing the auth token failed: %s", exc)

    async def close(self) -> None:
        task, self._token_task = self._token_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timeout):
                    await client.close()

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await call
        except TimeoutError:
            raise EtcdUnavailable(f"{what}: no answer from etcd in {self.timeout}s") from None
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            if exc.code() == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
                raise LeaseLost(f"{what}: {details}") from None
            raise EtcdUnavailable(f"{what}: {exc.code().name} {details}".rstrip()) from None
        except etcd3aio.EtcdError as exc:
            raise EtcdUnavailable(f"{what}: {exc}") from None

    # -- leases

    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: (id, granted ttl)."""
        lease = self._c.lease
        assert lease is not None
        resp = await self._call("lease grant", lease.grant(ttl, timeout=self.timeout))
        return int(resp.ID), int(resp.TTL)

    async def keepalive(self, lease_id: int) -> int:
        """Refresh the lease once; returns the TTL etcd answered (<= 0: lease gone)."""
        lease = self._c.lease
        assert lease is not None
        stream = lease.keep_alive(lease_id)

        async def first() -> int:
            async for resp in stream:
                return int(resp.TTL)
            raise EtcdUnavailable("lease keepalive: the stream ended without an answer")

        try:
            return await self._call("lease keepalive", first())
        finally:
            stream.cancel()

    async def revoke(self, lease_id: int) -> None:
        lease = self._c.lease
        assert lease is not None
        with contextlib.suppress(LeaseLost):
            await self._call("lease revoke", lease.revoke(lease_id, timeout=self.timeout))

    # -- keys

    async def create_if_absent(self, key: str, value: bytes, lease: int) -> int:
        """Put `key` only if it does not exist. Returns 0 if created, else the lease
        id holding the existing key (which may be `lease` itself)."""
        kv = self._c.kv
        assert kv is not None
        resp = await self._call(
            "create " + key,
            kv.txn(
                compare=[kv.txn_compare_create_revision(key, 0)],
                success=[kv.txn_op_put(key, value, lease=lease)],
                failure=[kv.txn_op_get(key)],
                timeout=self.timeout,
            ),
        )
        if resp.succeeded:
            return 0
        kvs = resp.responses[0].response_range.kvs
        return int(kvs[0].lease) if kvs else -1

    async def apply(self, puts: Mapping[str, bytes], deletes: Iterable[str], lease: int) -> None:
        """One transaction: put every key of `puts` on `lease`, delete `deletes`."""
        kv = self._c.kv
        assert kv is not None
        ops = [kv.txn_op_put(k, v, lease=lease) for k, v in puts.items()]
        ops.extend(kv.txn_op_delete(k) for k in deletes)
        await self._call("txn", kv.txn(compare=[], success=ops, timeout=self.timeout))

    async def get(self, key: str) -> KeyValue | None:
        kv = self._c.kv
        assert kv is not None
        resp = await self._call("get " + key, kv.get(key, timeout=self.timeout))
        if not resp.kvs:
            return None
        item = resp.kvs[0]
        return KeyValue(item.key.decode(), bytes(item.value), int(item.lease))

    async def get_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """Every key under `prefix` and the revision they were read at."""
        kv = self._c.kv
        assert kv is not None
        resp = await self._call(
            "get " + prefix,
            kv.get(prefix, etcd3aio.prefix_range_end(prefix), timeout=self.timeout),
        )
        items = [
            KeyValue(i.key.decode(), bytes(i.value), int(i.lease), int(i.mod_revision))
            for i in resp.kvs
        ]
        return int(resp.header.revision), items

    async def delete_prefix(self, prefix: str) -> None:
        kv = self._c.kv
        assert kv is not None
        await self._call(
            "delete " + prefix,
            kv.delete(prefix, etcd3aio.prefix_range_end(prefix), timeout=self.timeout),
        )

    async def watch_prefix(
        self, prefix: str, start_revision: int
    ) -> AsyncGenerator[WatchBatch, None]:
        """Changes under `prefix` from `start_revision` on (0: from now).

        The first batch is etcd's answer to the creation (`created=True`, no events).
        The stream reconnects by itself after transient errors (raises EtcdUnavailable
        on others). It yields a batch with `restart=True` (and stops) when the caller
        must read again and watch anew: the stream was re-established after the
        creation was answered (events may have been missed), etcd cancelled the watch
        (compaction), or the revision went backwards (the data was wiped).

        A re-establishment before the first answer is invisible here (that answer is
        then the new stream's) and the new stream starts at `start_revision`: of a
        wiped cluster, that skips every change below it. A cache must therefore watch
        from 0 and read only after the `created` batch (agent.discovery does), so that
        such a stream watches the cluster it reads.
        """
        watch = self._c.watch
        assert watch is not None
        last = start_revision - 1
        created = False
        stream = watch.watch(
            prefix, etcd3aio.prefix_range_end(prefix), start_revision=start_revision
        )
        try:
            async for resp in stream:
                revision = int(resp.header.revision)
                # a second "created": etcd3aio re-established the stream after an error.
                # Whatever happened meanwhile (a wiped cluster whose revisions restarted
                # below ours, a compaction), only a fresh read is sure to be complete.
                again = resp.created and created
                created = created or resp.created
                if again or resp.canceled or resp.compact_revision > 0 or 0 < revision < last:
                    yield WatchBatch(revision, restart=True)
                    return
                events: list[tuple[Literal["put", "delete"], KeyValue]] = []
                for ev in resp.events:
                    item = KeyValue(
                        ev.kv.key.decode(),
                        bytes(ev.kv.value),
                        int(ev.kv.lease),
                        int(ev.kv.mod_revision),
                    )
                    events.append(("delete" if ev.type == 1 else "put", item))
                last = max(last, revision)
                yield WatchBatch(revision, tuple(events), created=bool(resp.created))
        except grpc.aio.AioRpcError as exc:  # not transient (those are retried inside)
            raise EtcdUnavailable(f"watch {prefix}: {exc.code().name} {exc.details()}") from None
        finally:
            await cast(AsyncGenerator[Any, None], stream).aclose()  # cancels the stream


# --------------------------------------------------------------------------- keys


def primary_address() -> str:
    """The host's primary IPv4 address (source of the default route), else a best guess.

    Blocking (may consult the resolver): call it off the event loop, once.
    """
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(_PRIMARY_PROBE)  # UDP: sets the route, sends nothing
        addr = str(s.getsockname()[0])
        if addr and addr != "0.0.0.0":
            return addr
    with contextlib.suppress(OSError):
        return socket.gethostbyname(socket.gethostname())
    return "127.0.0.1"


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tcp_listen(listen: Sequence[str]) -> tuple[str, int] | None:
    """The first TCP listen address (`tcp://h:p`, `h:p`) as (host, port)."""
    for item in listen:
        scheme, sep, rest = item.partition("://")
        if not sep:
            scheme, rest = "tcp", item
        if scheme == "unix" or rest.startswith(("/", "@")) or not rest:
            continue
        with contextlib.suppress(ValueError):
            host, port, _ = parse_endpoint(rest)
            return host, port
    return None


def service_addr(status: ServiceStatus, host_address: str) -> str:
    """`advertise` if set (a bare host gets the listen port), else the first TCP listen
    address with a wildcard host replaced by `host_address`; "" when there is none."""
    listen = _tcp_listen(status.listen)
    if status.advertise:
        adv = status.advertise
        if (adv.startswith("[") and "]:" in adv) or adv.count(":") == 1:
            return adv
        return _join_host_port(adv, listen[1]) if listen else adv
    if listen is None:
        return ""
    host, port = listen
    return _join_host_port(host_address if host in WILDCARD_HOSTS else host, port)


def _dumps(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=False).encode()


def agent_value(agent: str, version: str, started_at: float, control: str) -> bytes:
    return _dumps(
        {"agent": agent, "version": version, "started_at": started_at, "control": control}
    )


def has_key(w: WorkerStatus) -> bool:
    """Whether worker `w` is registered (SPEC.md: from its start until it stops for good)."""
    return not w.leaving and w.state in REGISTERED_STATES


def worker_key(prefix: str, service: str, agent: str, w: WorkerStatus) -> str:
    """`{prefix}/services/{service}/{agent}/{index}-{generation}`."""
    return f"{prefix}/services/{service}/{agent}/{w.index}-{w.generation}"


#: A registered worker slot: (service, index, generation).
_Slot = tuple[str, int, int]


def _rotation(services: Sequence[ServiceStatus]) -> dict[_Slot, tuple[bool, bool]]:
    """(ready as the key shows it, health failing) of every registered worker."""
    return {
        (svc.name, w.index, w.generation): (
            w.ready and w.state == "running",
            w.health == "failing",
        )
        for svc in services
        for w in svc.workers
        if has_key(w)
    }


def _left_rotation(
    before: Mapping[_Slot, tuple[bool, bool]], after: Mapping[_Slot, tuple[bool, bool]]
) -> bool:
    """Whether a worker registered in both turned not ready, or its health failing."""
    for slot, (ready, failing) in after.items():
        old = before.get(slot)
        if old is not None and ((old[0] and not ready) or (failing and not old[1])):
            return True
    return False


def desired_keys(
    services: Sequence[ServiceStatus],
    *,
    agent: str,
    prefix: str,
    host_address: str,
    grpc_naming_prefix: str | None = None,
) -> dict[str, bytes]:
    """Every worker key (and gRPC naming key) that should exist for `services`.

    A slot keeps its key through restarts in place (crash, health failure, max_memory,
    watchdog, ready timeout): while starting, running, stopping to be replaced, or in
    backoff, with its real state, health, and `ready` false unless running and ready.
    A slot that is leaving (stopping for good: see `WorkerStatus.leaving`) or FATAL has
    no key: a worker that stops for good is deregistered as soon as it starts stopping,
    before it is signalled, so that clients stop sending to it first.
    gRPC naming keys list only addrs with a worker that is ready and not failing.
    """
    out: dict[str, bytes] = {}
    for svc in services:
        addr = service_addr(svc, host_address)
        meta = _dumps(dict(svc.meta))
        usable = False
        for w in svc.workers:
            if not has_key(w):
                continue
            key = worker_key(prefix, svc.name, agent, w)
            ready = w.ready and w.state == "running"
            out[key] = _worker_value(
                svc.name,
                agent,
                w.worker,
                addr,
                w.pid,
                w.state,
                ready,
                w.health,
                w.generation,
                w.started_at,
                meta,
            )
            usable = usable or (ready and w.health != "failing")
        if grpc_naming_prefix and addr and usable:
            # workers behind one listen address share it: one naming key per addr
            out[f"{grpc_naming_prefix}{svc.name}/{addr}"] = _dumps(
                {"Op": 0, "Addr": addr, "Metadata": dict(svc.meta)}
            )
    return out


@functools.lru_cache(maxsize=VALUE_CACHE_SIZE)
def _worker_value(
    service: str,
    agent: str,
    worker: str,
    addr: str,
    pid: int,
    state: str,
    ready: bool,
    health: str,
    generation: int,
    started_at: float,
    meta: bytes,
) -> bytes:
    # memoized: every reconcile recomputes all keys, but few values change between two
    return _dumps(
        {
            "service": service,
            "agent": agent,
            "worker": worker,
            "addr": addr,
            "pid": pid,
            "state": state,
            "ready": ready,
            "health": health,
            "generation": generation,
            "started_at": started_at,
            "meta": json.loads(meta),
        }
    )


# --------------------------------------------------------------------------- registry


class _Backoff:
    def __init__(self) -> None:
        self._next = RECONNECT_INITIAL

    def reset(self) -> None:
        self._next = RECONNECT_INITIAL

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, RECONNECT_MAX)
        return delay * (1 + random.uniform(-RECONNECT_JITTER, RECONNECT_JITTER))


class _NameTaken(RegistryError):
    pass


@dataclass
class _SyncWaiter:
    generation: int
    future: asyncio.Future[None] = field(repr=False)


class Registry:
    """This agent's presence in etcd. See the module docstring for the invariants.

    Use: `tg.create_task(reg.run())`, then `reg.publish(sup.status())` whenever
    something changed; `await reg.close()` at shutdown.
    """

    def __init__(
        self,
        settings: RegistrySettingsLike,
        agent_name: str,
        control: str,
        events: EventBus,
        version: str,
    ) -> None:
        if not settings.endpoints:
            raise ValueError("registry: no etcd endpoints")
        self._settings = settings
        self._agent = agent_name
        self._control = control
        self._events = events
        self._version = version
        self._prefix = settings.prefix.rstrip("/")
        self._naming = settings.grpc_naming_prefix or None
        self._ttl = max(1, math.ceil(settings.ttl))
        self._started_at = time.time()
        self._agent_key = f"{self._prefix}/agents/{agent_name}"

        self._services: tuple[ServiceStatus, ...] = ()
        self._generation = 0  # bumped by every publish()
        # snapshots that must be written before anything newer (see publish())
        self._kept: collections.deque[tuple[int, tuple[ServiceStatus, ...]]] = (
            collections.deque(maxlen=MAX_KEPT_SNAPSHOTS)
        )
        self._rotation: dict[_Slot, tuple[bool, bool]] = {}
        self._synced_generation = -1
        self._sync_waiters: list[_SyncWaiter] = []
        self._wake = asyncio.Event()
        self._host_address: str | None = None

        self._state: RegistryState = "disconnected"
        self._announced: RegistryState | None = None
        self._client: EtcdClient | None = None
        self._endpoint_index = 0
        self._lease = 0
        self._lease_ttl = self._ttl
        # what we believe etcd holds for our worker keys; None = unknown (rewrite/delete)
        self._remote: dict[str, bytes | None] = {}
        self._run_task: asyncio.Task[Any] | None = None
        self._closed = False
        self._clash_reported = False

    # -- public

    @property
    def state(self) -> RegistryState:
        return self._state

    @property
    def agent_name(self) -> str:
        return self._agent

    @property
    def lease_id(self) -> int:
        """The current lease (0: none). For diagnostics and tests."""
        return self._lease

    def publish(self, services: Sequence[ServiceStatus]) -> None:
        """Set the desired state (a full snapshot) and wake the reconcile loop.

        Never blocks, never raises; bursts are coalesced, except that a snapshot in
        which a registered worker leaves rotation (its health turns failing, or it turns
        not ready: stopping to be replaced, unready) is written as it is before anything
        newer. A worker replaced for its failing check stops and restarts within a few
        milliseconds; its key must show `"health":"failing"`, then stopping, on the way
        (SPEC.md: rewritten on every change of state/ready/health).
        """
        snapshot = tuple(services)
        self._services = snapshot
        self._generation += 1
        rotation = _rotation(snapshot)
        if _left_rotation(self._rotation, rotation):
            self._kept.append((self._generation, snapshot))
        self._rotation = rotation
        self._wake.set()

    async def wait_synced(self, within: float) -> bool:
        """Wait until etcd reflects the last `publish()`; False after `within` seconds
        (e.g. etcd unreachable). Lets a drain remove a key before SIGTERM."""
        if self._synced_generation >= self._generation:
            return True
        waiter = _SyncWaiter(self._generation, asyncio.get_running_loop().create_future())
        self._sync_waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), within)
            return True
        except TimeoutError:
            return False
        finally:
            with contextlib.suppress(ValueError):
                self._sync_waiters.remove(waiter)

    async def run(self) -> None:
        """Keep this agent registered until cancelled. Never raises on etcd trouble.

        Connects (rotating over the endpoints with backoff), takes or re-uses the lease,
        registers the agent, then reconciles keys until something fails, and starts
        over. Cancellation revokes the lease if etcd answers within REVOKE_TIMEOUT.
        """
        self._run_task = asyncio.current_task()
        backoff = _Backoff()
        try:
            while not self._closed:
                try:
                    await self._session(backoff)
                except LeaseLost as exc:
                    log.warning("registry: lease %x lost (%s); registering again", self._lease, exc)
                    self._forget_lease()
                    await self._drop_client()
                    continue  # a new lease at once: no backoff
                except _NameTaken:
                    pass  # reported already; retry after NAME_CLASH_RETRY
                except (EtcdUnavailable, OSError, ValueError) as exc:
                    log.debug("registry: session ended: %s", exc)
                    self._set_state("disconnected", f"etcd unreachable: {exc}")
                    self._endpoint_index += 1
                except Exception as exc:  # never let etcd trouble kill the agent
                    log.exception("registry: unexpected error")
                    self._set_state("disconnected", f"registry error: {exc!r}")
                    self._endpoint_index += 1
                await self._drop_client()
                delay = NAME_CLASH_RETRY if self._clash_reported else backoff.next()
                await asyncio.sleep(delay)
        finally:
            await self._shutdown()

    async def close(self) -> None:
        """Stop `run()` if it is running, revoke the lease (bounded), close the client."""
        self._closed = True
        task = self._run_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait({task}, timeout=REVOKE_TIMEOUT + self._settings.timeout)
        await self._shutdown()

    # -- session

    def _endpoint(self) -> str:
        endpoints = self._settings.endpoints
        return endpoints[self._endpoint_index % len(endpoints)]

    def _new_client(self, endpoints: Sequence[str]) -> EtcdClient:
        s = self._settings
        return EtcdClient(
            endpoints,
            timeout=s.timeout,
            username=s.username,
            password=s.password,
            ca_cert=s.ca_cert,
            cert=s.cert,
            key=s.key,
        )

    async def _session(self, backoff: _Backoff) -> None:
        if self._host_address is None:
            self._host_address = await asyncio.to_thread(primary_address)
        client = self._new_client([self._endpoint()])
        self._client = client
        await client.connect()
        if self._lease:
            ttl = await client.keepalive(self._lease)
            if ttl <= 0:
                log.warning("registry: lease %x expired while disconnected", self._lease)
                self._forget_lease()
        if not self._lease:
            self._lease, self._lease_ttl = await client.grant(self._ttl)
        await self._race(self._keepalive_loop(client, self._lease), self._serve(client, backoff))

    async def _race(self, *coros: Awaitable[None]) -> None:
        """Run coroutines together; the first to finish or fail ends them all."""
        tasks = [asyncio.ensure_future(c) for c in coros]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            t.result()  # re-raise the failure

    async def _keepalive_loop(self, client: EtcdClient, lease: int) -> None:
        # own task, awaiting nothing but the keepalive itself
        interval = max(KEEPALIVE_MIN_INTERVAL, self._lease_ttl / KEEPALIVES_PER_TTL)
        while True:
            await asyncio.sleep(interval)
            ttl = await client.keepalive(lease)
            if ttl <= 0:
                raise LeaseLost(f"keepalive answered TTL {ttl}")
            interval = max(KEEPALIVE_MIN_INTERVAL, ttl / KEEPALIVES_PER_TTL)

    async def _serve(self, client: EtcdClient, backoff: _Backoff) -> None:
        # after a (re)connect only the present counts: what changed meanwhile is history
        self._kept.clear()
        await self._register_agent(client)
        backoff.reset()
        self._set_state("connected", f"registered as {self._agent} at {self._endpoint()}")
        while True:
            self._wake.clear()
            await self._reconcile(client)
            await self._wake.wait()
            await asyncio.sleep(DEBOUNCE)  # let the rest of a burst arrive

    async def _register_agent(self, client: EtcdClient) -> None:
        value = agent_value(self._agent, self._version, self._started_at, self._control)
        holder = await client.create_if_absent(self._agent_key, value, self._lease)
        if holder not in (0, self._lease):
            if not self._clash_reported:
                self._clash_reported = True
                message = (
                    f"agent name {self._agent!r} is already registered in etcd "
                    f"({self._agent_key}, lease {holder:x}): another host uses this name, "
                    "or this agent's previous run has not expired yet; retrying"
                )
                log.debug("registry: %s", message)
                self._state = "disconnected"
                self._announced = "disconnected"
                self._events.emit(
                    "registry_disconnected", message=message, fields={"reason": "name_clash"}
                )
            raise _NameTaken(self._agent_key)
        if self._clash_reported:
            log.info("registry: agent name %r is free again", self._agent)
        self._clash_reported = False

    async def _reconcile(self, client: EtcdClient) -> None:
        """Write the kept snapshots in order, then the latest one."""
        while self._kept:
            generation, services = self._kept.popleft()
            if generation < self._generation:  # else it is the latest: written below
                await self._apply(client, generation, services)
        await self._apply(client, self._generation, self._services)

    async def _apply(
        self, client: EtcdClient, generation: int, services: Sequence[ServiceStatus]
    ) -> None:
        """Apply the difference between the keys `services` wants and what etcd holds."""
        assert self._host_address is not None
        desired = desired_keys(
            services,
            agent=self._agent,
            prefix=self._prefix,
            host_address=self._host_address,
            grpc_naming_prefix=self._naming,
        )
        puts = {k: v for k, v in desired.items() if self._remote.get(k, None) != v}
        deletes = [k for k in self._remote if k not in desired]
        # deletes first: a draining worker's key must go before anything else happens
        ops: list[tuple[str, bytes | None]] = [*((k, None) for k in deletes), *puts.items()]
        for start in range(0, len(ops), MAX_TXN_OPS):
            chunk = ops[start : start + MAX_TXN_OPS]
            chunk_puts = {k: v for k, v in chunk if v is not None}
            chunk_deletes = [k for k, v in chunk if v is None]
            try:
                await client.apply(chunk_puts, chunk_deletes, self._lease)
            except BaseException:
                for k, _ in chunk:
                    self._remote[k] = None  # may or may not have been applied
                raise
            for k, v in chunk:
                if v is None:
                    self._remote.pop(k, None)
                else:
                    self._remote[k] = v
        self._synced_generation = max(self._synced_generation, generation)
        for waiter in self._sync_waiters:
            if waiter.generation <= generation and not waiter.future.done():
                waiter.future.set_result(None)

    # -- state

    def _forget_lease(self) -> None:
        self._lease = 0
        self._remote.clear()  # the keys went with the lease

    def _set_state(self, state: RegistryState, message: str) -> None:
        self._state = state
        if self._announced == state:
            return
        self._announced = state
        # the event is the record (the daemon logs every event); debug here avoids twins
        log.debug("registry: %s", message)
        self._events.emit(f"registry_{state}", message=message)

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def _shutdown(self) -> None:
        """Revoke the lease (bounded: its keys expire within the TTL anyway) and close."""
        lease, self._lease = self._lease, 0
        self._remote.clear()
        if lease:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(REVOKE_TIMEOUT):
                    client = self._client
                    if client is None:
                        client = self._client = self._new_client([self._endpoint()])
                        await client.connect()
                    await client.revoke(lease)
                    log.info("registry: lease %x revoked", lease)
        await self._drop_client()
        self._state = "disconnected"
