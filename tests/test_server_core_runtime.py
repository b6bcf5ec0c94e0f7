"""server_core as a process: socket activation, sd_notify (READY, stats, watchdog,
STOPPING), the svcd-health fd, graceful drain under load, prefork (real children)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import free_port
from tests.test_server_core_support import (
    REPO,
    NotifyListener,
    connect,
    get,
    listening_socket,
    read_reply,
    spawn_activated,
    stop_process,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

PID_WORKER = """
import os, sys
from server_core import Worker

listen = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:0"
count = int(sys.argv[2]) if len(sys.argv) > 2 else 1
worker = Worker(listen, count=count, drain_grace=0.5)

@worker.on_message
def pid(conn, request):
    return str(os.getpid())

if os.environ.get("FAIL_START"):
    @worker.on_worker_start
    def boom(w):
        raise RuntimeError("cannot start")

worker.run()
"""


@pytest.fixture
def pid_worker(tmp_path: Path) -> Path:
    path = tmp_path / "pid_worker.py"
    path.write_text(PID_WORKER)
    return path


@pytest.fixture
def notify(tmp_path: Path) -> Any:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


async def http_get(port: int, path: str = "/") -> tuple[int, bytes]:
    async with connect(port) as (reader, writer):
        writer.write(get(path, "Connection: close\r\n"))
        reply = await read_reply(reader)
        return reply.status, reply.body


async def test_socket_activation_ready_stats_watchdog_health_and_stop(notify: Any) -> None:
    service, health = listening_socket(), listening_socket()
    service_port, health_port = service.getsockname()[1], health.getsockname()[1]
    proc = spawn_activated(
        ["examples/hello.py"],
        [("web", service), ("svcd-health", health)],
        notify_path=notify.path,
        env={"WATCHDOG_USEC": "300000", "SVCD_SERVICE": "web", "SVCD_WORKER": "0"},
    )
    try:
        await wait_for(lambda: notify.seen("READY=1"), timeout=20, what="READY=1")
        assert await http_get(service_port) == (200, b"hello")
        assert await http_get(health_port, "/healthz") == (200, b"ok\n")
        reported = len(notify.seen("X_SVCD_STATS="))

        def stats() -> dict[str, Any]:
            lines = notify.seen("X_SVCD_STATS=")
            if len(lines) <= reported:
                return {}  # a report from after both requests
            last: dict[str, Any] = json.loads(lines[-1].split("=", 1)[1])
            return last if last["requests"] >= 1 else {}

        last: dict[str, Any] = await wait_for(stats, timeout=10, what="stats with the request")
        # the svcd-health listener's request is the supervisor's probe, not traffic
        assert last["requests"] == 1
        assert set(last) >= {
            "connections", "requests", "send_fail", "timers", "bytes_in", "bytes_out", "metrics"
        }
        assert {
            "name": "hello_requests_total", "type": "counter",
            "labels": {"route": "hello"}, "value": 1,
        } in last["metrics"]
        await wait_for(lambda: len(notify.seen("WATCHDOG=1")) >= 2, what="watchdog pings")
        proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: proc.poll() is not None, timeout=15, what="exit after SIGTERM")
        assert proc.returncode == 0
        assert notify.seen("STOPPING=1")
        # our copy closed, never shut down: the socket still accepts for its other holders
        with socket.create_connection(("127.0.0.1", service_port), timeout=5):
            pass
    finally:
        stop_process(proc)
        service.close()
        health.close()


async def test_failing_on_worker_start_exits_nonzero_without_ready(
    notify: Any, pid_worker: Path
) -> None:
    sock = listening_socket()
    proc = spawn_activated(
        [str(pid_worker)], [("web", sock)], notify.path, env={"FAIL_START": "1"}
    )
    try:
        await wait_for(lambda: proc.poll() is not None, timeout=20, what="exit")
        assert proc.returncode == 1
        assert not notify.seen("READY=1")
    finally:
        stop_process(proc)
        sock.close()


class Load:
    """Keep-alive clients that keep sending; they reconnect on `Connection: close`."""

    def __init__(self, port: int, clients: int = 8, max_requests: int = 30000) -> None:
        self.port = port
        self.clients = clients
        self.max_requests = max_requests
        self.pids: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []
        self.done = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for _ in range(self.clients):
                group.create_task(self._client())

    async def _client(self) -> None:
        writer: asyncio.StreamWriter | None = None
        reader: asyncio.StreamReader | None = None
        try:
            while not self.stop.is_set() and self.done < self.max_requests:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                assert reader is not None
                try:
                    writer.write(get())
                    reply = await read_reply(reader)
                except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    self.errors.append(repr(exc))
                    writer.close()
                    writer = None
                    continue
                self.done += 1
                if reply.status != 200:
                    self.errors.append(f"status {reply.status}")
                self.pids[reply.body.decode()] += 1
                if reply.headers.get("connection") == "close":
                    writer.close()
                    writer = None
        finally:
            if writer is not None:
                writer.close()

    async def until(self, predicate: Any, what: str, limit: float = 30) -> None:
        await wait_for(lambda: predicate() or self.stop.is_set(), timeout=limit, what=what)


async def test_drain_under_load_loses_no_request(notify: Any, pid_worker: Path) -> None:
    """A SIGTERMed worker answers everything in flight while its peer takes over."""
    sock = listening_socket()
    port = sock.getsockname()[1]
    old = spawn_activated([str(pid_worker)], [("web", sock)], notify.path)
    new: subprocess.Popen[bytes] | None = None
    load = Load(port)
    try:
        await wait_for(lambda: len(notify.seen("READY=1")) == 1, timeout=20, what="old ready")
        clients = asyncio.create_task(load.run())
        await load.until(lambda: load.done >= 300, "load on the old worker")
        new = spawn_activated([str(pid_worker)], [("web", sock)], notify.path)
        await wait_for(lambda: len(notify.seen("READY=1")) == 2, timeout=20, what="new ready")
        old.send_signal(signal.SIGTERM)
        await load.until(lambda: old.poll() is not None, "old worker exits")
        served_at_exit = load.done
        await load.until(lambda: load.done >= served_at_exit + 500, "load on the new worker")
        load.stop.set()
        async with asyncio.timeout(30):
            await clients
        assert load.errors == []
        assert old.returncode == 0
        assert load.pids[str(old.pid)] > 0 and load.pids[str(new.pid)] > 0
    finally:
        load.stop.set()
        stop_process(old)
        if new is not None:
            stop_process(new)
        sock.close()


async def test_prefork_shares_one_socket_restarts_children_and_stops(pid_worker: Path) -> None:
    port = free_port()
    parent = subprocess.Popen(  # noqa: ASYNC220 - a short, non-blocking spawn
        [sys.executable, str(pid_worker), f"http://127.0.0.1:{port}", "2"],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    load = Load(port, clients=4)
    try:
        tree = psutil.Process(parent.pid)
        await wait_for(lambda: len(tree.children()) == 2, timeout=20, what="two children")

        async with asyncio.timeout(20):  # until the children accept
            while True:
                with contextlib.suppress(OSError):
                    if (await http_get(port))[0] == 200:
                        break
                await asyncio.sleep(0.05)
        first = {c.pid for c in tree.children()}
        clients = asyncio.create_task(load.run())
        await load.until(lambda: load.done >= 300, "load")
        victim = sorted(first)[0]
        psutil.Process(victim).send_signal(signal.SIGTERM)  # one child drains and exits

        def replaced() -> bool:
            now = {c.pid for c in tree.children() if c.status() != psutil.STATUS_ZOMBIE}
            return victim not in now and len(now) == 2

        await load.until(replaced, "the parent replaced the child")
        at_replace = load.done
        await load.until(lambda: load.done >= at_replace + 300, "load after the replacement")
        load.stop.set()
        async with asyncio.timeout(30):
            await clients
        assert load.errors == []
        children = [c for c in tree.children()]
        parent.send_signal(signal.SIGTERM)
        await wait_for(lambda: parent.poll() is not None, timeout=30, what="parent exits")
        assert parent.returncode == 0
        for child in children:
            assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        load.stop.set()
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(parent.pid).children():
                child.kill()
        stop_process(parent)
