"""server_core's side: the SPEC's example, an async handler returning `hello`.

`python server_core_app.py PORT` (one process, uvloop).
"""

from __future__ import annotations

import sys

from server_core import Worker

worker = Worker(f"http://127.0.0.1:{int(sys.argv[1])}")


@worker.on_message
async def hello(conn: object, request: object) -> str:
    return "hello"


worker.run()
