"""Newline-delimited text (`text://`): one message per line.

`on_message` gets the line as `str` without its ending (`\\n` or `\\r\\n`); invalid UTF-8
is replaced, not fatal. `send(str)` appends `\\n` unless the data already ends with one.

Invariants: a line longer than `max_package_size` is refused (the connection is dropped
and `on_error` hears why) as soon as the buffer passes the limit, so a peer that never
sends a newline holds at most max_package_size plus one read; every byte is scanned for
a newline once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from server_core.connection import MessageConnection, ProtocolViolation
from server_core.protocols.tcp import as_bytes

if TYPE_CHECKING:
    from server_core.server import Server


class TextConnection(MessageConnection):
    """Newline-delimited text."""

    __slots__ = ("_buffer",)

    def __init__(self, server: Server) -> None:
        super().__init__(server)
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.stats.bytes_in += len(data)
        if self._closing:
            return
        buffer = self._buffer
        scan = len(buffer)  # what is already buffered holds no newline
        buffer += data
        start = 0
        limit = self.server.max_package_size
        while True:
            end = buffer.find(b"\n", scan)
            if end < 0:
                break
            stop = end - 1 if end > start and buffer[end - 1] == 0x0D else end
            if stop - start > limit:
                self._refuse()
                return
            line = buffer[start:stop].decode("utf-8", "replace")
            start = scan = end + 1
            self._dispatch(line)
            if self._closing or self._closed:
                return
        if start:
            del buffer[:start]
        if len(buffer) > limit:
            self._refuse()

    def _refuse(self) -> None:
        self._buffer = bytearray()
        self.server.report_error(self, ProtocolViolation("text: line too long"))
        self._abort()

    def _encode(self, data: Any) -> bytes:
        payload = as_bytes(data)
        return payload if payload.endswith(b"\n") else payload + b"\n"
