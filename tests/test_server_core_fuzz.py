"""Fuzz the HTTP and frame parsers: any bytes get a response or a close, never a crash.

The worker runs on uvloop in a thread of the test process, with an exception handler
that records anything that escapes into the event loop (a crash of a real worker);
hypothesis feeds each example to a fresh connection and half-closes it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_core import Connection, Request, Worker
from tests.test_server_core_support import listening_socket

pytestmark = pytest.mark.timeout(300)

IO_TIMEOUT = 10.0
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class ThreadedWorker:
    """A Worker serving in its own uvloop thread; `escaped` collects loop errors."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.sock = listening_socket()
        self.port = int(self.sock.getsockname()[1])
        self.escaped: list[dict[str, Any]] = []
        self.handler_errors = 0
        self.loop = uvloop.new_event_loop()
        self.loop.set_exception_handler(lambda loop, context: self.escaped.append(context))
        worker.on_error(self._count_error)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.started = threading.Event()

    def _count_error(self, conn: Connection, exc: BaseException) -> None:
        self.handler_errors += 1

    def _run(self) -> None:
        async def main() -> None:
            task = asyncio.create_task(self.worker.serve([self.sock]))
            await self.worker.wait_started()
            self.started.set()
            await task

        self.loop.run_until_complete(main())
        self.loop.close()

    def __enter__(self) -> ThreadedWorker:
        self.thread.start()
        assert self.started.wait(IO_TIMEOUT), "worker did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.worker.stop)
        self.thread.join(IO_TIMEOUT)
        assert not self.thread.is_alive()

    def exchange(self, data: bytes) -> bytes:
        """Send `data`, half-close, read until the server closes (bounded)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=IO_TIMEOUT) as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError:  # the server may already have refused and closed
                pass
            chunks = []
            while True:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)


@pytest.fixture(scope="module")
def http_worker() -> Iterator[ThreadedWorker]:
    worker = Worker("http://127.0.0.1:0", max_header_bytes=2048, max_body_bytes=4096)

    @worker.on_message
    async def handle(conn: Connection, request: Request) -> Any:
        if request.path.startswith("/json"):
            return {"n": len(request.body), "h": len(request.headers)}
        return request.body or "hello"

    with ThreadedWorker(worker) as threaded:
        yield threaded


@pytest.fixture(scope="module")
def frame_worker() -> Iterator[ThreadedWorker]:
    worker = Worker("frame://127.0.0.1:0", max_package_size=1024)

    @worker.on_message
    def echo(conn: Connection, payload: bytes) -> bytes:
        return payload

    with ThreadedWorker(worker) as threaded:
        yield threaded


token = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=12)
header_line = st.builds(
    lambda name, value: f"{name}: {value}\r\n",
    st.one_of(token, st.sampled_from(["Content-Length", "Transfer-Encoding", "Connection",
                                      "Upgrade", "Expect", "Host"])),
    st.one_of(token, st.sampled_from(["chunked", "close", "keep-alive", "100-continue",
                                      "websocket", "5", "-1", "99999999999"])),
)
request_like = st.builds(
    lambda method, path, version, headers, body: (
        f"{method} {path} {version}\r\n{''.join(headers)}\r\n".encode() + body
    ),
    st.sampled_from(["GET", "POST", "HEAD", "PUT", "BREW", "get", ""]),
    st.one_of(st.just("/"), st.just("/json?a=1"), token.map(lambda t: "/" + t)),
    st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 extra", ""]),
    st.lists(header_line, max_size=6),
    st.binary(max_size=300),
)
http_input = st.one_of(
    st.binary(max_size=3000),
    request_like,
    st.lists(request_like, min_size=2, max_size=4).map(b"".join),  # pipelined
    st.tuples(request_like, st.binary(max_size=50)).map(lambda t: t[0] + t[1]),
)


@FUZZ
@given(data=http_input)
def test_http_parser_survives_any_input(http_worker: ThreadedWorker, data: bytes) -> None:
    reply = http_worker.exchange(data)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 "), reply[:80]
    assert http_worker.escaped == []


def test_http_worker_still_serves_after_fuzzing(http_worker: ThreadedWorker) -> None:
    reply = http_worker.exchange(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b"hello")
    assert http_worker.escaped == []


def frames(payloads: list[bytes]) -> bytes:
    return b"".join((len(p) + 4).to_bytes(4, "big") + p for p in payloads)


frame_input = st.one_of(
    st.binary(max_size=3000),
    st.lists(st.binary(max_size=1200), max_size=5).map(frames),
    st.tuples(st.lists(st.binary(max_size=300), max_size=3).map(frames), st.binary(max_size=20))
    .map(lambda t: t[0] + t[1]),
)


@FUZZ
@given(data=frame_input)
def test_frame_parser_survives_any_input(frame_worker: ThreadedWorker, data: bytes) -> None:
    reply = frame_worker.exchange(data)
    # whatever came back is a sequence of well-formed frames echoing a prefix of the input
    position = 0
    while position < len(reply):
        total = int.from_bytes(reply[position : position + 4], "big")
        assert 4 <= total <= 1024 + 4
        position += total
    assert position == len(reply)
    assert data.startswith(reply)
    assert frame_worker.escaped == []


def test_frame_worker_still_serves_after_fuzzing(frame_worker: ThreadedWorker) -> None:
    assert frame_worker.exchange(frames([b"still here"])) == frames([b"still here"])
