"""A server_core HTTP worker that answers its pid (`GET /healthz`: `ok`).

The same shape as examples/hello.py, but a load client can tell which worker served
each request, so a reload test can check that every worker was replaced.
"""

from __future__ import annotations

import os

from server_core import Request, Response, Worker


def main() -> None:
    worker = Worker("http://127.0.0.1:0")

    @worker.on_message
    async def answer(conn: object, request: Request) -> str | Response:
        if request.path == "/healthz":
            return Response("ok\n")
        return f"{os.getpid()}\n"

    worker.run()


if __name__ == "__main__":
    main()
