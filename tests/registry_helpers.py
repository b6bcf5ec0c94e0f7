"""Helpers shared by the registry and discovery tests: settings, synthetic statuses, a
raw etcd reader, a registry running as a task."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, cast

from agent.registry import EtcdClient, Registry
from supervisor.events import Event, EventBus
from supervisor.status import ServiceStatus, WorkerStatus
from tests.waiting import wait_for

T = TypeVar("T")

CALL_TIMEOUT = 1.0
WATCH_CREATE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Settings:
    """Stand-in with the fields of agent.config.RegistrySettings."""

    endpoints: tuple[str, ...]
    embedded: bool = False
    prefix: str = "/svcd"
    ttl: float = 2
    timeout: float = CALL_TIMEOUT
    username: str | None = None
    password: str | None = None
    ca_cert: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None
    grpc_naming_prefix: str | None = None


def worker(
    service: str,
    index: int,
    *,
    state: str = "running",
    ready: bool = True,
    health: str = "passing",
    generation: int = 1,
    pid: int | None = None,
    leaving: bool = False,
) -> WorkerStatus:
    """A synthetic worker status; `leaving` = stopping (or stopped) for good."""
    return WorkerStatus(
        worker=f"{service}:{index}",
        index=index,
        pid=1000 + index if pid is None else pid,
        generation=generation,
        state=state,
        ready=ready,
        health=health,
        restarts=0,
        uptime_s=1.0,
        rss_bytes=0.0,
        cpu_percent=0.0,
        cpu_seconds=0.0,
        connections=0,
        requests=0,
        qps=0.0,
        started_at=1700000000.0 + index,
        leaving=leaving,
    )


def service(
    name: str,
    workers: Sequence[WorkerStatus],
    *,
    listen: Sequence[str] = ("tcp://127.0.0.1:8080",),
    advertise: str = "",
    meta: dict[str, str] | None = None,
) -> ServiceStatus:
    return ServiceStatus(
        name=name,
        state="running",
        desired=len(workers),
        ready=sum(w.ready for w in workers),
        generation=1,
        workers=tuple(workers),
        listen=tuple(listen),
        advertise=advertise,
        meta=meta or {},
    )


def with_worker(svc: ServiceStatus, index: int, **changes: Any) -> ServiceStatus:
    """`svc` with worker `index` changed."""
    workers = tuple(replace(w, **changes) if w.index == index else w for w in svc.workers)
    return replace(svc, workers=workers)


async def eventually(
    predicate: Callable[[], Awaitable[T | None]], within: float = 10.0, what: str = ""
) -> T:
    """`tests.waiting.wait_for` for an async predicate, typed."""
    return cast(T, await wait_for(cast(Callable[[], Any], predicate), within, what))


class Reader:
    """A plain etcd client for assertions (not the code under test's session)."""

    def __init__(self, client: EtcdClient) -> None:
        self.client = client

    async def keys(self, prefix: str) -> dict[str, dict[str, Any]]:
        _, items = await self.client.get_prefix(prefix)
        return {kv.key: json.loads(kv.value) for kv in items}

    async def at_least(self, prefix: str, n: int) -> dict[str, dict[str, Any]] | None:
        """The keys under `prefix` once there are at least `n` of them, else None."""
        keys = await self.keys(prefix)
        return keys if len(keys) >= n else None

    async def exactly(self, prefix: str, n: int) -> dict[str, dict[str, Any]] | None:
        keys = await self.keys(prefix)
        return keys if len(keys) == n else None

    async def value(self, key: str) -> dict[str, Any] | None:
        return (await self.keys(key)).get(key)

    async def leases(self, prefix: str) -> set[int]:
        _, items = await self.client.get_prefix(prefix)
        return {kv.lease for kv in items}


@contextlib.asynccontextmanager
async def reader(endpoint: str, **kwargs: Any) -> AsyncIterator[Reader]:
    client = EtcdClient([endpoint], timeout=kwargs.pop("timeout", 5.0), **kwargs)
    await client.connect()
    try:
        yield Reader(client)
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def running(
    settings: Settings, agent: str = "web-1", bus: EventBus | None = None
) -> AsyncIterator[Registry]:
    """A Registry whose run() is a task; closed (lease revoked) on exit."""
    reg = Registry(settings, agent, "/run/svcd/svcd.sock", bus or EventBus(), "0.1.0")
    task = asyncio.create_task(reg.run(), name=f"registry-{agent}")
    try:
        yield reg
    finally:
        await reg.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass(frozen=True)
class KeyChange:
    """One change of a key seen by a watch: a put (with its decoded value) or a delete."""

    kind: str  # "put" | "delete"
    key: str
    value: dict[str, Any] | None  # None for a delete


@contextlib.asynccontextmanager
async def watching(client: EtcdClient, prefix: str) -> AsyncIterator[list[KeyChange]]:
    """Every change under `prefix`, in order, appended to the yielded list from the
    moment etcd confirmed the watch (so nothing after the `async with` is missed)."""
    changes: list[KeyChange] = []
    created = asyncio.get_running_loop().create_future()

    async def follow() -> None:
        async for batch in client.watch_prefix(prefix, 0):
            if batch.restart:
                raise AssertionError("the test's watch was cancelled by etcd")
            if batch.created and not created.done():
                created.set_result(None)
            for kind, kv in batch.events:
                value = json.loads(kv.value) if kind == "put" else None
                changes.append(KeyChange(kind, kv.key, value))

    task = asyncio.create_task(follow(), name=f"watch {prefix}")
    try:
        await asyncio.wait({task, created}, timeout=WATCH_CREATE_TIMEOUT,
                           return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # the watch failed: say why
        if not created.done():
            raise TimeoutError(f"etcd did not confirm the watch of {prefix}")
        yield changes
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def event_types(bus: EventBus) -> list[str]:
    return [e.type for e in bus.history()]


def events_of(bus: EventBus, type_: str) -> list[Event]:
    return [e for e in bus.history() if e.type == type_]
