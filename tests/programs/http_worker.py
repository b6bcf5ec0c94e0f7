"""A tiny stdlib-only socket-activation HTTP worker for the supervisor's tests.

It speaks the two protocols svcd expects from any worker:
- systemd socket activation: serves every inherited fd from 3 (LISTEN_FDS, checked
  against LISTEN_PID like sd_listen_fds does), the service's listeners and the private
  `svcd-health` one alike;
- sd_notify: READY=1 once serving, X_SVCD_STATS with connection/request counts,
  WATCHDOG=1 when WATCHDOG_USEC is set.

`GET /` answers the worker's pid; `GET /healthz` answers 200 (500 while the file named
by `--health-fail-file` exists). SIGTERM stops accepting, finishes in-flight requests and
exits 0. Command-line flags turn it into the misbehaving variants the tests need.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time

SD_LISTEN_FDS_START = 3
STATS_INTERVAL = 0.2
DRAIN_TIMEOUT = 10.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--exit-code", type=int, default=None, help="exit with this code at once")
    p.add_argument("--fail-worker", type=int, default=None, help="exit 1 if SVCD_WORKER is N")
    p.add_argument("--crash-after", type=float, default=None, help="exit 1 after N seconds")
    p.add_argument("--ignore-term", action="store_true", help="ignore SIGTERM")
    p.add_argument("--never-ready", action="store_true", help="never send READY=1")
    p.add_argument("--ready-delay", type=float, default=0.0, help="wait before READY=1")
    p.add_argument("--no-watchdog", action="store_true", help="never send WATCHDOG=1")
    p.add_argument("--fork-child", action="store_true", help="fork a child that lingers")
    p.add_argument("--health-fail-file", default="", help="/healthz fails while it exists")
    p.add_argument("--alloc-mb", type=int, default=0, help="allocate this much memory")
    p.add_argument("--notify-to", default="", help="send READY=1 to this path, not ours")
    p.add_argument("--response-delay", type=float, default=0.0, help="sleep per request")
    return p.parse_args()


def notify(message: str, path: str | None = None) -> None:
    target = path if path is not None else os.environ.get("NOTIFY_SOCKET", "")
    if not target:
        return
    if target.startswith("@"):
        target = "\0" + target[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(message.encode(), target)
        except OSError as exc:
            print(f"notify failed: {exc}", file=sys.stderr, flush=True)


def inherited_sockets() -> list[socket.socket]:
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    return [socket.socket(fileno=SD_LISTEN_FDS_START + i) for i in range(count)]


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.connections = 0
        self.requests = 0
        self.stopping = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            request_line = await reader.readline()
            while True:  # skip headers
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
            parts = request_line.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            if self.args.response_delay:
                await asyncio.sleep(self.args.response_delay)
            status = "200 OK"
            if path.startswith("/healthz"):
                failing = self.health_failing()
                status = "500 Internal Server Error" if failing else "200 OK"
                body = b"fail\n" if failing else b"ok\n"
            else:
                body = f"{os.getpid()}\n".encode()
            self.requests += 1
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.connections -= 1
            writer.close()

    def health_failing(self) -> bool:
        return bool(self.args.health_fail_file) and os.path.exists(self.args.health_fail_file)

    async def report(self) -> None:
        watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        watchdog_every = watchdog_usec / 2e6 if watchdog_usec else 0.0
        last_ping = 0.0
        while True:
            stats = {"connections": self.connections, "requests": self.requests}
            notify("X_SVCD_STATS=" + json.dumps(stats))
            now = time.monotonic()
            if watchdog_every and not self.args.no_watchdog and now - last_ping >= watchdog_every:
                notify("WATCHDOG=1")
                last_ping = now
            interval = min(STATS_INTERVAL, watchdog_every) if watchdog_every else STATS_INTERVAL
            await asyncio.sleep(interval)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        if self.args.ignore_term:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        servers = [
            await asyncio.start_server(self.handle, sock=s) for s in inherited_sockets()
        ]
        reporter = asyncio.create_task(self.report())
        if self.args.crash_after is not None:
            loop.call_later(self.args.crash_after, os._exit, 1)
        if self.args.ready_delay:
            await asyncio.sleep(self.args.ready_delay)
        if self.args.notify_to:
            notify("READY=1", self.args.notify_to)
        elif not self.args.never_ready:
            notify("READY=1")
        await self.stopping.wait()
        notify("STOPPING=1")
        # Stop accepting first, let connections accepted a moment ago attach to their
        # server, and only then close it: on Python 3.11, Server.close() while an
        # accepted connection's _accept_connection2 task has not run yet trips
        # `assert self._sockets is not None` in Server._attach and drops (resets) it.
        for server in servers:
            for sock in server.sockets:
                loop.remove_reader(sock.fileno())
        await asyncio.sleep(0)
        for server in servers:
            server.close()  # the socket lives on in the agent and in the other workers
        # finish everything in flight, including connections accepted a moment ago
        # whose handler has not started yet (they are tasks too)
        me = asyncio.current_task()
        deadline = loop.time() + DRAIN_TIMEOUT
        while loop.time() < deadline:
            others = [t for t in asyncio.all_tasks() if t is not me and t is not reporter]
            if not others:
                break
            await asyncio.wait(others, timeout=deadline - loop.time())
        reporter.cancel()
        return 0


def fork_child() -> None:
    pid = os.fork()
    if pid == 0:
        # the lingering grandchild: ignores SIGTERM like a careless helper would
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(3600)
    notify(f"STATUS=child={pid}")
    print(f"child={pid}", flush=True)


def main() -> int:
    args = parse_args()
    if args.fail_worker is not None and os.environ.get("SVCD_WORKER") == str(args.fail_worker):
        print(f"worker {args.fail_worker} fails on purpose", file=sys.stderr, flush=True)
        return 1
    if args.exit_code is not None:
        print(f"exiting with {args.exit_code}", file=sys.stderr, flush=True)
        return int(args.exit_code)
    ballast = bytearray(args.alloc_mb * 1024 * 1024)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1  # touch every page so it counts in RSS
    if args.fork_child:
        fork_child()
    print(f"worker {os.environ.get('SVCD_WORKER')} pid {os.getpid()} serving", flush=True)
    return asyncio.run(Worker(args).run())


if __name__ == "__main__":
    sys.exit(main())
