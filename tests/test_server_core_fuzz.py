"""Fuzz the HTTP and frame parsers: any bytes get a response or a close, never a crash.

The worker runs on uvloop in a thread of the test process, with an exception handler
that records anything that escapes into the event loop (a crash of a real worker);
hypothesis feeds each example to a fresh connection and half-closes it.

The HTTP head cache (a chunk that repeats a memoized head skips httptools) is checked
differentially, in process: the same chunks go to a connection of a server with the
cache and to one of a server without it, and every request the handler sees, every
byte written and the connection's end state must be the same.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_core import Connection, HttpConnection, Request, Response, Worker
from server_core.protocols import http as http_protocol
from server_core.server import Server
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


# ----- the head cache, differentially ---------------------------------------------------
class RecordingTransport:
    """The transport calls an HttpConnection makes, recorded."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.eof = False
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not (self.eof or self.closed), "write after close"
        self.out += data

    def write_eof(self) -> None:
        self.eof = True

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class NeverCache(dict[bytes, Any]):
    """A head cache that never keeps anything: every chunk goes to httptools."""

    def __setitem__(self, key: bytes, value: Any) -> None:
        pass


class CountingCache(dict[bytes, Any]):
    def __init__(self) -> None:
        super().__init__()
        self.hits = 0

    def get(self, key: bytes, default: Any = None) -> Any:
        entry = super().get(key, default)
        self.hits += entry is not None
        return entry


Seen = tuple[bytes, bytes, tuple[tuple[bytes, bytes], ...], bytes, int]
_DATE = re.compile(rb"Date: [^\r]*\r\n")


class Rig:
    """A Server that is not serving (no loop runs): connections are fed by hand."""

    def __init__(self, cache: dict[bytes, Any]) -> None:
        self.seen: list[Seen] = []
        worker = Worker("http://127.0.0.1:0", max_header_bytes=2048, max_body_bytes=4096)
        worker.on_error(lambda conn, exc: None)

        @worker.on_message
        async def handle(conn: HttpConnection, request: Request) -> Any:  # never waits
            self.seen.append((
                request._method, request.url, tuple(request.raw_headers), request.body,
                request.keep_alive,
            ))
            path = request.path
            if path == "/send":
                conn.send("sent " + request.method)
                return None
            if path == "/response":
                return Response(request.body, 201, {"X-Len": str(len(request.body))})
            if path == "/json":
                return {"h": request.headers}
            if path == "/fail":
                raise RuntimeError("on purpose")
            return "hello"  # the same object each time: the cached rendered response

        self.server = Server(worker, asyncio.new_event_loop())
        self.server.head_cache = cache

    def feed(self, chunks: list[bytes], half_close: bool) -> tuple[Any, ...]:
        """Feed `chunks` to a new connection; what it did, Date lines blanked."""
        self.seen = []
        conn = HttpConnection(self.server)
        transport = RecordingTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        for chunk in chunks:
            conn.data_received(chunk)
        if half_close:
            conn.eof_received()
        stats = self.server.stats
        return (
            self.seen,
            _DATE.sub(b"Date: -\r\n", bytes(transport.out)),
            (transport.eof, transport.closed, transport.paused, conn._state),
            (stats.requests, stats.bytes_in, stats.bytes_out),
        )

    def close(self) -> None:
        self.server.loop.close()


@pytest.fixture(scope="module")
def rigs() -> Iterator[tuple[Rig, Rig]]:
    with pytest.MonkeyPatch.context() as patch:
        # every eligible miss becomes a candidate: the cache fills at once
        patch.setattr(http_protocol, "HEAD_CACHE_SAMPLING_MASK", 0)
        cached, plain = Rig(CountingCache()), Rig(NeverCache())
        yield cached, plain
        cached.close()
        plain.close()


# Requests that repeat (so the cache hits) and the unusual ones around them.
KNOWN_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /json?x=1 HTTP/1.1\r\nHost: t\r\nAccept: */*\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /send HTTP/1.1\r\n\r\n",
    b"GET /response HTTP/1.1\r\nX-A:  padded \t\r\n\r\n",
    b"GET /fail HTTP/1.1\r\n\r\n",
    b"DELETE /json HTTP/1.1\r\nhost: t\r\nHOST: u\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nConnection: Keep-Alive, Upgrade\r\nUpgrade: h2c\r\n\r\n",
    b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
    b"POST /response HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    b"POST /response HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    b"POST /response HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"POST /response HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n",
    b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: " + b"x" * 2100 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: y\r\n z\r\n\r\n",
    b"GET / HTTP/1.1\nHost: t\n\n",
    b"GET / HTTP/1.1\r\nHost: t\r\n\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\n\r\n",
    b"GE",
    b"T / HTTP/1.1\r\n\r\n",
]
known = st.sampled_from(KNOWN_REQUESTS)
chunk = st.one_of(
    known,
    known,
    st.lists(known, min_size=2, max_size=3).map(b"".join),  # pipelined
    request_like,
    st.binary(max_size=40),
)
split_chunks = st.lists(
    st.tuples(chunk, st.integers(min_value=0, max_value=60)), max_size=8
).map(lambda pairs: [part for data, at in pairs for part in _split(data, at)])


def _split(data: bytes, at: int) -> list[bytes]:
    """`data` whole (at 0 or past its end), else cut in two at `at`."""
    return [data[:at], data[at:]] if 0 < at < len(data) else [data]


@FUZZ
@given(chunks=split_chunks, half_close=st.booleans())
def test_head_cache_changes_nothing_but_speed(
    rigs: tuple[Rig, Rig], chunks: list[bytes], half_close: bool
) -> None:
    cached, plain = rigs
    assert cached.feed(chunks, half_close) == plain.feed(chunks, half_close)


def test_head_cache_replays_what_httptools_read(rigs: tuple[Rig, Rig]) -> None:
    cached, plain = rigs
    cache = cached.server.head_cache
    assert isinstance(cache, CountingCache)
    hits = cache.hits
    for _ in range(3):  # once to fill the cache, then from it
        for data in KNOWN_REQUESTS:
            for chunks in ([data], [data, data], [data + data]):
                assert cached.feed(chunks, False) == plain.feed(chunks, False), chunks
    assert cache.hits - hits >= 3 * len(KNOWN_REQUESTS) // 2


@pytest.mark.parametrize(
    ("data", "memoized"),
    [
        (b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", True),
        (b"HEAD / HTTP/1.1\r\n\r\n", True),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
        (b"POST /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n", False),  # two requests
        (b"GET / HTTP/1.1\r\n\r\nGET", False),  # and the start of another
        (b"GET / HTTP/1.1\r\nHost: t\r\n", False),  # not complete
        (b"POST /x HTTP/1.1\r\nContent-Length: 2\r\n\r\nab", False),  # a body
        (b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),  # closes after the answer
        (b"GET / HTTP/1.1\r\nHost: t\n\r\n", False),  # malformed: 400
        (b"GET / HTTP/1.1\r\nX: " + b"x" * 500 + b"\r\n\r\n", False),  # too long
    ],
)
def test_what_the_head_cache_keeps(rigs: tuple[Rig, Rig], data: bytes, memoized: bool) -> None:
    cached, _ = rigs
    cached.feed([data], False)
    assert (data in cached.server.head_cache) == memoized
