"""The Worker API: what an application writes, Workerman style.

    worker = Worker("http://0.0.0.0:8080")

    @worker.on_message
    async def hello(conn, request):
        return "hello"

    worker.every(5.0, report)
    worker.run()

Callbacks are registered with decorators and may be plain functions or coroutine
functions (detected once, at start). Async handlers run eagerly: up to their first
real suspension they run inside the protocol callback, without a task (so
`asyncio.current_task()` is None there); a handler that never waits costs no task.

- `on_worker_start(worker)` / `on_worker_stop(worker)`: around serving; READY=1 goes
  to the supervisor only after on_worker_start has finished.
- `on_connect(conn)`, `on_close(conn)`: once per connection (ws://: after the handshake).
- `on_message(conn, message)`: an HTTP `Request`, a WebSocket str/bytes message, a text
  line, a frame's bytes or a TCP chunk. Return the answer, or `conn.send()` it; for
  HTTP a request stays unanswered (and later pipelined ones wait) until one of the two.
- `on_http(conn, request)` (ws:// only): plain HTTP requests that are not an upgrade,
  e.g. `/healthz` (without it they get 426).
- `on_error(conn, exc)`: a handler raised, or the peer broke the protocol.
- `on_buffer_full(conn)` / `on_buffer_drain(conn)`: the send buffer passed
  `max_send_buffer` / went back under it.

`serve()` is the async core (usable in an existing loop, e.g. tests); `run()` is the
process entry that adds socket activation, sd_notify, signals and prefork (runtime.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable, Sequence, Set
from typing import Any, TypeVar

from server_core import runtime
from server_core.address import ListenAddress, bind, parse_address
from server_core.connection import Connection
from server_core.notify import Notifier
from server_core.server import Server
from server_core.stats import Counter, Gauge, MetricRegistry, Stats, snapshot
from server_core.timers import Timer, TimerSet

log = logging.getLogger("server_core")

F = TypeVar("F", bound=Callable[..., Any])

KIB = 1024
MIB = 1024 * KIB
DEFAULT_MAX_HEADER_BYTES = 32 * KIB
DEFAULT_MAX_BODY_BYTES = 10 * MIB
DEFAULT_MAX_PACKAGE_SIZE = 10 * MIB  # a WebSocket message, a text line or a frame
DEFAULT_MAX_SEND_BUFFER = 1 * MIB
DEFAULT_HEADER_TIMEOUT = 10  # seconds to receive a complete request head
DEFAULT_KEEPALIVE_TIMEOUT = 60  # seconds an idle keep-alive connection stays open
DEFAULT_DRAIN_GRACE = 1.0  # seconds idle keep-alive connections get during a drain
DEFAULT_BACKLOG = 1024
STATS_PREFIX = "X_SVCD_STATS="

CALLBACKS = (
    "on_worker_start",
    "on_worker_stop",
    "on_connect",
    "on_message",
    "on_http",
    "on_close",
    "on_error",
    "on_buffer_full",
    "on_buffer_drain",
)


class Worker:
    """A socket server process: one listen address, callbacks, timers, metrics."""

    def __init__(
        self,
        listen: str = "http://0.0.0.0:8080",
        *,
        count: int = 1,
        name: str | None = None,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_package_size: int = DEFAULT_MAX_PACKAGE_SIZE,
        max_send_buffer: int = DEFAULT_MAX_SEND_BUFFER,
        header_timeout: int = DEFAULT_HEADER_TIMEOUT,
        keepalive_timeout: int = DEFAULT_KEEPALIVE_TIMEOUT,
        drain_timeout: float | None = None,
        drain_grace: float = DEFAULT_DRAIN_GRACE,
        backlog: int = DEFAULT_BACKLOG,
        event_loop: str = "auto",
    ) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        if event_loop not in ("auto", "uvloop", "asyncio"):
            raise ValueError(f"event_loop must be auto, uvloop or asyncio, got {event_loop!r}")
        self.address: ListenAddress = parse_address(listen)
        self.count = count
        self.name = name or os.environ.get("SVCD_SERVICE") or self.address.scheme
        self.index = _index_from_environ()
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.max_package_size = max_package_size
        self.max_send_buffer = max_send_buffer
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.drain_timeout = drain_timeout
        self.drain_grace = drain_grace
        self.backlog = backlog
        self.event_loop = event_loop
        self.stats = Stats()
        self.callbacks: dict[str, Callable[..., Any]] = {}
        self.sockets: list[socket.socket] = []
        self._metrics = MetricRegistry()
        self._timers = TimerSet()
        self._server: Server | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = asyncio.Event()
        self._stop_requested = False

    # ----- callbacks (decorators) -----------------------------------------------------
    def _register(self, name: str, fn: F) -> F:
        if not callable(fn):
            raise TypeError(f"{name}: expected a function, got {fn!r}")
        if self._server is not None:
            raise RuntimeError(f"{name}: register callbacks before the worker starts")
        self.callbacks[name] = fn
        return fn

    def on_worker_start(self, fn: F) -> F:
        return self._register("on_worker_start", fn)

    def on_worker_stop(self, fn: F) -> F:
        return self._register("on_worker_stop", fn)

    def on_connect(self, fn: F) -> F:
        return self._register("on_connect", fn)

    def on_message(self, fn: F) -> F:
        return self._register("on_message", fn)

    def on_http(self, fn: F) -> F:
        return self._register("on_http", fn)

    def on_close(self, fn: F) -> F:
        return self._register("on_close", fn)

    def on_error(self, fn: F) -> F:
        return self._register("on_error", fn)

    def on_buffer_full(self, fn: F) -> F:
        return self._register("on_buffer_full", fn)

    def on_buffer_drain(self, fn: F) -> F:
        return self._register("on_buffer_drain", fn)

    # ----- timers and metrics -------------------------------------------------------
    def every(self, interval: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run `callback(*args)` every `interval` seconds until the timer is cancelled."""
        return self._timers.add(interval, callback, args, repeat=True)

    def after(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run `callback(*args)` once, `delay` seconds from now (or from the start)."""
        return self._timers.add(delay, callback, args, repeat=False)

    def counter(self, name: str, labels: dict[str, str] | None = None) -> Counter:
        """A counter reported to the agent (and so to Prometheus) with the stats."""
        return self._metrics.counter(name, labels)

    def gauge(self, name: str, labels: dict[str, str] | None = None) -> Gauge:
        return self._metrics.gauge(name, labels)

    # ----- state --------------------------------------------------------------------
    @property
    def connections(self) -> Set[Connection]:
        """The open connections the application has met (e.g. to broadcast)."""
        return self._server.connections if self._server is not None else frozenset()

    @property
    def draining(self) -> bool:
        return self._server is not None and self._server.draining

    def stats_snapshot(self) -> dict[str, Any]:
        """The X_SVCD_STATS object: built-in counts and the user metrics."""
        self.stats.timers = len(self._timers)
        return snapshot(self.stats, self._metrics)

    # ----- running ------------------------------------------------------------------
    def run(self) -> None:
        """Serve as this process's main program; returns after a graceful stop.

        A worker forked from a preload template does not return: it ends its process
        after the drain (`forkserver.end_worker`).

        Raises SystemExit(1) when the worker could not start (bind failure,
        on_worker_start raised), so a supervisor sees the failure.
        """
        code = runtime.run(self)
        if code:
            raise SystemExit(code)

    def adopt_environ(self) -> None:
        """Take this process's worker index from the environment again: a preload
        template built the Worker before svcd forked this process as one slot."""
        self.index = _index_from_environ()

    def stop(self) -> None:
        """Begin the graceful stop (what SIGTERM does); safe to call more than once."""
        self._stop_requested = True
        if self._stop_event is not None:
            self._stop_event.set()

    async def wait_started(self) -> None:
        """Wait until the worker serves (after on_worker_start)."""
        await self._started.wait()

    async def serve(
        self,
        sockets: Sequence[socket.socket] | None = None,
        *,
        notifier: Notifier | None = None,
        watchdog: float | None = None,
        probes: Sequence[socket.socket] = (),
    ) -> None:
        """Serve `sockets` (default: bind the address) until `stop()`, then drain.

        `probes`: listening sockets of the supervisor's health checks (svcd's
        `svcd-health`), served like `sockets` but not counted in `stats`.

        Raises what on_worker_start raises (after cleaning up). Cancelling it aborts
        every connection without a drain.
        """
        loop = asyncio.get_running_loop()
        notify = notifier or Notifier(None)
        self._stop_event = asyncio.Event()
        if self._started.is_set():  # served before: a fresh event for this run
            self._started = asyncio.Event()
        if self._stop_requested:
            self._stop_event.set()
        self.sockets = list(sockets) if sockets is not None else [bind(self.address, self.backlog)]
        server = self._server = Server(self, loop)
        watchdog_task: asyncio.Task[None] | None = None
        try:
            self.sockets = await server.listen(self.sockets, self.backlog)
            if probes:
                self.sockets += await server.listen(probes, self.backlog, probe=True)
            server.start()
            if notify.enabled:

                def report() -> None:
                    stats = json.dumps(self.stats_snapshot(), separators=(",", ":"))
                    notify.send(STATS_PREFIX + stats)

                server.on_tick = report
            if watchdog is not None and notify.enabled:
                watchdog_task = loop.create_task(_watchdog(notify, watchdog))
            self._timers.start(loop)
            start = self.callbacks.get("on_worker_start")
            if start is not None:
                result = start(self)
                if asyncio.iscoroutine(result):
                    await result
            notify.send(f"READY=1\nSTATUS=serving {self.address.scheme} on "
                        f"{len(self.sockets)} socket(s)")
            self._started.set()
            await self._stop_event.wait()
            notify.send("STOPPING=1")
            self._timers.stop()
            await server.drain(runtime.drain_timeout(self.drain_timeout), self.drain_grace)
        finally:
            self._timers.stop()
            if watchdog_task is not None:
                watchdog_task.cancel()
            server.close()
            await server.abort_all()
            try:
                await self._call_stop()
            finally:
                self._server = None
                self._stop_event = None

    async def _call_stop(self) -> None:
        stop = self.callbacks.get("on_worker_stop")
        if stop is None:
            return
        try:
            result = stop(self)
            if asyncio.iscoroutine(result):
                await result
        except Exception:
            log.exception("on_worker_stop failed")


def _index_from_environ() -> int:
    return int(os.environ.get("SVCD_WORKER", "0") or 0)


async def _watchdog(notifier: Notifier, interval: float) -> None:
    """WATCHDOG=1 every `interval` seconds from the event loop: proves it is responsive."""
    while True:
        notifier.send("WATCHDOG=1")
        await asyncio.sleep(interval)
