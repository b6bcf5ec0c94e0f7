"""server_core: a Workerman-like asyncio framework for socket-server worker processes.

    from server_core import Worker

    worker = Worker("http://0.0.0.0:8080")   # also ws://, tcp://, text://, frame://

    @worker.on_message
    async def hello(conn, request):
        return "hello"

    worker.run()

Stand-alone: it imports nothing from svcd's supervisor or agent; it speaks the systemd
socket-activation and sd_notify protocols, so any such supervisor can run it.
"""

from server_core.connection import Connection, Sent
from server_core.protocols.http import HttpConnection
from server_core.protocols.http_message import Request, Response
from server_core.protocols.websocket import WebSocketConnection
from server_core.stats import Counter, Gauge
from server_core.timers import Timer
from server_core.worker import Worker

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
