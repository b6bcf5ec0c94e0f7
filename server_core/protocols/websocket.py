"""WebSocket connections (RFC 6455) over wsproto, entered by an HTTP upgrade.

The HTTP phase is an `HttpConnection` (httptools parses the handshake request); on a
websocket upgrade `accept()` lets wsproto validate the request and write the 101
answer, then moves the transport to a new `WebSocketConnection`, which is the `conn`
the application sees: `on_connect` runs after the handshake (with `conn.request`),
`on_message` gets `str` for text and `bytes` for binary messages, `send(str|bytes)`
sends the matching frame (a dict or list goes out as JSON text).

Invariants: pings are answered with pongs; a message larger than `max_package_size`
closes with 1009; a protocol error closes with wsproto's code (1002/1007); `close()` and
the drain (1001, going away) send a close frame and wait, bounded, for the peer's.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from server_core.connection import NOT_SENT, MessageConnection, ProtocolViolation, Sent

if TYPE_CHECKING:
    from server_core.protocols.http import HttpConnection
    from server_core.protocols.http_message import Request
    from server_core.server import Server

NORMAL_CLOSURE = 1000
GOING_AWAY = 1001
MESSAGE_TOO_BIG = 1009
# Seconds we wait for the peer's close frame before dropping the connection.
CLOSE_TIMEOUT = 2


def accept(http: HttpConnection, request: Request, rest: bytes) -> None:
    """Complete the handshake of `request` and hand the transport to a WebSocket conn."""
    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.initiate_upgrade_connection(request.raw_headers, request.url)
    except RemoteProtocolError:
        http._fail(400)
        return
    for _ in ws.events():  # the handshake Request event: nothing to decide on
        pass
    handshake = ws.send(AcceptConnection())
    server = http.server
    conn = WebSocketConnection(server, ws, request)
    transport = http.transport
    conn.transport = transport
    http._detach()
    transport.set_protocol(conn)
    conn._write(handshake)
    server.connection_upgraded(http, conn)
    if rest and not conn._closed:
        conn._receive(rest)


class WebSocketConnection(MessageConnection):
    """An open WebSocket; `request` is the HTTP request that opened it."""

    __slots__ = ("_close_since", "_drain_code", "_parts", "_parts_size", "_ws", "request")

    def __init__(self, server: Server, ws: WSConnection, request: Request) -> None:
        super().__init__(server)
        self._ws = ws
        self.request = request
        self._parts: list[Any] | None = None
        self._parts_size = 0
        self._close_since = -1
        self._drain_code = NORMAL_CLOSURE

    def _handshake_first(self) -> bool:
        return False

    # ----- input ------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.server.stats.bytes_in += len(data)
        self._receive(data)

    def _receive(self, data: bytes) -> None:
        ws = self._ws
        if ws.state is ConnectionState.CLOSED:
            return
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                self._message(event)
            elif isinstance(event, Ping):
                self._send_event(event.response())
            elif isinstance(event, CloseConnection):
                self._peer_closed(event)
                return
            if self._closed:
                return

    def _message(self, event: TextMessage | BytesMessage) -> None:
        if self._closing:
            return  # we are closing: the application no longer receives
        data = event.data
        parts = self._parts
        if event.message_finished and parts is None:
            if len(data) > self.server.max_package_size:
                self._refuse(MESSAGE_TOO_BIG, "message too big")
                return
            self._dispatch(data if isinstance(data, str) else bytes(data))
            return
        if parts is None:
            parts = self._parts = []
            self._parts_size = 0
        parts.append(data)
        self._parts_size += len(data)
        if self._parts_size > self.server.max_package_size:
            self._refuse(MESSAGE_TOO_BIG, "message too big")
            return
        if event.message_finished:
            self._parts = None
            whole = "".join(parts) if isinstance(data, str) else b"".join(parts)
            self._dispatch(whole)

    def _peer_closed(self, event: CloseConnection) -> None:
        ws = self._ws
        if ws.state is ConnectionState.REMOTE_CLOSING:
            self._send_event(event.response())  # echo the close: handshake complete
        elif ws.state is ConnectionState.OPEN:
            # wsproto reports a protocol error as a close event without a state change
            self._send_event(CloseConnection(code=event.code, reason=event.reason or ""))
        self._closing = True
        self.transport.close()

    def _refuse(self, code: int, reason: str) -> None:
        self.server.report_error(self, ProtocolViolation(f"websocket: {reason}"))
        if self._ws.state is ConnectionState.OPEN:
            self._send_event(CloseConnection(code=code, reason=reason))
        self._closing = True
        self.transport.close()

    # ----- output -----------------------------------------------------------------
    def _send_event(self, event: Any) -> None:
        try:
            data = self._ws.send(event)
        except Exception:  # wsproto refuses events in a closing state
            return
        if not self._closed:
            self._write(data)

    def _encode(self, data: Any) -> bytes:
        if isinstance(data, str):
            return self._ws.send(TextMessage(data=data))
        if isinstance(data, (bytes, bytearray, memoryview)):
            return self._ws.send(BytesMessage(data=bytes(data)))
        if isinstance(data, (dict, list)):
            return self._ws.send(TextMessage(data=json.dumps(data, separators=(",", ":"))))
        raise TypeError(f"cannot send a {type(data).__name__} over a WebSocket")

    def send(self, data: Any) -> Sent:
        """Send a text (str), binary (bytes) or JSON (dict/list) message."""
        if self._closing or self._closed or self._ws.state is not ConnectionState.OPEN:
            self.server.stats.send_fail += 1
            return NOT_SENT
        return self._write_checked(self._encode(data))

    def ping(self, payload: bytes = b"") -> None:
        if self._ws.state is ConnectionState.OPEN:
            self._send_event(Ping(payload=payload))

    # ----- closing ----------------------------------------------------------------
    def _start_close(self) -> None:
        if self._ws.state is ConnectionState.OPEN:
            self._send_event(CloseConnection(code=self._drain_code))
            self._close_since = self.server.tick  # wait for the peer's close frame
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
