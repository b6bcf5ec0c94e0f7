"""One client connection: the `conn` object every user callback receives.

`Connection` is an asyncio Protocol (callbacks, not streams, keep the hot path free of
awaits) and the public handle at once, so a connection costs one object. It owns the
parts every protocol shares: registration with the `Server` (counts, the connection
set, on_connect/on_close), writes with byte counting and back-pressure
(`on_buffer_full` / `on_buffer_drain`, awaitable `send`), a lazily created `context`
dict, and closing. `MessageConnection` adds in-order dispatch of decoded messages to
`on_message` for the message protocols (tcp, text, frame, websocket).

Invariants:
- `on_close` runs once per connection that saw `on_connect`, from `connection_lost`.
- Messages of one connection reach `on_message` in order: while an async handler is
  suspended, later messages wait in a bounded queue (reading pauses when it is full).
- A failing handler or callback is reported (on_error, else the log) and never
  propagates into the event loop; other connections are untouched. So is a handler's
  return value the protocol cannot encode (a dict on text://): the reply is dropped,
  on_error gets the TypeError, and the connection's queued messages go on in order.
- `send` after close, or beyond the hard send-buffer cap, drops the data, counts a
  `send_fail` and returns a falsy `Sent`; a dropped unencodable reply counts one too
  (`conn.send()` of such a value raises TypeError to its caller instead).
- A connection counts (connections, requests, bytes, send_fail) in `self.stats`: the
  worker's, or a separate `Stats` for the connections of a health-probe listener,
  which are the supervisor's checks, not traffic (see `Server.listen`).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, cast

from server_core.eager import DONE

if TYPE_CHECKING:
    from server_core.server import Server
    from server_core.stats import Stats

# Messages queued behind a suspended handler before we stop reading from the socket.
MAX_QUEUED_MESSAGES = 64
# Data beyond max_send_buffer * this factor is dropped instead of buffered.
HARD_SEND_BUFFER_FACTOR = 4

_ids = itertools.count(1)


class ProtocolViolation(Exception):
    """The peer broke the protocol (oversized frame, bad encoding): the connection closes."""


class Sent:
    """What `send` returns: truthy when the data was accepted; awaiting it waits for the
    send buffer to drain below its high-water mark (back-pressure)."""

    __slots__ = ("_conn", "ok")

    def __init__(self, ok: bool, conn: Connection | None = None) -> None:
        self.ok = ok
        self._conn = conn

    def __bool__(self) -> bool:
        return self.ok

    def __await__(self) -> Generator[Any, None, bool]:
        conn = self._conn
        if conn is not None and conn._write_paused and not conn._closed:
            yield from conn._wait_drained().__await__()
        return self.ok


SENT = Sent(True)
NOT_SENT = Sent(False)


class Connection(asyncio.Protocol):
    """A client connection; subclasses implement one wire protocol."""

    __slots__ = (
        "_close_when_idle",
        "_closed",
        "_closing",
        "_context",
        "_drain_waiters",
        "_visible",
        "_write_paused",
        "id",
        "server",
        "stats",
        "transport",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        # Where this connection counts: the worker's stats, or the server's
        # `probe_stats` for the supervisor's health probes (Server.listen).
        self.stats: Stats = server.stats
        self.id = next(_ids)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self._context: dict[str, Any] | None = None
        self._closing = False
        self._closed = False
        self._close_when_idle = False
        self._write_paused = False
        self._visible = False
        self._drain_waiters: list[asyncio.Future[None]] | None = None

    # ----- public API -------------------------------------------------------------
    @property
    def context(self) -> dict[str, Any]:
        """A dict for the application's per-connection state."""
        if self._context is None:
            self._context = {}
        return self._context

    @property
    def remote_address(self) -> Any:
        """The peer address as the socket reports it ((host, port) for TCP)."""
        return self.transport.get_extra_info("peername") if self.transport else None

    @property
    def closed(self) -> bool:
        return self._closed or self._closing

    def send(self, data: Any) -> Sent:
        """Encode `data` for this protocol and write it; see `Sent`."""
        if self._closing or self._closed:
            self.stats.send_fail += 1
            return NOT_SENT
        payload = self._encode(data)
        return self._write_checked(payload)

    def close(self, data: Any = None) -> None:
        """Send `data` (if given), flush, then close the connection."""
        if data is not None:
            self.send(data)
        if not (self._closing or self._closed):
            self._closing = True
            self._start_close()

    def pause_recv(self) -> None:
        """Stop reading from this connection (flow control from the application)."""
        if not self._closed:
            self.transport.pause_reading()

    def resume_recv(self) -> None:
        if not self._closed:
            self.transport.resume_reading()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} #{self.id} {self.remote_address}>"

    # ----- asyncio.Protocol -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        server = self.server
        transport.set_write_buffer_limits(high=server.max_send_buffer)
        server.connection_opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._write_paused = False
        self._wake_drain_waiters()
        self.server.connection_closed(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        callback = self.server.on_buffer_full
        if callback is not None:
            self.server.call(self, callback, self)

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain_waiters()
        callback = self.server.on_buffer_drain
        if callback is not None:
            self.server.call(self, callback, self)

    # ----- for subclasses and the server -------------------------------------------
    def _encode(self, data: Any) -> bytes:
        """Turn what the application sends into wire bytes."""
        raise NotImplementedError

    def _write(self, data: bytes) -> None:
        self.stats.bytes_out += len(data)
        self.transport.write(data)

    def _write_checked(self, data: bytes) -> Sent:
        if not self._write_paused:
            self._write(data)
            return SENT
        server = self.server
        hard_cap = server.max_send_buffer * HARD_SEND_BUFFER_FACTOR
        if self.transport.get_write_buffer_size() > hard_cap:
            self.stats.send_fail += 1
            server.report_error(self, ProtocolViolation("send buffer full: data dropped"))
            return NOT_SENT
        self._write(data)
        return Sent(True, self)

    def _wait_drained(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self.server.loop.create_future()
        if self._drain_waiters is None:
            self._drain_waiters = []
        self._drain_waiters.append(future)
        return future

    def _wake_drain_waiters(self) -> None:
        waiters = self._drain_waiters
        if waiters:
            self._drain_waiters = None
            for future in waiters:
                if not future.done():
                    future.set_result(None)

    def _start_close(self) -> None:
        """Flush and close; protocols with a closing handshake override this."""
        self.transport.close()

    def _abort(self) -> None:
        if not self._closed:
            self._closing = True
            self.transport.abort()

    def _idle(self) -> bool:
        """True when closing now loses no message in progress."""
        return True

    def _handshake_first(self) -> bool:
        """True when the application meets this connection only after a handshake."""
        return False

    def _drain_started(self) -> None:
        """The worker is stopping: finish gracefully (protocol-specific)."""

    def _close_idle_for_drain(self) -> None:
        """The drain grace is over: close now if idle, else as soon as idle."""
        if self._idle():
            self.close()
        else:
            self._close_when_idle = True

    def _tick(self, tick: int) -> None:
        """Once a second: protocol timeouts."""


class MessageConnection(Connection):
    """A connection whose decoded messages go to `on_message` in order."""

    __slots__ = ("_busy", "_queue", "_reading_paused")

    def __init__(self, server: Server) -> None:
        super().__init__(server)
        self._busy = False
        self._queue: collections.deque[Any] | None = None
        self._reading_paused = False

    def _idle(self) -> bool:
        return not self._busy and not self._queue

    def _dispatch(self, message: Any) -> None:
        if self._busy:
            queue = self._queue
            if queue is None:
                queue = self._queue = collections.deque()
            queue.append(message)
            if len(queue) >= MAX_QUEUED_MESSAGES and not self._reading_paused:
                self._reading_paused = True
                self.transport.pause_reading()
            return
        self._handle(message)

    def _handle(self, message: Any) -> None:
        server = self.server
        self.stats.requests += 1
        handler = server.on_message
        if handler is None:
            return
        try:
            if server.message_is_async:
                runner = server.runner
                task = runner.run(handler(self, message))
                if task is not DONE:
                    self._busy = True
                    server.track(task)
                    task.add_done_callback(self._handler_done)
                    return
                result = runner.box[0]
            else:
                result = handler(self, message)
        except Exception as exc:
            server.report_error(self, exc)
            return
        if result is not None:
            self._reply(result)

    def _handler_done(self, task: asyncio.Task[Any]) -> None:
        self._busy = False
        if not task.cancelled():
            exc = task.exception()
            if exc is not None:
                self.server.report_error(self, exc)
            else:
                result = task.result()
                if result is not None:
                    self._reply(result)
        queue = self._queue
        while queue and not self._busy and not self._closed:
            self._handle(queue.popleft())
        if self._reading_paused and not self._busy and not self._closed:
            self._reading_paused = False
            self.transport.resume_reading()
        if self._close_when_idle and self._idle():
            self.close()

    def _reply(self, result: Any) -> None:
        """Send what a handler returned. One the protocol cannot encode (a dict on
        text://: TypeError) is dropped like data sent after close (a `send_fail`) and
        reported as the handler's error; the connection and its queued messages carry on.
        """
        try:
            self.send(result)
        except Exception as exc:
            self.stats.send_fail += 1
            self.server.report_error(self, exc)
