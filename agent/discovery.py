"""Discovery: the usable endpoints of a service across every host, read from etcd.

Responsibility: turn the worker keys the agents' registries write
(`{prefix}/services/{service}/{agent}/{index}-{generation}`, SPEC.md) into endpoints a
client can dial. This is what `svctl discover` prints and what gateways and clients
embed (`DiscoveryClient`: a watch-backed cache).

Invariants:
- An endpoint is one `addr` (host:port). Workers are grouped by addr across agents (the
  workers of one service on one host share their listen address); an endpoint is
  usable when at least one of its workers is ready and not failing. Only usable
  endpoints are returned; `workers` counts its usable workers.
- The cache opens a watch from "now", waits for etcd to confirm it, and only then reads
  everything; watch events the read already contains (mod revision <= the read's) are
  skipped. Watching before reading is what makes a wiped etcd (revisions restart from
  1) safe: a stream that etcd3aio re-opened silently before its creation was confirmed
  watches the cluster the read then sees, and any later re-opening, a cancel
  (compaction) or a revision going backwards makes the cache read everything again.
  While etcd is unreachable the cache keeps its last view.
- Reads the agents' own keys only; never writes. No supervisor/ import (svctl uses it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.registry import EtcdClient, EtcdUnavailable, KeyValue, RegistryError

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/svcd"
DEFAULT_TIMEOUT = 5.0
#: Pacing of the cache's re-read after an error (etcd3aio already retries the watch
#: stream itself on transient errors).
RETRY_INITIAL = 0.2
RETRY_MAX = 5.0
EXIT_OK = 0
EXIT_FAILED = 1


@dataclass(frozen=True)
class WorkerRecord:
    """One worker key's value (SPEC.md), as read back from etcd."""

    key: str
    service: str
    agent: str
    worker: str
    addr: str
    pid: int
    state: str
    ready: bool
    health: str
    generation: int
    started_at: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        """Ready and not failing, with an address to dial."""
        return bool(self.addr) and self.ready and self.health != "failing"

    @classmethod
    def parse(cls, key: str, value: bytes) -> WorkerRecord | None:
        """The record in `value`, or None (logged) when it is not a worker value."""
        try:
            d = json.loads(value)
            return cls(
                key=key,
                service=str(d["service"]),
                agent=str(d["agent"]),
                worker=str(d["worker"]),
                addr=str(d["addr"]),
                pid=int(d["pid"]),
                state=str(d["state"]),
                ready=bool(d["ready"]),
                health=str(d["health"]),
                generation=int(d["generation"]),
                started_at=float(d["started_at"]),
                meta=dict(d.get("meta") or {}),
            )
        # anyone with write access to etcd writes these: deep nesting (RecursionError) and
        # huge or infinite numbers (OverflowError) must not crash a reader either
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            log.debug("discovery: ignoring %s: %s", key, exc)
            return None


@dataclass(frozen=True, order=True)
class Endpoint:
    """One dialable address of a service (SPEC: `svctl discover --json` entries)."""

    addr: str
    agent: str
    workers: int
    health: str  # "passing" if a usable worker passes its check, else "unknown"

    def as_dict(self) -> dict[str, Any]:
        return {
            "addr": self.addr,
            "agent": self.agent,
            "workers": self.workers,
            "health": self.health,
        }


def endpoints_from(records: Iterable[WorkerRecord]) -> list[Endpoint]:
    """Group usable workers by addr; sorted by addr."""
    by_addr: dict[str, list[WorkerRecord]] = {}
    for rec in records:
        if rec.usable:
            by_addr.setdefault(rec.addr, []).append(rec)
    out = []
    for addr, recs in sorted(by_addr.items()):
        agents = ",".join(sorted({r.agent for r in recs}))
        health = "passing" if any(r.health == "passing" for r in recs) else "unknown"
        out.append(Endpoint(addr, agents, len(recs), health))
    return out


def service_prefix(prefix: str, service: str) -> str:
    """The key prefix of every worker of `service` (trailing "/": `api` is not `api2`)."""
    return f"{prefix.rstrip('/')}/services/{service}/"


