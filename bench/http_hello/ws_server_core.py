"""server_core's WebSocket echo for the ws bench: `python ws_server_core.py PORT`."""

from __future__ import annotations

import sys

from server_core import Worker

worker = Worker(f"ws://127.0.0.1:{int(sys.argv[1])}")


@worker.on_message
async def echo(conn: object, message: str | bytes) -> str | bytes:
    return message


worker.run()
