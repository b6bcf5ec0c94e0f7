"""HTTP/1.1 connections over httptools: keep-alive, pipelining, bodies, upgrades, limits.

The general path is `data_received -> httptools -> on_message_begin/on_url/on_header/
on_headers_complete/on_message_complete -> handler -> one write`: no task, no await
and one response formatting per request (a handler returning the same `str` object as
the previous one within the same second reuses its rendered bytes). Responses produced
while one chunk of input is parsed are batched into one write.

The hot path skips httptools for a head it has already read. A keep-alive client
sends the same bytes again and again (load tests, health checks, polling); when
httptools is between requests, what it makes of a chunk depends on the chunk alone,
so a chunk that was exactly one bodyless keep-alive request (at most
HEAD_CACHE_MAX_BYTES) is memoized by its bytes in the server's `head_cache`, and the
next identical chunk goes straight to the handler (`data_received` has that path
written out). Only httptools ever decides what bytes mean: there is no second parser
that could disagree with it (request smuggling), and the cache holds exactly its
reading. `tests/test_server_core_fuzz.py` checks that a server with the cache and one
without do and write the same for any input.

States of a connection: IDLE (waiting for a request; keep-alive timeout), HEAD (reading
a request head; header timeout and header-size limit), BODY (reading a body; body-size
limit), BUSY (a request is being handled or awaits `conn.send`), LINGER (we sent our
last response and half-closed; input is discarded until the peer closes or the linger
timeout ends, so a late request never turns into a reset that eats our response).

Invariants:
- Responses go out in request order: while a request is unanswered, later pipelined
  requests queue (bounded; reading pauses beyond it) and are handled one at a time.
- Malformed input gets 400, a too-large head 431, a too-large body 413, a slow head
  408; each closes only that connection.
- While the worker drains, every response says `Connection: close` and the connection
  closes after it; idle connections are closed by the server after a short grace.
- A chunk is looked up in the head cache only while the connection is IDLE, nothing is
  pending and httptools has consumed no part of a next request (`_mid`): a chunk that
  continues a request always goes to httptools.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from typing import TYPE_CHECKING, Any

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from server_core.connection import NOT_SENT, SENT, Connection, Sent
from server_core.eager import DONE
from server_core.protocols.http_message import (
    KEEP_CLOSE,
    KEEP_EXPLICIT,
    KEEP_IMPLICIT,
    Request,
    Response,
    error_response,
    render_result,
    render_simple,
)

if TYPE_CHECKING:
    from server_core.server import Server

IDLE, HEAD, BODY, BUSY, LINGER = range(5)

# A memoized request head: method, target, headers, keep-alive mode, and whether a
# cached rendered response may answer it (implicit keep-alive, not HEAD).
CachedHead = tuple[bytes, bytes, tuple[tuple[bytes, bytes], ...], int, bool]

CONTINUE_RESPONSE = b"HTTP/1.1 100 Continue\r\n\r\n"
# How long a half-closed connection waits for the peer to close (seconds).
LINGER_TIMEOUT = 2
# Requests queued behind an unanswered one before reading pauses.
MAX_PIPELINED = 32
# Memoized request heads (see HttpConnection._remember). Only chunks this short are
# looked up (hashing a longer one would cost a miss more than a hit saves; Workerman
# draws the same line); a server keeps at most this many (~0.5 MiB with their
# requests); a miss is a candidate when the request count is a multiple of 8, so
# traffic that never repeats pays little for the attempt while a head that repeats is
# soon memoized.
HEAD_CACHE_MAX_BYTES = 512
HEAD_CACHE_ENTRIES = 512
HEAD_CACHE_SAMPLING_MASK = 7
# Header names we look at while parsing, by length (a cheap pre-filter).
_WATCHED_LENGTHS = frozenset((6, 7, 10, 14))


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing with an HTTP error status."""


