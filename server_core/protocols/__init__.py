"""Wire protocols: which Connection class serves which listen scheme.

Invariant: importing this package imports no protocol module. A worker imports only the
protocol it serves, when its `Server` asks `connection_class(scheme)`: an http:// worker
never loads the WebSocket machinery, a tcp:// one not even httptools. Start-up time is
reload and restart latency (a new worker must be ready fast), and the `websockets`
package alone costs more than the rest of server_core to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server_core.connection import Connection

SCHEMES = frozenset(("http", "ws", "tcp", "text", "frame"))


def connection_class(scheme: str) -> type[Connection]:
    """The Connection class serving `scheme`, importing its protocol module on first use.

    Raises ValueError for a scheme not in `SCHEMES`; ImportError when the protocol's
    dependency is missing (the worker fails at start, not at its first connection).
    """
    if scheme in ("http", "ws"):
        from server_core.protocols.http import HttpConnection

        if scheme == "ws":
            # ws:// starts as HTTP and upgrades; load the WebSocket side now, so the
            # first handshake does not pay for the import.
            from server_core.protocols import websocket  # noqa: F401
        return HttpConnection
    if scheme == "tcp":
        from server_core.protocols.tcp import TcpConnection

        return TcpConnection
    if scheme == "text":
        from server_core.protocols.text import TextConnection

        return TextConnection
    if scheme == "frame":
        from server_core.protocols.frame import FrameConnection

        return FrameConnection
    raise ValueError(f"no protocol for scheme {scheme!r}")