@dataclass(frozen=True)
class EtcdAccess:
    """How to reach etcd: endpoints (URLs) plus optional TLS and user/password."""

    endpoints: tuple[str, ...]
    prefix: str = DEFAULT_PREFIX
    timeout: float = DEFAULT_TIMEOUT
    username: str | None = None
    password: str | None = None
    ca_cert: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None

    def client(self) -> EtcdClient:
        return EtcdClient(
            self.endpoints,
            timeout=self.timeout,
            username=self.username,
            password=self.password,
            ca_cert=self.ca_cert,
            cert=self.cert,
            key=self.key,
        )


async def discover(access: EtcdAccess, service: str) -> list[Endpoint]:
    """One read: the usable endpoints of `service` now. Raises EtcdUnavailable."""
    client = access.client()
    await client.connect()
    try:
        _, items = await client.get_prefix(service_prefix(access.prefix, service))
    finally:
        await client.close()
    return endpoints_from(_records(items).values())


def _records(items: Iterable[KeyValue]) -> dict[str, WorkerRecord]:
    out = {}
    for kv in items:
        rec = WorkerRecord.parse(kv.key, kv.value)
        if rec is not None:
            out[kv.key] = rec
    return out


class _ServiceView:
    """The cached endpoints of one service, kept current by one watcher task."""

    def __init__(self) -> None:
        self.records: dict[str, WorkerRecord] = {}
        self.endpoints: list[Endpoint] = []
        self.loaded = asyncio.Event()
        self.changed = asyncio.Event()  # replaced after every change: wait on a copy
        self.error: str = ""
        self.task: asyncio.Task[None] | None = None

    def update(self) -> None:
        endpoints = endpoints_from(self.records.values())
        if endpoints != self.endpoints or not self.loaded.is_set():
            self.endpoints = endpoints
            changed, self.changed = self.changed, asyncio.Event()
            changed.set()
        self.loaded.set()


