"""server_core: a Workerman-like asyncio framework for socket-server worker processes.

    from server_core import Worker

    worker = Worker("http://0.0.0.0:8080")   # also ws://, tcp://, text://, frame://

    @worker.on_message
    async def hello(conn, request):
        return "hello"

    worker.run()

Stand-alone: it imports nothing from svcd's supervisor or agent; it speaks the systemd
socket-activation and sd_notify protocols, so any such supervisor can run it.

Importing it loads no protocol: `HttpConnection` and `WebSocketConnection` are imported
on first access (PEP 562), and a running Worker imports only the protocol of its scheme
(`server_core.protocols.connection_class`), so that a new worker is ready sooner.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from server_core.connection import Connection, Sent
from server_core.protocols.http_message import Request, Response
from server_core.stats import Counter, Gauge
from server_core.timers import Timer
from server_core.worker import Worker

if TYPE_CHECKING:
    from server_core.protocols.http import HttpConnection
    from server_core.protocols.websocket import WebSocketConnection

# Public names whose modules are imported only when someone asks for them.
_LAZY = {
    "HttpConnection": "server_core.protocols.http",
    "WebSocketConnection": "server_core.protocols.websocket",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


__all__ = [
    "Connection",
    "Counter",
    "Gauge",
    "HttpConnection",
    "Request",
    "Response",
    "Sent",
    "Timer",
    "WebSocketConnection",
    "Worker",
]
