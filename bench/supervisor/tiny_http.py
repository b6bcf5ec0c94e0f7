"""The stdlib test worker (tests/programs/http_worker.py) for peers without socket activation.

svcd runs tests/programs/http_worker.py itself; the peers cannot set LISTEN_PID to the
worker's pid, so this wrapper hands the very same worker code a socket it got another
way, keeping the program (and its start-up cost) identical across supervisors:

    tiny_http.py --port P   bind 127.0.0.1:P itself (supervisord, PM2 fork mode)
    tiny_http.py --fd N     serve inherited fd N (circus's own sockets)

`GET /` answers the worker's pid.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "programs"))

import http_worker  # type: ignore[import-not-found]

BACKLOG = 1024


def main() -> int:
    parser = argparse.ArgumentParser()
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--port", type=int)
    group.add_argument("--fd", type=int)
    args, rest = parser.parse_known_args()
    if args.fd is not None:
        sock = socket.socket(fileno=args.fd)
    else:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", args.port))
        sock.listen(BACKLOG)
    http_worker.inherited_sockets = lambda: [sock]
    sys.argv = [sys.argv[0], *rest]
    return int(http_worker.main())


if __name__ == "__main__":
    sys.exit(main())
