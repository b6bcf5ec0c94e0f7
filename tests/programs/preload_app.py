"""A server_core worker that tells how it was made, for the preload tests.

`GET /` answers JSON: its pid, the pid of the process that imported this module (the
preload template when forked, itself when exec'd) and its SVCD_WORKER/SVCD_GENERATION.
When the file named by $FAIL_IF_EXISTS exists, importing fails (a broken deploy);
$SLOW_IMPORT seconds make importing slow. With $ATEXIT_LOG set, the importing process
registers an atexit handler that appends its pid there (who runs the template's
handlers at exit).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time

from server_core import Request, Response, Worker

IMPORTED_IN = os.getpid()
if atexit_log := os.environ.get("ATEXIT_LOG"):
    def _record_exit(path: str = atexit_log) -> None:
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")

    atexit.register(_record_exit)
time.sleep(float(os.environ.get("SLOW_IMPORT", "0")))  # an app that takes long to load

if os.path.exists(os.environ.get("FAIL_IF_EXISTS", "/nonexistent")):
    sys.exit("preload_app: broken on purpose")


def main() -> None:
    worker = Worker("http://127.0.0.1:0")

    @worker.on_message
    async def answer(conn: object, request: Request) -> str | Response:
        if request.path == "/healthz":
            return Response("ok\n")
        return json.dumps({
            "pid": os.getpid(),
            "imported_in": IMPORTED_IN,
            "worker": os.environ.get("SVCD_WORKER"),
            "generation": os.environ.get("SVCD_GENERATION"),
        })

    worker.run()


if __name__ == "__main__":
    main()
