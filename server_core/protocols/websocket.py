"""WebSocket connections (RFC 6455) over the `websockets` sans-I/O protocol.

The HTTP phase is an `HttpConnection` (httptools parses the handshake request); on a
websocket upgrade `accept()` lets `websockets.server.ServerProtocol.accept` validate the
request and build the 101 answer (or the 4xx refusal), then moves the transport to a new
`WebSocketConnection`, which is the `conn` the application sees: `on_connect` runs after
the handshake (with `conn.request`), `on_message` gets `str` for text and `bytes` for
binary messages (fragments reassembled), `send(str|bytes)` sends the matching frame (a
dict or list goes out as JSON text). Frames are parsed by a second `ServerProtocol`
started in the OPEN state: the library's frame layer (C-accelerated unmasking) is about
four times cheaper per message than wsproto's, and it answers pings and closes itself.

Invariants: a message larger than `max_package_size` closes with 1009, invalid UTF-8 in
a text message with 1007, a protocol error with 1002 (on_error hears each); `close()`
and the drain (1001, going away) send a close frame and wait, bounded by
CLOSE_TIMEOUT, for the peer's; the server closes the TCP connection after the closing
handshake, as RFC 6455 asks.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from websockets.datastructures import Headers
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request as HandshakeRequest
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

from server_core.connection import NOT_SENT, MessageConnection, ProtocolViolation, Sent

if TYPE_CHECKING:
    from server_core.protocols.http import HttpConnection
    from server_core.protocols.http_message import Request
    from server_core.server import Server

NORMAL_CLOSURE = 1000
GOING_AWAY = 1001
# Seconds we wait for the peer's close frame before dropping the connection.
CLOSE_TIMEOUT = 2

# websockets logs refused handshakes with a traceback at INFO: a flood of bad
# handshakes must not flood the worker's log.
_log = logging.getLogger("server_core.websocket")
_log.setLevel(logging.WARNING)

_TEXT, _BINARY, _CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT


def accept(http: HttpConnection, request: Request, rest: bytes) -> None:
    """Complete the handshake of `request` and hand the transport to a WebSocket conn."""
    handshake = ServerProtocol(logger=_log)
    headers = Headers(
        [(name.decode("latin-1"), value.decode("latin-1")) for name, value in request.raw_headers]
    )
    response = handshake.accept(HandshakeRequest(request.target, headers))
    if response.status_code != 101:
        http._refuse_upgrade(response.serialize())
        return
    server = http.server
    conn = WebSocketConnection(server, request)
    conn.stats = http.stats  # (a health-probe listener's connection stays one)
    transport = http.transport
    conn.transport = transport
    http._detach()
    transport.set_protocol(conn)
    conn._write(response.serialize())
    server.connection_upgraded(http, conn)
    if rest and not conn._closed:
        conn._receive(rest)


class WebSocketConnection(MessageConnection):
    """An open WebSocket; `request` is the HTTP request that opened it."""

    __slots__ = (
        "_close_since",
        "_drain_code",
        "_parts",
        "_parts_text",
        "_proto",
        "_reported",
        "request",
    )

    def __init__(self, server: Server, request: Request) -> None:
        super().__init__(server)
        self._proto = ServerProtocol(state=OPEN, max_size=server.max_package_size, logger=_log)
        self.request = request
        self._parts: list[bytes] | None = None
        self._parts_text = False
        self._close_since = -1
        self._drain_code = NORMAL_CLOSURE
        self._reported = False

    def _handshake_first(self) -> bool:
        return False

    # ----- input ------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.stats.bytes_in += len(data)
        self._receive(data)

    def _receive(self, data: bytes) -> None:
        proto = self._proto
        proto.receive_data(data)
        for frame in proto.events_received():
            if not isinstance(frame, Frame):
                continue  # a protocol started OPEN yields frames only
            opcode = frame.opcode
            if opcode is _TEXT or opcode is _BINARY or opcode is _CONT:
                payload = frame.data
                if type(payload) is not bytes:
                    payload = bytes(payload)
                self._data_frame(opcode, payload, frame.fin)
                if self._closed:
                    return
        if proto.parser_exc is not None:
            self._report_protocol_error(proto.parser_exc)
        self._flush_protocol()

    def _data_frame(self, opcode: Opcode, data: bytes, fin: bool) -> None:
        if self._closing:
            return  # we are closing: the application no longer receives
        if opcode is _CONT:
            parts = self._parts
            if parts is None:
                return  # the protocol has already failed the connection
            parts.append(data)
            if not fin:
                return
            self._parts = None
            data = b"".join(parts)
            opcode = _TEXT if self._parts_text else _BINARY
        elif not fin:
            self._parts = [data]  # the protocol bounds the total with max_size
            self._parts_text = opcode is _TEXT
            return
        if opcode is _TEXT:
            try:
                text = data.decode()
            except UnicodeDecodeError:
                self._fail(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message")
                return
            self._dispatch(text)
        else:
            self._dispatch(data)

    def _report_protocol_error(self, exc: Exception) -> None:
        if self._reported or isinstance(exc, EOFError):
            return
        self._reported = True
        reason = "message too big" if "exceeds limit" in str(exc) else "protocol error"
        self.server.report_error(self, ProtocolViolation(f"websocket: {reason}: {exc}"))

    def _fail(self, code: int, reason: str) -> None:
        self.server.report_error(self, ProtocolViolation(f"websocket: {reason}"))
        self._reported = True
        self._proto.fail(code, reason)
        self._flush_protocol()

    def eof_received(self) -> bool | None:
        self._proto.receive_eof()
        self._flush_protocol()
        return False

    # ----- output -----------------------------------------------------------------
    def _flush_protocol(self) -> None:
        """Write what the protocol produced; its empty chunk means: close TCP now."""
        writes = self._proto.data_to_send()
        if not writes or self._closed:
            return
        eof = b"" in writes
        data = b"".join(writes)
        if data:
            self._write(data)
        if eof:
            self._closing = True
            self.transport.close()
        elif self._proto.close_expected() and self._close_since < 0:
            self._close_since = self.server.tick

    def _encode(self, data: Any) -> bytes:
        proto = self._proto
        if isinstance(data, str):
            proto.send_text(data.encode())
        elif isinstance(data, (bytes, bytearray, memoryview)):
            proto.send_binary(bytes(data))
        elif isinstance(data, (dict, list)):
            proto.send_text(json.dumps(data, separators=(",", ":")).encode())
        else:
            raise TypeError(f"cannot send a {type(data).__name__} over a WebSocket")
        return b"".join(proto.data_to_send())

    def send(self, data: Any) -> Sent:
        """Send a text (str), binary (bytes) or JSON (dict/list) message."""
        if self._closing or self._closed or self._proto.state is not OPEN:
            self.stats.send_fail += 1
            return NOT_SENT
        return self._write_checked(self._encode(data))

    def ping(self, payload: bytes = b"") -> None:
        if self._proto.state is OPEN and not self._closed:
            self._proto.send_ping(payload)
            self._flush_protocol()

    # ----- closing ----------------------------------------------------------------
    def _start_close(self) -> None:
        if self._proto.state is OPEN:
            self._proto.send_close(self._drain_code)
            self._close_since = self.server.tick  # wait for the peer's close frame
            self._flush_protocol()
        else:
            self.transport.close()

    def _drain_started(self) -> None:
        self._drain_code = GOING_AWAY
        if self._idle():
            self.close()
        else:
            self._close_when_idle = True

    def _close_idle_for_drain(self) -> None:
        """Closed at drain start already (or when its handler finishes)."""

    def _tick(self, tick: int) -> None:
        if self._close_since >= 0 and tick - self._close_since >= CLOSE_TIMEOUT:
            self._abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._parts = None
        super().connection_lost(exc)
