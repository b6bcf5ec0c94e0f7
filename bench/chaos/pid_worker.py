"""Chaos-suite worker: HTTP/1.1 keep-alive, `GET /` answers this process's pid.

The pid in every response lets the load client tell which worker served (and which
worker held) each connection, so a failure can be traced to a killed worker or not.
`GET /healthz` answers `ok` for svcd's http health check.
"""

from __future__ import annotations

import os

from server_core import Request, Response, Worker


def main() -> None:
    worker = Worker("http://127.0.0.1:8080")

    @worker.on_message
    async def answer(conn: object, request: Request) -> str | Response:
        if request.path == "/healthz":
            return Response("ok\n")
        return f"{os.getpid()}\n"

    worker.run()


if __name__ == "__main__":
    main()
