"""Helpers for the server_core tests (no tests here): serve a Worker in the test's loop,
read raw HTTP responses, spawn a worker process with socket activation."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from server_core import Worker

REPO = Path(__file__).resolve().parent.parent
STEP_TIMEOUT = 10.0


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_server((host, 0), backlog=128)
    return sock


@contextlib.asynccontextmanager
async def serving(worker: Worker, probe: socket.socket | None = None) -> AsyncIterator[int]:
    """Run `worker` on a fresh 127.0.0.1 port in this loop; yield the port; stop it after.

    `probe`: a listening socket the worker serves as a health-check listener too.
    """
    sock = listening_socket()
    port = int(sock.getsockname()[1])
    probes = [] if probe is None else [probe]
    task = asyncio.create_task(worker.serve([sock], probes=probes))
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            done, _ = await asyncio.wait(
                [task, asyncio.ensure_future(worker.wait_started())],
                return_when=asyncio.FIRST_COMPLETED,
            )
        if task in done:
            task.result()  # raises what serve raised
        yield port
    finally:
        worker.stop()
        async with asyncio.timeout(STEP_TIMEOUT):
            with contextlib.suppress(asyncio.CancelledError):
                await task


@dataclass
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes


async def read_reply(reader: asyncio.StreamReader, head_only: bool = False) -> HttpReply:
    """One HTTP/1.1 response with a Content-Length body (what server_core sends)."""
    async with asyncio.timeout(STEP_TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = b"" if head_only or length == 0 else await reader.readexactly(length)
        return HttpReply(status, headers, body)


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(STEP_TIMEOUT):
        return await reader.read()


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    async with asyncio.timeout(STEP_TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def get(path: str = "/", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


# The launcher puts the given fds at 3, 4, ... and sets LISTEN_PID to its own pid,
# which stays the worker's pid across exec (what svcd's spawn does).
LAUNCHER = """
import os, sys
fds = [int(x) for x in sys.argv[1].split(",")] if sys.argv[1] else []
tmp = [os.dup(fd) for fd in fds]
for i, fd in enumerate(tmp):
    os.dup2(fd, 3 + i)
    os.set_inheritable(3 + i, True)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


def spawn_activated(
    argv: Sequence[str],
    sockets: Sequence[tuple[str, socket.socket]],
    notify_path: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `python argv...` with `sockets` inherited from fd 3, as svcd would."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY"))}
    child_env["LISTEN_FDS"] = str(len(sockets))
    child_env["LISTEN_FDNAMES"] = ":".join(name for name, _ in sockets)
    child_env["PYTHONPATH"] = str(REPO)
    if notify_path:
        child_env["NOTIFY_SOCKET"] = notify_path
    child_env.update(env or {})
    fds = [s.fileno() for _, s in sockets]
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, ",".join(map(str, fds)), *argv],
        env=child_env,
        pass_fds=fds,
        cwd=REPO,
    )


class NotifyListener:
    """A unix datagram socket standing in for the supervisor's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def poll(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return self.messages
            self.messages.append(data.decode())

    def seen(self, prefix: str) -> list[str]:
        return [
            line
            for message in self.poll()
            for line in message.split("\n")
            if line.startswith(prefix)
        ]

    def close(self) -> None:
        self.sock.close()


def stop_process(proc: subprocess.Popen[bytes], timeout: float = STEP_TIMEOUT) -> int:
    """SIGTERM, bounded wait, SIGKILL: always reaps."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout)
