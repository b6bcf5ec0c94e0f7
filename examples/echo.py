"""TCP echo: `python examples/echo.py [--listen tcp://0.0.0.0:8070]`, then `nc localhost 8070`.

Every chunk a client sends comes back unchanged. Use text:// for a line-based echo
(each line answered as a line) or frame:// for length-prefixed messages.
"""

from __future__ import annotations

import argparse

from server_core import Connection, Worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="tcp://0.0.0.0:8070")
    parser.add_argument("--count", type=int, default=1, help="processes when run alone")
    args = parser.parse_args()
    worker = Worker(args.listen, count=args.count)

    @worker.on_message
    def echo(conn: Connection, data: bytes | str) -> bytes | str:
        return data

    worker.run()


if __name__ == "__main__":
    main()
