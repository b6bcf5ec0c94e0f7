"""HTTP hello: `python examples/hello.py [--count N] [--listen URL]`.

`GET /healthz` answers `ok` (what svcd's http health check asks); anything else `hello`.
Under svcd it serves the inherited sockets; alone it binds --listen itself.
"""

from __future__ import annotations

import argparse

from server_core import Request, Response, Worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="http://0.0.0.0:8080")
    parser.add_argument("--count", type=int, default=1, help="processes when run alone")
    args = parser.parse_args()

    worker = Worker(args.listen, count=args.count)
    hits = worker.counter("hello_requests_total", {"route": "hello"})

    @worker.on_message
    async def hello(conn: object, request: Request) -> str | Response:
        if request.path == "/healthz":
            return Response("ok\n")
        hits.inc()
        return "hello"

    worker.run()


if __name__ == "__main__":
    main()
