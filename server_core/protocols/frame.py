"""Length-prefixed frames (`frame://`), Workerman's Frame protocol.

A frame is a 4-byte big-endian unsigned length, which counts the 4 header bytes too,
followed by the payload. `on_message` gets the payload as `bytes`; `send(bytes|str)`
adds the header.

Invariants: a declared length below 4 or above `max_package_size + 4` is refused at
once, before the payload is buffered (the connection is dropped and `on_error` hears
why); the buffer of one connection never exceeds one frame plus one read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from server_core.connection import MessageConnection, ProtocolViolation
from server_core.protocols.tcp import as_bytes

if TYPE_CHECKING:
    from server_core.server import Server

HEADER = 4


def encode_frame(payload: bytes) -> bytes:
    return (len(payload) + HEADER).to_bytes(HEADER, "big") + payload


class FrameConnection(MessageConnection):
    """Length-prefixed frames."""

    __slots__ = ("_buffer",)

    def __init__(self, server: Server) -> None:
        super().__init__(server)
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.stats.bytes_in += len(data)
        if self._closing:
            return
        buffer = self._buffer
        buffer += data
        size = len(buffer)
        start = 0
        limit = self.server.max_package_size + HEADER
        while size - start >= HEADER:
            total = int.from_bytes(buffer[start : start + HEADER], "big")
            if total < HEADER or total > limit:
                self._refuse(f"frame length {total} outside {HEADER}..{limit}")
                return
            if size - start < total:
                break
            payload = bytes(buffer[start + HEADER : start + total])
            start += total
            self._dispatch(payload)
            if self._closing or self._closed:
                return
        if start:
            del buffer[:start]

    def _refuse(self, reason: str) -> None:
        self._buffer = bytearray()
        self.server.report_error(self, ProtocolViolation(f"frame: {reason}"))
        self._abort()

    def _encode(self, data: Any) -> bytes:
        return encode_frame(as_bytes(data))