class HttpConnection(Connection):
    """An HTTP/1.1 connection; for `ws://` workers, the phase before the upgrade."""

    __slots__ = (
        "_backlog_bytes",
        "_body",
        "_chunk_bytes",
        "_connection_header",
        "_expect_continue",
        "_head_bytes",
        "_headers",
        "_memo_entry",
        "_memo_key",
        "_mid",
        "_out",
        "_parser",
        "_pending",
        "_queue",
        "_reading_paused",
        "_reject_status",
        "_since",
        "_state",
        "_upgrade",
        "_url",
        "_ws_request",
    )

    def __init__(self, server: Server) -> None:
        super().__init__(server)
        self._parser = HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: bytes | bytearray = b""
        self._state = IDLE
        self._since = server.tick
        self._pending: Request | None = None
        self._queue: collections.deque[Request] | None = None
        self._out: list[bytes] | None = None
        self._upgrade: bytes | None = None
        self._connection_header: bytes | None = None
        self._expect_continue = False
        self._head_bytes = 0  # URL and complete headers of the current request
        self._chunk_bytes = 0  # whole chunks that ended inside the current head
        self._backlog_bytes = 0
        self._reject_status = 0
        self._reading_paused = False
        self._ws_request: Request | None = None
        self._mid = False  # httptools has consumed part of a request (it is not at a boundary)
        # While a chunk that may be memoized is parsed: the chunk, and what httptools
        # made of it (see _remember); None otherwise.
        self._memo_key: bytes | None = None
        self._memo_entry: CachedHead | None = None

    def _handshake_first(self) -> bool:
        return self.server.websocket

    # ----- input ------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        server = self.server
        stats = self.stats
        size = len(data)
        stats.bytes_in += size
        if self._closing:
            return  # lingering: the peer's late bytes are read and dropped
        memo_key = None
        if self._state == IDLE:
            if not self._mid and self._pending is None and size <= HEAD_CACHE_MAX_BYTES:
                # httptools is between requests, so what it makes of `data` depends on
                # `data` alone: a head it parsed before needs no parsing (_remember).
                entry = server.head_cache.get(data)
                if entry is not None:
                    # The hot path of keep-alive traffic, written out (EagerRunner.run
                    # and _respond included): each Python call saved here is ~5 % of
                    # its cost. Anything unusual goes to the general methods.
                    method, url, headers, keep_alive, plain = entry
                    request = Request()
                    request._method = method
                    request.url = url
                    request.raw_headers = headers
                    request.body = b""
                    request.keep_alive = keep_alive
                    request._headers = None
                    stats.requests += 1
                    self._state = BUSY
                    self._pending = request
                    try:
                        # (called through locals: `obj.attr(...)` on an instance
                        # attribute is a slow generic method lookup in CPython 3.11;
                        # the runner is idle: the loop, not a handler, calls us)
                        handler = server.http_handler
                        if server.http_is_async:
                            runner = server.runner
                            send = runner.send
                            try:
                                value = send(handler(self, request))
                            except BaseException:
                                runner.failed()
                                raise
                            if value is not DONE:
                                self._wait_for(request, runner.suspended(value))
                                return
                            result = runner.box[0]
                        else:
                            result = handler(self, request)
                    except Exception as exc:
                        self._handler_failed(request, exc)
                        return
                    if result is server.cached_result and plain and self._pending is request:
                        # (the server keeps no cached result while it drains)
                        self._pending = None
                        response = server.cached_response
                        stats.bytes_out += len(response)
                        self.transport.write(response)
                        self._state = IDLE
                        self._since = server.tick
                        if self._close_when_idle:
                            self.close()
                    elif result is not None and self._pending is request:
                        self._respond(request, result)
                    return
                if not stats.requests & HEAD_CACHE_SAMPLING_MASK:
                    # a candidate for the head cache, if it is one plain request
                    self._memo_key = memo_key = data
            self._state = HEAD
            self._since = server.tick
            self._chunk_bytes = 0
        out: list[bytes] = []  # responses made while parsing this chunk: one write
        self._out = out
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._out = None
            self._memo_key = self._memo_entry = None
            self._flush(out)
            self._upgraded(data[exc.args[0] :])
            return
        except HttpParserError:
            self._out = None
            self._memo_key = self._memo_entry = None
            self._flush(out)
            self._fail(self._reject_status or 400)
            return
        self._out = None
        if memo_key is not None:
            entry = self._memo_entry
            self._memo_key = self._memo_entry = None
            if entry is not None and not self._mid:
                self._remember(memo_key, entry)
        if out:
            payload = out[0] if len(out) == 1 else b"".join(out)
            stats.bytes_out += len(payload)
            self.transport.write(payload)
        if self._closing:
            self._linger()
            return
        state = self._state
        if state == HEAD or state == BODY:  # noqa: SIM109 (`in` a tuple is slower)
            # No request completed in this chunk, so all of it belongs to the current
            # one. This bounds what httptools buffers without telling us: one endless
            # header line, or endless chunked-body trailers.
            self._chunk_bytes += size
            if state == HEAD:
                if self._chunk_bytes > server.max_header_bytes:
                    self._fail(431)
            elif self._chunk_bytes > server.max_header_bytes + server.max_body_bytes:
                self._fail(413)
        elif self._pending is not None:
            # Bytes for later requests pile up while this one is handled: bound them.
            self._backlog_bytes += size
            if (
                self._backlog_bytes > server.max_header_bytes + server.max_body_bytes
                and not self._reading_paused
            ):
                self._reading_paused = True
                self.transport.pause_reading()

    def _flush(self, out: list[bytes]) -> None:
        if out:
            self._write(out[0] if len(out) == 1 else b"".join(out))

    # httptools callbacks (looked up once, when the parser is created)
    def on_message_begin(self) -> None:
        self._mid = True

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        size = len(name)
        self._head_bytes += size + len(value)
        if size in _WATCHED_LENGTHS:
            self._watched_header(name.lower(), value)

    def _watched_header(self, name: bytes, value: bytes) -> None:
        if name == b"content-length":
            try:
                too_large = int(value) > self.server.max_body_bytes
            except ValueError:
                return  # the parser rejects it with 400
            if too_large:
                self._reject_status = 413
                raise _Reject
        elif name == b"connection":
            self._connection_header = value
        elif name == b"upgrade":
            self._upgrade = value
        elif name == b"expect":
            self._expect_continue = value.lower() == b"100-continue"
            self._memo_key = None  # parsing it has a side effect (100 Continue)

    def on_headers_complete(self) -> None:
        self._state = BODY
        if self._head_bytes + len(self._url) > self.server.max_header_bytes:
            self._reject_status = 431
            raise _Reject
        if self._expect_continue:
            self._expect_continue = False
            self._emit(CONTINUE_RESPONSE)

    def on_body(self, body: bytes) -> None:
        current = self._body
        if not current:
            self._body = current = body
        else:
            if type(current) is bytes:
                self._body = current = bytearray(current)
            current += body
        if len(current) > self.server.max_body_bytes:
            self._reject_status = 413
            raise _Reject

    def on_message_complete(self) -> None:
        self._mid = False
        if self._closing:
            return
        parser = self._parser
        keep_alive = KEEP_CLOSE
        if parser.should_keep_alive():
            keep_alive = KEEP_IMPLICIT
            connection = self._connection_header
            if connection is not None:
                self._connection_header = None
                # (find, not `in`: bytes.__contains__ first tries the argument as an
                # int, and building that TypeError costs more than the search)
                if connection.lower().find(b"keep-alive") >= 0:
                    keep_alive = KEEP_EXPLICIT
        body = self._body
        if body:
            self._body = b""
            if isinstance(body, bytearray):
                body = bytes(body)
        # an empty body is always b"" (a bytearray only ever holds two chunks or more)
        request = Request()  # (see Request: fields set here, no __init__)
        request._method = parser.get_method()
        request.url = self._url
        request.raw_headers = self._headers
        request.body = body  # type: ignore[assignment]  # (a bytearray became bytes above)
        request.keep_alive = keep_alive
        request._headers = None
        if self._memo_key is not None:
            self._note_for_cache(request)
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._state = BUSY
        if self._upgrade is not None:
            upgrade = self._upgrade
            self._upgrade = None
            if self.server.websocket and upgrade.lower().find(b"websocket") >= 0:
                self._ws_request = request  # handled when the parser stops (HttpParserUpgrade)
                return
        self.stats.requests += 1
        if self._pending is not None:
            queue = self._queue
            if queue is None:
                queue = self._queue = collections.deque()
            queue.append(request)
            if len(queue) >= MAX_PIPELINED and not self._reading_paused:
                self._reading_paused = True
                self.transport.pause_reading()
            return
        self._handle(request)

    def _note_for_cache(self, request: Request) -> None:
        """A request completed in a chunk that may be memoized: note what it was."""
        if (
            self._memo_entry is None
            and not request.body
            and request.keep_alive != KEEP_CLOSE
            and self._upgrade is None
        ):
            headers = tuple(request.raw_headers)
            request.raw_headers = headers
            keep_alive = request.keep_alive
            method = request._method
            plain = keep_alive == KEEP_IMPLICIT and method != b"HEAD"
            self._memo_entry = (method, request.url, headers, keep_alive, plain)
        else:  # a second request in the chunk, or one we do not memoize
            self._memo_key = self._memo_entry = None

    def _remember(self, data: bytes, entry: CachedHead) -> None:
        """Memoize httptools' reading of `data`: exactly one bodyless keep-alive request.

        Sound because httptools at a request boundary is in its initial state, so the
        same bytes always give the same request, and the limits it was checked against
        are the server's, which do not change. Bounded: the cache is emptied when full
        (a client sending ever-new heads only ever misses, as without the cache).
        """
        cache = self.server.head_cache
        if len(cache) >= HEAD_CACHE_ENTRIES:
            cache.clear()
        cache[data] = entry

    def eof_received(self) -> bool | None:
        if self._state == LINGER or self._pending is None:
            return False  # close our side too
        # Half-closed by the peer while a request is handled: answer, then close.
        self._pending.keep_alive = KEEP_CLOSE
        if self._queue:
            for request in self._queue:
                request.keep_alive = KEEP_CLOSE
        return True

    # ----- handling ---------------------------------------------------------------
    def _handle(self, request: Request) -> None:
        self._pending = request
        self._state = BUSY  # (a queued request: the state was IDLE after the previous)
        server = self.server
        try:
            handler = server.http_handler  # (see data_received: called through locals)
            if server.http_is_async:
                runner = server.runner
                if runner.driver.gi_running:
                    # called from a handler's conn.send(): see EagerRunner.run
                    self._wait_for(request, server.loop.create_task(handler(self, request)))
                    return
                send = runner.send  # EagerRunner.run written out
                try:
                    value = send(handler(self, request))
                except BaseException:
                    runner.failed()
                    raise
                if value is not DONE:
                    self._wait_for(request, runner.suspended(value))
                    return
                result = runner.box[0]
            else:
                result = handler(self, request)
        except Exception as exc:
            self._handler_failed(request, exc)
            return
        if result is not None and self._pending is request:
            self._respond(request, result)

    def _wait_for(self, request: Request, task: asyncio.Task[Any]) -> None:
        """The handler of `request` suspended: answer when its task ends."""
        self.server.track(task)
        task.add_done_callback(functools.partial(self._handler_done, request))

    def _handler_done(self, request: Request, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._handler_failed(request, exc)
        else:
            result = task.result()
            if result is not None and self._pending is request:
                if self._closed or self._closing:
                    self.stats.send_fail += 1  # the client went away meanwhile
                    self._pending = None
                    return
                self._respond(request, result)
        self._advance()

    def _handler_failed(self, request: Request, exc: BaseException) -> None:
        self.server.report_error(self, exc)
        if self._pending is request and not self._closed:
            self._pending = None
            self._emit(error_response(500, self.server.date_line, self._keep(request)))
            self._after_response(request)

    def _advance(self) -> None:
        """Handle queued requests until one has to wait."""
        queue = self._queue
        while queue and self._pending is None and not self._closing and not self._closed:
            self._handle(queue.popleft())
        if self._pending is None and not queue:
            self._backlog_bytes = 0
            if self._reading_paused and not self._closing and not self._closed:
                self._reading_paused = False
                self.transport.resume_reading()

    def _keep(self, request: Request) -> int:
        return KEEP_CLOSE if self.server.draining else request.keep_alive

    def _respond(self, request: Request, result: Any) -> None:
        self._pending = None
        server = self.server
        keep_alive = request.keep_alive
        if server.draining:
            keep_alive = KEEP_CLOSE
        if (
            result is server.cached_result
            and keep_alive == KEEP_IMPLICIT
            and request._method != b"HEAD"
        ):
            data = server.cached_response
        else:
            data = self._render(request, result, keep_alive)
        out = self._out
        if out is not None:
            out.append(data)
        else:
            self.stats.bytes_out += len(data)
            self.transport.write(data)
        if keep_alive == KEEP_CLOSE:
            self._after_response(request, keep_alive)
            return
        self._state = IDLE
        self._since = server.tick
        if self._close_when_idle and not self._queue:
            self.close()

    def _render(self, request: Request, result: Any, keep_alive: int) -> bytes:
        server = self.server
        head_only = request._method == b"HEAD"
        if type(result) is str:
            data = render_simple(server.text_head, result.encode(), keep_alive, head_only)
            if keep_alive == KEEP_IMPLICIT and not head_only:
                server.cached_result = result
                server.cached_response = data
            return data
        try:
            return render_result(result, server.date_line, server.heads, keep_alive, head_only)
        except (TypeError, ValueError) as exc:
            server.report_error(self, exc)
            return error_response(500, server.date_line, keep_alive)

    def _after_response(self, request: Request, keep_alive: int | None = None) -> None:
        if keep_alive is None:
            keep_alive = self._keep(request)
        if keep_alive == KEEP_CLOSE:
            self._closing = True
            if self._out is None:  # else _feed lingers after flushing the batch
                self._linger()
            return
        self._state = IDLE
        self._since = self.server.tick
        if self._close_when_idle and not self._queue:
            self.close()

    def _emit(self, data: bytes) -> None:
        out = self._out
        if out is not None:
            out.append(data)
        else:
            self._write(data)

    # ----- errors, upgrade, close -------------------------------------------------
    def _fail(self, status: int) -> None:
        """The input is unusable: answer `status` and close (after any pending answer)."""
        if self._closing or self._closed:
            return
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        if self._pending is not None:
            # Answer in order: the pending request gets its response, then we close.
            self._pending.keep_alive = KEEP_CLOSE
            self._queue = None
            return
        self._closing = True
        self._write(error_response(status, self.server.date_line))
        self._linger()

    def _upgraded(self, rest: bytes) -> None:
        request = self._ws_request
        self._ws_request = None
        if request is None:
            # An Upgrade we do not speak (h2c, or websocket on an http:// worker): the
            # request was answered as plain HTTP; keep parsing with a fresh parser.
            self._parser = HttpRequestParser(self)
            self._mid = False
            if rest and not self._closing:
                self.stats.bytes_in -= len(rest)  # counted already
                self.data_received(rest)
            elif self._closing:
                self._linger()
            return
        if self._pending is not None or self._closing:
            self._fail(400)  # an upgrade behind unanswered pipelined requests
            return
        # Imported here, not at the top: only ws:// workers get this far, and they
        # loaded the module at start (protocols.connection_class); http:// ones never do.
        from server_core.protocols import websocket

        websocket.accept(self, request, rest)

    def _refuse_upgrade(self, response: bytes) -> None:
        """Answer a bad WebSocket handshake with `response` (a full 4xx) and close."""
        self._closing = True
        self._write(response)
        self._linger()

    def _detach(self) -> None:
        """The transport now belongs to another protocol object (after an upgrade)."""
        self._closed = True

    def _linger(self) -> None:
        if self._state == LINGER or self._closed:
            return
        self._state = LINGER
        self._since = self.server.tick
        transport = self.transport
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()  # we must see the peer's EOF
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def _start_close(self) -> None:
        if self._out is None:
            self._linger()

    def _idle(self) -> bool:
        return self._state == IDLE and self._pending is None

    def _close_idle_for_drain(self) -> None:
        if self._idle():
            self.close()
        else:
            self._close_when_idle = True

    def _tick(self, tick: int) -> None:
        state = self._state
        if state == IDLE:
            if tick - self._since >= self.server.keepalive_timeout:
                self.close()
        elif state == HEAD:
            if tick - self._since >= self.server.header_timeout:
                self._fail(408)
        elif state == LINGER and tick - self._since >= LINGER_TIMEOUT:
            self._abort()

    # ----- public API ---------------------------------------------------------------
    def send(self, data: Any) -> Sent:
        """Answer the oldest unanswered request with `data` (str, bytes, dict, Response)."""
        request = self._pending
        if request is None or self._closing or self._closed:
            self.stats.send_fail += 1
            return NOT_SENT
        self._respond(request, data)
        self._advance()
        return Sent(True, self) if self._write_paused else SENT

    def close(self, data: Any = None) -> None:
        """Answer the pending request with `data` (if given) and close the connection."""
        if data is not None and self._pending is not None:
            self._pending.keep_alive = KEEP_CLOSE
            self.send(data)
            return
        if not (self._closing or self._closed):
            self._closing = True
            self._start_close()


__all__ = ["HttpConnection", "Request", "Response"]
