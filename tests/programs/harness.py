"""Helpers for the supervisor's process tests: specs of the test worker, HTTP client, load.

Everything talks to 127.0.0.1 only and is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from supervisor.events import Event, EventBus
from supervisor.spec import BackoffSpec, HealthSpec, ListenSpec, ServiceSpec
from supervisor.supervisor import Supervisor
from tests.conftest import free_port

WORKER = Path(__file__).with_name("http_worker.py")
#: Per-request bound of the test clients.
REQUEST_TIMEOUT = 5.0

FAST_BACKOFF = BackoffSpec(
    initial=0.0, first_delay=0.05, factor=2.0, max=1.0, jitter=0.0, stable_after=5.0,
    start_limit=50, fatal_retry=5.0,
)


def listen(port: int) -> ListenSpec:
    return ListenSpec(url=f"tcp://127.0.0.1:{port}", scheme="tcp", host="127.0.0.1", port=port)


def worker_spec(
    name: str = "web",
    *args: str,
    port: int | None = None,
    count: int = 1,
    health: HealthSpec | None = None,
    **changes: Any,
) -> ServiceSpec:
    """A spec running tests/programs/http_worker.py with `args` on 127.0.0.1:`port`."""
    spec = ServiceSpec(
        name=name,
        command=(sys.executable, str(WORKER), *args),
        count=count,
        listen=(listen(port if port is not None else free_port()),),
        graceful_timeout=5.0,
        ready_timeout=10.0,
        backoff=FAST_BACKOFF,
        health=health or HealthSpec(),
    )
    return dataclasses.replace(spec, **changes)


def port_of(spec: ServiceSpec) -> int:
    return spec.listen[0].port


async def http_get(port: int, path: str = "/") -> tuple[int, str]:
    """One request on a fresh connection: (status code, body)."""
    async with asyncio.timeout(REQUEST_TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, body.decode().strip()


class Load:
    """`concurrency` loops of sequential requests until stopped; counts the outcome."""

    def __init__(self, port: int, concurrency: int = 4) -> None:
        self.port = port
        self.concurrency = concurrency
        self.ok = 0
        self.failed = 0
        self.errors: list[str] = []
        self.pids: set[int] = set()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                status, body = await http_get(self.port)
                if status != 200:
                    raise ValueError(f"status {status}")
                self.pids.add(int(body))
                self.ok += 1
            except (OSError, ValueError, TimeoutError, IndexError) as exc:
                self.failed += 1
                if len(self.errors) < 20:
                    self.errors.append(repr(exc))
            await asyncio.sleep(0)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(self.concurrency)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def wait_requests(self, n: int, within: float = 10.0) -> None:
        """Wait until `n` more requests succeeded (the load really runs)."""
        target = self.ok + n
        deadline = time.monotonic() + within
        while self.ok < target:
            assert time.monotonic() < deadline, f"load: {self.ok} ok, errors {self.errors}"
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(tmp_path: Path, **kwargs: Any) -> AsyncIterator[Supervisor]:
    """A started Supervisor logging under tmp_path; closed (every worker reaped) after."""
    sup = Supervisor(EventBus(), tmp_path / "logs", notify_dir=tmp_path / "n", **kwargs)
    await sup.start()
    try:
        yield sup
    finally:
        await sup.close()
        await sup.close_reaper()


def events_of(bus: EventBus, type_: str, worker: str | None = None) -> list[Event]:
    return [
        e for e in bus.history()
        if e.type == type_ and (worker is None or e.worker == worker)
    ]
