"""Run an ASGI app with uvicorn on the sockets svcd (or systemd) passes: the launcher.

    python uvicorn_launcher.py [--drain-grace S] [--drain-timeout S] module:app

Why not `uvicorn --fd 3`: uvicorn wraps that fd with `socket.fromfd(fd, AF_UNIX, ...)`,
so the event loop believes it is a unix socket and never sets TCP_NODELAY on accepted
connections; behind a socket-passing supervisor that served 1.1k req/s with 40 ms
stalls instead of 53k. This launcher wraps each inherited fd with
`socket.socket(fileno=fd)`, which reads the real family, and hands the sockets to
`uvicorn.Server.serve(sockets=...)`.

What it does for the supervisor (the systemd protocols svcd speaks):
- sockets: every fd from 3 to 3 + LISTEN_FDS - 1 when LISTEN_PID is our pid (the
  service's listeners and svcd's private `svcd-health` one alike);
- readiness: `READY=1` to NOTIFY_SOCKET once uvicorn's startup (lifespan included) is
  done and every socket is served, so `ready = "notify"` is exact;
- stats: `X_SVCD_STATS` (open connections, requests) once a second; `WATCHDOG=1` every
  WATCHDOG_USEC / 2 when the supervisor asks for it;
- drain on SIGTERM/SIGINT: `STOPPING=1`, stop accepting, then for up to `--drain-grace`
  seconds every response says `connection: close` (so busy keep-alive clients leave
  after their current request instead of racing a close), then uvicorn's own graceful
  shutdown (idle connections closed, in-flight requests finished within
  `--drain-timeout`, or SVCD_DRAIN_TIMEOUT when the supervisor sets a smaller one);
  exit 0.

Stand-alone on purpose (stdlib + uvicorn only): copy it next to your app.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn
from uvicorn.importer import import_from_string

SD_LISTEN_FDS_START = 3
STATS_INTERVAL = 1.0  # seconds between X_SVCD_STATS reports
DRAIN_POLL = 0.02  # seconds between checks for "every connection has left" in the grace
DEFAULT_DRAIN_GRACE = 1.0  # like server_core: busy keep-alive clients get one more answer
DEFAULT_DRAIN_TIMEOUT = 20.0  # uvicorn's bound on in-flight requests once the grace is over
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def inherited_sockets() -> list[socket.socket]:
    """The socket-activation fds as sockets of their real family; [] when none for us."""
    pid, count = os.environ.pop("LISTEN_PID", ""), os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if not count or pid != str(os.getpid()):
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        sock = socket.socket(fileno=fd)  # not fromfd(fd, AF_UNIX): keep AF_INET's TCP options
        sock.set_inheritable(False)
        sockets.append(sock)
    return sockets


class Notifier:
    """sd_notify datagrams to NOTIFY_SOCKET; a no-op without one; never raises."""

    def __init__(self) -> None:
        target = os.environ.pop("NOTIFY_SOCKET", "")
        self.address = "\0" + target[1:] if target.startswith("@") else target
        self.sock: socket.socket | None = None
        if target:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.setblocking(False)

    def send(self, message: str) -> None:
        if self.sock is not None:
            # a full or gone receiver costs this one message only
            with contextlib.suppress(OSError):
                self.sock.sendto(message.encode(), self.address)


class DrainAware:
    """ASGI wrapper: while draining, every response carries `connection: close`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.draining = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.draining or scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, closing_send)


class SupervisedServer(uvicorn.Server):
    """uvicorn's Server plus READY/STOPPING/stats and the connection: close grace."""

    def __init__(self, config: uvicorn.Config, app: DrainAware, notifier: Notifier,
                 drain_grace: float) -> None:
        super().__init__(config)
        self.drain_app = app
        self.notifier = notifier
        self.drain_grace = drain_grace
        self.reporter: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            self.notifier.send("READY=1\nSTATUS=serving")
            self.reporter = asyncio.create_task(self.report())

    async def report(self) -> None:
        watchdog_usec = int(os.environ.pop("WATCHDOG_USEC", "0") or 0)
        os.environ.pop("WATCHDOG_PID", None)
        ping_every = watchdog_usec / 2e6 if watchdog_usec > 0 else None
        last_stats = last_ping = 0.0
        while True:
            now = time.monotonic()
            if now - last_stats >= STATS_INTERVAL:
                state = self.server_state
                stats = {"connections": len(state.connections), "requests": state.total_requests}
                self.notifier.send("X_SVCD_STATS=" + json.dumps(stats))
                last_stats = now
            if ping_every is not None and now - last_ping >= ping_every:
                self.notifier.send("WATCHDOG=1")
                last_ping = now
            await asyncio.sleep(min(STATS_INTERVAL, ping_every or STATS_INTERVAL))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.notifier.send("STOPPING=1")
        for server in self.servers:
            server.close()  # closes our copy only: the agent and other workers keep theirs
        self.drain_app.draining = True
        deadline = time.monotonic() + self.drain_grace
        # uvicorn has no "connection closed" hook to wait on: poll its connection set
        while self.server_state.connections and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL)
        await super().shutdown(sockets=None)  # closes idle connections, waits for the rest
        if self.reporter is not None:
            self.reporter.cancel()


def drain_timeout(configured: float) -> float:
    """The flag and SVCD_DRAIN_TIMEOUT (when the supervisor sets it): the smaller wins."""
    raw = os.environ.get("SVCD_DRAIN_TIMEOUT", "")
    try:
        return min(configured, float(raw)) if raw else configured
    except ValueError:
        return configured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("app", help="the ASGI app, module:attribute")
    parser.add_argument("--app-dir", default=".", help="put this directory on sys.path")
    parser.add_argument("--drain-grace", type=float, default=DEFAULT_DRAIN_GRACE)
    parser.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()

    sockets = inherited_sockets()
    if not sockets:
        print("uvicorn_launcher: no inherited sockets (LISTEN_FDS) for this process: "
              "run it under svcd or systemd socket activation", file=sys.stderr)
        return 1
    sys.path.insert(0, os.path.abspath(args.app_dir))
    app = DrainAware(import_from_string(args.app))
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="auto",
        access_log=False,
        log_level=args.log_level,
        timeout_graceful_shutdown=math.ceil(drain_timeout(args.drain_timeout)),  # typed int
    )
    server = SupervisedServer(config, app, Notifier(), args.drain_grace)
    # uvicorn re-raises the stop signal once serve() returns (to chain to the previous
    # handler); with the default handler that would kill us by SIGTERM after a clean
    # drain. A no-op previous handler turns it into a plain exit 0.
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda _signum, _frame: None)
    server.run(sockets=sockets)
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
