"""Raw TCP (`tcp://`): every chunk the socket delivers is one message.

`on_message` gets `bytes` exactly as read (no framing: a message boundary of the
sender is not preserved); `send` writes bytes, or a str encoded as UTF-8, unchanged.
"""

from __future__ import annotations

from typing import Any

from server_core.connection import MessageConnection


def as_bytes(data: Any) -> bytes:
    """str (UTF-8) or bytes-like as bytes; anything else is a TypeError."""
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"cannot send a {type(data).__name__}: give str or bytes")


class TcpConnection(MessageConnection):
    """Raw TCP: each received chunk is a message."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self.stats.bytes_in += len(data)
        if not self._closing:
            self._dispatch(data)

    def _encode(self, data: Any) -> bytes:
        return as_bytes(data)