class DiscoveryClient:
    """A watch-backed cache of the usable endpoints of services.

        async with DiscoveryClient(EtcdAccess(("http://127.0.0.1:2379",))) as dc:
            eps = await dc.endpoints("api")            # first call reads and starts a watch
            async for eps in dc.watch("api"): ...       # current list, then every change

    `endpoints()` raises EtcdUnavailable only if the first read of a service fails;
    later it answers from the cache (the last view while etcd is unreachable).
    """

    def __init__(self, access: EtcdAccess) -> None:
        self._access = access
        self._client: EtcdClient | None = None
        self._views: dict[str, _ServiceView] = {}

    async def __aenter__(self) -> DiscoveryClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the connection. Raises EtcdUnavailable."""
        if self._client is None:
            client = self._access.client()
            await client.connect()
            self._client = client

    async def close(self) -> None:
        """Stop every watcher and close the connection (idempotent)."""
        views, self._views = self._views, {}
        tasks = [v.task for v in views.values() if v.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def endpoints(self, service: str) -> list[Endpoint]:
        view = await self._view(service)
        return list(view.endpoints)

    async def watch(self, service: str) -> AsyncIterator[list[Endpoint]]:
        """The current usable endpoints, then the new list after every change."""
        view = await self._view(service)
        last: list[Endpoint] | None = None
        while True:
            changed = view.changed
            if view.endpoints != last:
                last = list(view.endpoints)
                yield last
            await changed.wait()

    async def _view(self, service: str) -> _ServiceView:
        await self.connect()
        view = self._views.get(service)
        if view is None:
            view = self._views[service] = _ServiceView()
            view.task = asyncio.create_task(self._follow(service, view), name=f"discover-{service}")
        try:
            async with asyncio.timeout(self._access.timeout):
                await view.loaded.wait()
        except TimeoutError:
            raise EtcdUnavailable(f"discover {service}: {view.error or 'no answer'}") from None
        return view

    async def _follow(self, service: str, view: _ServiceView) -> None:
        """Watch, read all, follow; again after a restart signal or an error. Runs until
        cancelled (close); nothing but cancellation ends it, so the cache never silently
        stops following."""
        assert self._client is not None
        client = self._client
        prefix = service_prefix(self._access.prefix, service)
        delay = RETRY_INITIAL
        while True:
            try:
                if await self._sync(client, prefix, service, view):
                    delay = RETRY_INITIAL
                    continue
                # the watch ended before the read: paced like an error, so an etcd that
                # keeps ending streams is not asked again in a tight loop
            except RegistryError as exc:  # EtcdUnavailable, and LeaseLost should it appear
                view.error = str(exc)
                log.warning("discovery: %s: %s", service, exc)
            except Exception as exc:  # a library surprise must not freeze the cache
                view.error = f"{type(exc).__name__}: {exc}"
                log.exception("discovery: %s: unexpected error; reading again", service)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, RETRY_MAX)

    async def _sync(
        self, client: EtcdClient, prefix: str, service: str, view: _ServiceView
    ) -> bool:
        """One watch: open it, read all once etcd confirmed it, apply its changes.

        Returns when the watch asks for a fresh read or ends: True if the read was done
        (the view was refreshed), else False. Raises EtcdUnavailable."""
        watch = client.watch_prefix(prefix, 0)
        async with contextlib.aclosing(watch):
            try:
                async with asyncio.timeout(self._access.timeout):
                    first = await anext(watch, None)
            except TimeoutError:
                raise EtcdUnavailable(
                    f"watch {prefix}: not confirmed by etcd in {self._access.timeout}s"
                ) from None
            if first is None or first.restart:
                return False
            # read after the watch is in place: whatever the read misses, the watch has
            revision, items = await client.get_prefix(prefix)
            if revision < first.revision:
                # the cluster's revision went backwards between the two: wiped; the
                # stream re-opens too, but do not wait for it to say so
                log.info("discovery: %s: etcd's revision went backwards; reading again", service)
                return False
            view.records = _records(items)
            view.error = ""
            view.update()
            async for batch in watch:
                if batch.restart:
                    log.info("discovery: %s: watch restarted by etcd; reading again", service)
                    return True
                for kind, kv in batch.events:
                    if kv.mod_revision <= revision:
                        continue  # already in the read
                    rec = WorkerRecord.parse(kv.key, kv.value) if kind == "put" else None
                    if rec is None:
                        view.records.pop(kv.key, None)
                    else:
                        view.records[kv.key] = rec
                view.update()
        return True


# ----------------------------------------------------------------- svctl discover


def discover_json(service: str, endpoints: Sequence[Endpoint]) -> str:
    """SPEC: `{"service": "api", "endpoints": [{"addr", "agent", "workers", "health"}]}`."""
    return json.dumps({"service": service, "endpoints": [e.as_dict() for e in endpoints]})


def discover_table(service: str, endpoints: Sequence[Endpoint]) -> str:
    """A plain text table (one row per endpoint), or a line saying there is none."""
    if not endpoints:
        return f"{service}: no usable endpoints"
    rows = [("ADDR", "AGENT", "WORKERS", "HEALTH")]
    rows += [(e.addr, e.agent, str(e.workers), e.health) for e in endpoints]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


async def discover_main(
    access: EtcdAccess,
    service: str,
    *,
    watch: bool = False,
    as_json: bool = False,
    write: Callable[[str], None] = print,
    error: Callable[[str], None] = print,
) -> int:
    """`svctl discover SERVICE [--watch] [--json]`: print, return the exit code.

    0 after printing (an empty list included), 1 when etcd cannot be read. With
    `watch`, prints the current list and then every change until cancelled.
    """

    def show(endpoints: Sequence[Endpoint]) -> None:
        write(discover_json(service, endpoints) if as_json else discover_table(service, endpoints))

    try:
        if not watch:
            show(await discover(access, service))
            return EXIT_OK
        async with DiscoveryClient(access) as dc:
            async for endpoints in dc.watch(service):
                show(endpoints)
    except EtcdUnavailable as exc:
        error(f"svctl discover: cannot read etcd at {','.join(access.endpoints)}: {exc}")
        return EXIT_FAILED
    return EXIT_OK  # pragma: no cover - the watch ends only by cancellation
