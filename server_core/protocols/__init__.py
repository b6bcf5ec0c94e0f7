"""Wire protocols: which Connection class serves which listen scheme."""

from __future__ import annotations

from server_core.connection import Connection
from server_core.protocols.frame import FrameConnection
from server_core.protocols.http import HttpConnection
from server_core.protocols.tcp import TcpConnection
from server_core.protocols.text import TextConnection

# ws:// starts as HTTP: the upgrade turns the connection into a WebSocketConnection.
CONNECTION_CLASSES: dict[str, type[Connection]] = {
    "http": HttpConnection,
    "ws": HttpConnection,
    "tcp": TcpConnection,
    "text": TextConnection,
    "frame": FrameConnection,
}

SCHEMES = frozenset(CONNECTION_CLASSES)
