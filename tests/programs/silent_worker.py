"""A socket-activation worker that accepts TCP on every inherited fd and stops answering.

The misbehaviour an HTTP health check exists for: the port is open (the agent's
backlog, then this process, accept the connection), READY=1 was sent, yet no request
gets a byte back. A tcp check would pass; only an http (or grpc) check with a timeout
finds it. Without `--silent-file` it never answers; with it, it answers every request
`200 ok` until that file exists, then never again (so a test knows when it went quiet).

`--only-worker N`: only worker index N (SVCD_WORKER) is silent; every other worker
execs the stdlib test worker (tests/programs/http_worker.py) with the remaining
arguments, so one service can hold a silent worker beside healthy ones.

SIGTERM exits 0 at once (there is nothing to drain: no request is ever in flight).
Stdlib only; every loop is bounded by the process's lifetime (SIGTERM or SIGKILL).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

SD_LISTEN_FDS_START = 3
HTTP_WORKER = Path(__file__).with_name("http_worker.py")
#: Bytes read per recv from a client: whatever it sends is read and ignored.
READ_CHUNK = 4096
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"


def notify(message: str) -> None:
    target = os.environ.get("NOTIFY_SOCKET", "")
    if not target:
        return
    if target.startswith("@"):
        target = "\0" + target[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), target)


def inherited_sockets() -> list[socket.socket]:
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    return [socket.socket(fileno=SD_LISTEN_FDS_START + i) for i in range(count)]


class Handler:
    def __init__(self, silent_file: str) -> None:
        self.silent_file = silent_file

    def silent(self) -> bool:
        return not self.silent_file or os.path.exists(self.silent_file)

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not self.silent():
                await reader.readuntil(b"\r\n\r\n")
                if not self.silent():
                    writer.write(OK)
                    await writer.drain()
                    return
            # read whatever the client sends, answer nothing, keep the connection open
            while await reader.read(READ_CHUNK):
                pass
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


async def serve(silent_file: str) -> int:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    handler = Handler(silent_file)
    servers = [await asyncio.start_server(handler, sock=s) for s in inherited_sockets()]
    notify("READY=1")
    print(f"silent worker {os.environ.get('SVCD_WORKER')} pid {os.getpid()}", flush=True)
    await stop.wait()
    for server in servers:
        server.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only-worker", type=int, default=None)
    parser.add_argument("--silent-file", default="", help="answer until this file exists")
    args, rest = parser.parse_known_args()
    if args.only_worker is not None and os.environ.get("SVCD_WORKER") != str(args.only_worker):
        # exec keeps the pid, so LISTEN_PID still names this process
        os.execv(sys.executable, [sys.executable, str(HTTP_WORKER), *rest])
    return asyncio.run(serve(args.silent_file))


if __name__ == "__main__":
    sys.exit(main())
