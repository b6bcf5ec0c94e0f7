"""The running state of one worker process: listeners, connections, clock, drain.

A `Server` exists while `Worker.serve()` runs. Connections keep a reference to it and
read what they need on the hot path as plain attributes: the callbacks (with their
sync/async nature detected once), the limits, the cached `Date` line and response
heads, the HTTP head cache (request heads httptools already read, by their bytes), the
`draining` flag. Once a second `_on_tick` refreshes the Date, advances the
coarse clock (`tick`, whole seconds) that connection timeouts compare against, lets
every connection check its timeouts and runs the stats hook.

Drain (on SIGTERM): close our copy of every listening socket at once (never
`shutdown()` it: other processes share it), let each connection finish in its
protocol's way, close idle ones after `drain_grace`, and abort whatever is left at the
drain timeout.

Invariants: `stats.connections` counts every open connection but those of probe
listeners (health checks count in `probe_stats` alone); `connections` holds
exactly the ones the application has met (on_connect ran, on_close will run once);
`handshaking` holds the rest (a ws:// worker's HTTP phase). Errors in user callbacks go
to `on_error` (or the log), never into the event loop. `cached_result` is None while
draining (a cached response would say keep-alive).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import socket
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from server_core.connection import Connection
from server_core.eager import DONE, EagerRunner
from server_core.protocols import connection_class
from server_core.protocols.http_message import (
    BYTES_TYPE,
    JSON_TYPE,
    TEXT_TYPE,
    Response,
    simple_head,
)
from server_core.stats import Stats

if TYPE_CHECKING:
    from server_core.worker import Worker

log = logging.getLogger("server_core")

TICK_INTERVAL = 1.0
# English names, whatever the locale (time.strftime's %a/%b would follow LC_TIME).
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(when: float | None = None) -> str:
    """`when` (default: now) as an HTTP Date: IMF-fixdate, RFC 9110 section 5.6.7.

    The same text as `email.utils.formatdate(usegmt=True)`, without importing the email
    package at start-up (it costs a worker about 10 ms before it can be ready).
    """
    t = time.gmtime(when)
    return (
        f"{_WEEKDAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


def is_async(callback: Callable[..., Any] | None) -> bool:
    """Whether calling `callback` returns a coroutine (decided once, at registration)."""
    if callback is None:
        return False
    if inspect.iscoroutinefunction(callback):
        return True
    call = getattr(callback, "__call__", None)  # noqa: B004 - async __call__ objects
    return call is not None and inspect.iscoroutinefunction(call)


class Server:
    """Listeners and connections of a worker while it serves."""

    def __init__(self, worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
        self.worker = worker
        self.loop = loop
        self.stats = worker.stats
        # What the connections of probe listeners count: kept apart from the worker's
        # stats (health checks are not traffic), never reported.
        self.probe_stats = Stats()
        scheme = worker.address.scheme
        self.websocket = scheme == "ws"
        self.connection_class = connection_class(scheme)
        callbacks = worker.callbacks
        self.on_connect = callbacks.get("on_connect")
        self.on_close = callbacks.get("on_close")
        self.on_error = callbacks.get("on_error")
        self.on_buffer_full = callbacks.get("on_buffer_full")
        self.on_buffer_drain = callbacks.get("on_buffer_drain")
        self.on_message = callbacks.get("on_message")
        self.message_is_async = is_async(self.on_message)
        self.runner = EagerRunner()
        no_handler_response = (
            Response("426 Upgrade Required\n", 426, {"Upgrade": "websocket"})
            if self.websocket
            else Response("404 Not Found\n", 404)
        )
        self.http_handler: Callable[..., Any] = (
            callbacks.get("on_http") if self.websocket else self.on_message
        ) or (lambda conn, request: no_handler_response)
        self.http_is_async = is_async(self.http_handler)
        self.max_header_bytes = worker.max_header_bytes
        self.max_body_bytes = worker.max_body_bytes
        self.max_package_size = worker.max_package_size
        self.max_send_buffer = worker.max_send_buffer
        self.header_timeout = worker.header_timeout
        self.keepalive_timeout = worker.keepalive_timeout
        self.connections: set[Connection] = set()
        self.handshaking: set[Connection] = set()
        self.draining = False
        self.tick = 0
        self.on_tick: Callable[[], None] | None = None
        self.date_line = b""
        self.text_head = b""
        self.heads: tuple[bytes, bytes, bytes] = (b"", b"", b"")
        # The last `str` an HTTP handler returned and its rendered keep-alive 200
        # response, for this second's Date; always None while draining.
        self.cached_result: object = None
        self.cached_response = b""
        # HTTP request heads already parsed, by their exact bytes (HttpConnection
        # memoizes httptools' reading of repeated heads; the values are its own).
        self.head_cache: dict[bytes, Any] = {}
        self._refresh_date()
        self._listeners: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._emptied: asyncio.Event | None = None
        self._ticker: asyncio.TimerHandle | None = None

    # ----- lifecycle --------------------------------------------------------------
    async def listen(
        self, sockets: Iterable[socket.socket], backlog: int, *, probe: bool = False
    ) -> list[socket.socket]:
        """Serve each listening socket (taking ownership); the sockets as now held.

        `probe`: these are listeners of the supervisor's health checks (svcd's private
        `svcd-health` one). Their connections are served like any other but count in
        `probe_stats`, not in the worker's stats: a check every second must not show
        an idle worker at 1 request per second. (Each connection picks its stats
        object once, so the request path pays nothing for the distinction.)
        """
        factory: Callable[[], Connection] = (
            self._probe_connection if probe else functools.partial(self.connection_class, self)
        )
        held = []
        for sock in sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto == 0:
                # asyncio sets TCP_NODELAY on accepted sockets only when the listening
                # socket says IPPROTO_TCP (uvloop always does): without it keep-alive
                # responses stall 40 ms on delayed ACKs.
                sock = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, sock.detach())
            listener = await self.loop.create_server(factory, sock=sock, backlog=backlog)
            self._listeners.append(listener)
            held.append(sock)
        return held

    def _probe_connection(self) -> Connection:
        conn = self.connection_class(self)
        conn.stats = self.probe_stats
        return conn

    def start(self) -> None:
        self._ticker = self.loop.call_later(TICK_INTERVAL, self._on_tick)

    def stop_listening(self) -> None:
        """Stop accepting: close our copy of each listening socket (no shutdown())."""
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()

    async def drain(self, limit: float, grace: float) -> None:
        """Finish the open connections gracefully; abort what is left after `limit` s."""
        self.draining = True
        self.cached_result = None  # a cached response says keep-alive: not any more
        self.stop_listening()
        for conn in self._open():
            conn._drain_started()
        grace_handle = self.loop.call_later(grace, self._close_idle)
        try:
            if self.connections or self.handshaking:
                self._emptied = asyncio.Event()
                try:
                    async with asyncio.timeout(limit):
                        await self._emptied.wait()
                except TimeoutError:
                    log.warning(
                        "drain timeout (%.1fs): aborting %d connection(s)",
                        limit,
                        len(self.connections) + len(self.handshaking),
                    )
        finally:
            grace_handle.cancel()
        await self.abort_all()

    async def abort_all(self) -> None:
        for conn in self._open():
            conn._abort()
        # connection_lost (and so on_close) runs from the loop's next iterations
        for _ in range(3):
            if not (self.connections or self.handshaking):
                break
            await asyncio.sleep(0)

    def close(self) -> None:
        self.stop_listening()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for task in list(self._tasks):
            task.cancel()

    # ----- connections ------------------------------------------------------------
    def connection_opened(self, conn: Connection) -> None:
        conn.stats.connections += 1
        if conn._handshake_first():
            self.handshaking.add(conn)
        else:
            self._meet(conn)

    def connection_upgraded(self, old: Connection, new: Connection) -> None:
        self.handshaking.discard(old)
        self._meet(new)
        if self.draining:
            new._drain_started()

    def _meet(self, conn: Connection) -> None:
        conn._visible = True
        self.connections.add(conn)
        if self.on_connect is not None:
            self.call(conn, self.on_connect, conn)

    def connection_closed(self, conn: Connection) -> None:
        conn.stats.connections -= 1
        if conn._visible:
            self.connections.discard(conn)
            if self.on_close is not None:
                self.call(conn, self.on_close, conn)
        else:
            self.handshaking.discard(conn)
        if self._emptied is not None and not self.connections and not self.handshaking:
            self._emptied.set()

    def _open(self) -> list[Connection]:
        return [*self.connections, *self.handshaking]

    def _close_idle(self) -> None:
        for conn in self._open():
            conn._close_idle_for_drain()

    # ----- callbacks --------------------------------------------------------------
    def call(self, conn: Connection | None, callback: Callable[..., Any], *args: Any) -> None:
        """Run a sync or async callback now; errors go to `report_error`."""
        try:
            result = callback(*args)
            if inspect.iscoroutine(result):
                task = self.runner.run(result)
                if task is not DONE:
                    self.track(task)
                    task.add_done_callback(functools.partial(self._callback_done, conn))
        except Exception as exc:
            self.report_error(conn, exc)

    def _callback_done(self, conn: Connection | None, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            self.report_error(conn, exc)

    def report_error(self, conn: Connection | None, exc: BaseException) -> None:
        """Tell `on_error(conn, exc)`, or log when there is none (or it fails too)."""
        handler = self.on_error
        if handler is not None and conn is not None:
            try:
                result = handler(conn, exc)
                if inspect.iscoroutine(result):
                    self.track(asyncio.ensure_future(result))
                return
            except Exception:
                log.exception("on_error failed")
        log.error("error on %r: %r", conn, exc, exc_info=exc)

    def track(self, task: asyncio.Task[Any]) -> None:
        """Keep a reference to a handler task until it ends (cancelled at close)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----- clock ------------------------------------------------------------------
    def _refresh_date(self) -> None:
        self.date_line = b"Date: " + http_date().encode() + b"\r\n"
        self.heads = (
            simple_head(self.date_line, TEXT_TYPE),
            simple_head(self.date_line, BYTES_TYPE),
            simple_head(self.date_line, JSON_TYPE),
        )
        self.text_head = self.heads[0]
        self.cached_result = None
        self.cached_response = b""

    def _on_tick(self) -> None:
        self._ticker = self.loop.call_later(TICK_INTERVAL, self._on_tick)
        self.tick += 1
        self._refresh_date()
        tick = self.tick
        for conn in self._open():
            try:
                conn._tick(tick)
            except Exception:
                log.exception("timeout check failed on %r", conn)
        if self.on_tick is not None:
            try:
                self.on_tick()
            except Exception:
                log.exception("tick hook failed")
