"""server_core HTTP/1.1: keep-alive, pipelining, bodies, limits, handlers (real sockets)."""

from __future__ import annotations

import asyncio
import struct
from socket import SO_LINGER, SOL_SOCKET
from typing import Any

import pytest

from server_core import HttpConnection, Request, Response, Worker
from tests.test_server_core_support import (
    connect,
    get,
    listening_socket,
    read_reply,
    read_to_eof,
    serving,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(60)


def echo_worker(**kwargs: Any) -> Worker:
    worker = Worker("http://127.0.0.1:0", **kwargs)

    @worker.on_message
    async def handle(conn: HttpConnection, request: Request) -> Any:
        if request.path == "/json":
            return {"path": request.path, "query": request.query_params}
        if request.path == "/echo":
            return Response(
                request.body,
                headers={"X-Method": request.method, "X-Len": str(len(request.body))},
            )
        if request.path == "/status":
            return Response("made\n", status=201, headers=[("X-A", "1"), ("X-A", "2")])
        if request.path == "/headers":
            return Response.json(request.headers)
        if request.path == "/fail":
            raise RuntimeError("handler failed on purpose")
        return "hello"

    return worker


async def test_get_keep_alive_serves_many_requests_on_one_connection() -> None:
    async with serving(echo_worker()) as port, connect(port) as (reader, writer):
        for _ in range(5):
            writer.write(get())
            reply = await read_reply(reader)
            assert reply.status == 200
            assert reply.body == b"hello"
            assert reply.headers["content-type"] == "text/plain; charset=utf-8"
            assert "date" in reply.headers
            assert "connection" not in reply.headers


async def test_pipelined_requests_are_answered_in_order() -> None:
    worker = Worker("http://127.0.0.1:0")

    @worker.on_message
    async def handle(conn: HttpConnection, request: Request) -> str:
        if request.path == "/slow":
            await asyncio.sleep(0.05)  # suspends: later requests must wait their turn
        return request.path

    async with serving(worker) as port, connect(port) as (reader, writer):
        paths = ["/a", "/slow", "/b", "/slow", "/c"]
        writer.write(b"".join(get(p) for p in paths))
        bodies = [(await read_reply(reader)).body.decode() for _ in paths]
        assert bodies == paths


async def test_content_length_and_chunked_bodies() -> None:
    async with serving(echo_worker()) as port, connect(port) as (reader, writer):
        writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nabcde")
        reply = await read_reply(reader)
        assert (reply.status, reply.body, reply.headers["x-method"]) == (200, b"abcde", "POST")
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n"
        )
        await asyncio.sleep(0)  # the rest in another segment
        writer.write(b"4\r\ndefg\r\n0\r\n\r\n")
        reply = await read_reply(reader)
        assert reply.body == b"abcdefg"
        assert reply.headers["x-len"] == "7"


async def test_body_split_across_many_writes() -> None:
    async with serving(echo_worker()) as port, connect(port) as (reader, writer):
        body = bytes(range(256)) * 400
        writer.write(b"PUT /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 7000):
            writer.write(body[i : i + 7000])
            await writer.drain()
        reply = await read_reply(reader)
        assert reply.body == body


async def test_response_helpers_json_status_headers_head() -> None:
    async with serving(echo_worker()) as port, connect(port) as (reader, writer):
        writer.write(get("/json?a=1&a=2&b="))
        reply = await read_reply(reader)
        assert reply.headers["content-type"] == "application/json"
        assert reply.body == b'{"path":"/json","query":{"a":["1","2"],"b":[""]}}'
        writer.write(get("/status"))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 201 Created\r\n")
        assert b"X-A: 1\r\nX-A: 2\r\n" in head
        assert await reader.readexactly(5) == b"made\n"
        writer.write(get("/headers", "X-Custom: v1\r\nx-custom: v2\r\n"))
        reply = await read_reply(reader)
        assert reply.body == b'{"host":"t","x-custom":"v1, v2"}'
        writer.write(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
        reply = await read_reply(reader, head_only=True)
        assert reply.headers["content-length"] == "5"
        writer.write(get())  # the HEAD answer had no body: the next reply parses cleanly
        assert (await read_reply(reader)).body == b"hello"


async def test_http10_closes_unless_keep_alive_asked() -> None:
    async with serving(echo_worker()) as port:
        async with connect(port) as (reader, _writer):
            _writer.write(b"GET / HTTP/1.0\r\n\r\n")
            data = await read_to_eof(reader)
            assert data.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in data
        async with connect(port) as (reader, writer):
            for _ in range(2):
                writer.write(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                reply = await read_reply(reader)
                assert reply.headers["connection"] == "keep-alive"


async def test_connection_close_request_closes_after_reply() -> None:
    async with serving(echo_worker()) as port, connect(port) as (reader, writer):
        writer.write(get("/", "Connection: close\r\n"))
        data = await read_to_eof(reader)
        assert data.endswith(b"hello") and b"Connection: close\r\n" in data


async def test_expect_100_continue() -> None:
    async with serving(echo_worker()) as port, connect(port) as (reader, writer):
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        )
        async with asyncio.timeout(5):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"ok")
        assert (await read_reply(reader)).body == b"ok"


async def test_malformed_request_gets_400_and_close() -> None:
    async with serving(echo_worker()) as port:
        async with connect(port) as (reader, writer):
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            data = await read_to_eof(reader)
            assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
            assert b"Connection: close" in data
        async with connect(port) as (reader, writer):  # the worker still serves
            writer.write(get())
            assert (await read_reply(reader)).body == b"hello"


async def test_bad_request_after_good_pipelined_one() -> None:
    async with serving(echo_worker()) as port, connect(port) as (reader, writer):
        writer.write(get() + b"\x00\x01garbage\r\n\r\n")
        data = await read_to_eof(reader)
        assert data.startswith(b"HTTP/1.1 200 OK")
        assert b"hello" in data and b"400 Bad Request" in data


async def test_headers_too_large_get_431() -> None:
    worker = echo_worker(max_header_bytes=4096)
    async with serving(worker) as port:
        async with connect(port) as (reader, writer):
            writer.write(get("/", "X-Big: " + "a" * 10000 + "\r\n"))
            data = await read_to_eof(reader)
            assert data.startswith(b"HTTP/1.1 431 ")
        async with connect(port) as (reader, writer):  # many small headers, many writes
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n")
            for i in range(400):
                writer.write(f"X-H{i}: {'v' * 20}\r\n".encode())
                await writer.drain()
            data = await read_to_eof(reader)
            assert data.startswith(b"HTTP/1.1 431 ")


async def test_body_too_large_gets_413() -> None:
    worker = echo_worker(max_body_bytes=1000)
    async with serving(worker) as port:
        async with connect(port) as (reader, writer):
            writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n\r\n")
            data = await read_to_eof(reader)  # refused before the body is sent
            assert data.startswith(b"HTTP/1.1 413 ")
        async with connect(port) as (reader, writer):
            writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(5):
                writer.write(b"190\r\n" + b"x" * 400 + b"\r\n")
            data = await read_to_eof(reader)
            assert data.startswith(b"HTTP/1.1 413 ")


async def test_slow_header_times_out_with_408() -> None:
    worker = echo_worker(header_timeout=1)
    async with serving(worker) as port, connect(port) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n")  # never finishes the head
        data = await read_to_eof(reader)
        assert data.startswith(b"HTTP/1.1 408 ")


async def test_idle_keep_alive_connection_times_out() -> None:
    worker = echo_worker(keepalive_timeout=1)
    async with serving(worker) as port, connect(port) as (reader, writer):
        writer.write(get())
        await read_reply(reader)
        assert await read_to_eof(reader) == b""
        await wait_for(lambda: worker.stats.connections == 0, what="connection closed")


async def test_handler_error_gets_500_and_on_error_hears_it() -> None:
    worker = echo_worker()
    errors: list[BaseException] = []
    worker.on_error(lambda conn, exc: errors.append(exc))
    async with serving(worker) as port, connect(port) as (reader, writer):
        writer.write(get("/fail"))
        assert (await read_reply(reader)).status == 500
        writer.write(get())  # same connection still usable
        assert (await read_reply(reader)).body == b"hello"
    assert [str(e) for e in errors] == ["handler failed on purpose"]


async def test_sync_handler_and_deferred_send() -> None:
    worker = Worker("http://127.0.0.1:0")

    @worker.on_message
    def handle(conn: HttpConnection, request: Request) -> None:
        # answer later, from a timer: the request stays pending until then
        worker.after(0.01, conn.send, Response.json({"late": request.path}))

    async with serving(worker) as port, connect(port) as (reader, writer):
        writer.write(get("/x") + get("/y"))
        assert (await read_reply(reader)).body == b'{"late":"/x"}'
        assert (await read_reply(reader)).body == b'{"late":"/y"}'


async def test_async_handler_may_send_itself() -> None:
    worker = Worker("http://127.0.0.1:0")

    @worker.on_message
    async def handle(conn: HttpConnection, request: Request) -> None:
        await asyncio.sleep(0)
        await conn.send("sent by hand")

    async with serving(worker) as port, connect(port) as (reader, writer):
        writer.write(get() + get())
        assert (await read_reply(reader)).body == b"sent by hand"
        assert (await read_reply(reader)).body == b"sent by hand"
        assert worker.stats.requests == 2


async def test_callbacks_and_stats() -> None:
    worker = echo_worker()
    events: list[str] = []
    worker.on_connect(lambda conn: events.append("connect"))
    worker.on_close(lambda conn: events.append("close"))
    async with serving(worker) as port:
        async with connect(port) as (reader, writer):
            writer.write(get())
            await read_reply(reader)
            await wait_for(lambda: worker.stats.connections == 1, what="one connection")
            assert len(worker.connections) == 1
            conn = next(iter(worker.connections))
            conn.context["user"] = 7
            assert conn.context == {"user": 7}
        await wait_for(lambda: events == ["connect", "close"], what="on_close")
        snapshot = worker.stats_snapshot()
        assert snapshot["requests"] == 1
        assert snapshot["connections"] == 0
        assert snapshot["bytes_in"] > 0 and snapshot["bytes_out"] > 0


async def test_tcp_nodelay_on_accepted_connections() -> None:
    import socket as socket_module

    worker = Worker("http://127.0.0.1:0")
    seen: list[int] = []

    @worker.on_message
    def handle(conn: HttpConnection, request: Request) -> str:
        sock = conn.transport.get_extra_info("socket")
        seen.append(sock.getsockopt(socket_module.IPPROTO_TCP, socket_module.TCP_NODELAY))
        return "ok"

    async with serving(worker) as port, connect(port) as (reader, writer):
        writer.write(get())
        await read_reply(reader)
    assert seen and seen[0] != 0


async def test_drain_answers_with_connection_close_and_closes_idle() -> None:
    worker = echo_worker(drain_grace=0.3)
    async with serving(worker) as port:
        async with connect(port) as (busy_reader, busy_writer), connect(port) as (
            idle_reader,
            idle_writer,
        ):
            for writer, reader in ((busy_writer, busy_reader), (idle_writer, idle_reader)):
                writer.write(get())
                assert "connection" not in (await read_reply(reader)).headers
            worker.stop()
            busy_writer.write(get())  # still answered, but told to go away
            reply = await read_reply(busy_reader)
            assert (reply.status, reply.headers["connection"]) == (200, "close")
            assert await read_to_eof(busy_reader) == b""
            assert await read_to_eof(idle_reader) == b""  # closed after the grace
        # nobody accepts any more: our copy of the listening socket is closed
        await wait_for(lambda: worker.stats.connections == 0, what="all closed")


async def test_async_handler_failing_after_suspension_gets_500() -> None:
    worker = Worker("http://127.0.0.1:0")

    @worker.on_message
    async def handle(conn: HttpConnection, request: Request) -> str:
        await asyncio.sleep(0)
        raise ValueError("late failure")

    worker.on_error(lambda conn, exc: None)
    async with serving(worker) as port, connect(port) as (reader, writer):
        writer.write(get())
        assert (await read_reply(reader)).status == 500


async def test_answer_for_a_client_that_left_counts_a_send_failure() -> None:
    worker = Worker("http://127.0.0.1:0")
    release = asyncio.Event()

    @worker.on_message
    async def handle(conn: HttpConnection, request: Request) -> str:
        await release.wait()
        return "too late"

    async with serving(worker) as port:
        async with connect(port) as (_reader, writer):
            writer.write(get())
            await wait_for(lambda: worker.stats.requests == 1, what="request seen")
            sock = writer.transport.get_extra_info("socket")  # reset, not half-close:
            sock.setsockopt(SOL_SOCKET, SO_LINGER, struct.pack("ii", 1, 0))  # client gone
            writer.transport.abort()
        await wait_for(lambda: worker.stats.connections == 0, what="client gone")
        release.set()
        await wait_for(lambda: worker.stats.send_fail == 1, what="send failure counted")


async def test_endless_trailers_are_refused() -> None:
    worker = echo_worker(max_header_bytes=2048, max_body_bytes=2048)
    async with serving(worker) as port, connect(port) as (reader, writer):
        writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"1\r\na\r\n0\r\nX-Trailer: ")
        for _ in range(100):
            writer.write(b"t" * 100)  # one trailer line that never ends
            await writer.drain()
        data = await read_to_eof(reader)
        assert data.startswith(b"HTTP/1.1 413 ")


# ----- memoized request heads (HttpConnection's head cache) ---------------------------
async def test_repeated_head_is_memoized_and_answered_like_the_first() -> None:
    worker = echo_worker()
    request = get("/", "X-Client: 1\r\n")
    async with serving(worker) as port, connect(port) as (reader, writer):
        replies = []
        for _ in range(20):  # the cache samples misses: a repeated head is soon in it
            writer.write(request)
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                replies.append(head + await reader.readexactly(len(b"hello")))
        server = worker._server
        assert server is not None and request in server.head_cache
        assert len(set(replies)) <= 2  # the same bytes (the Date may tick once)
        assert replies[-1].startswith(b"HTTP/1.1 200 OK\r\n")
        assert replies[-1].endswith(b"\r\n\r\nhello")
        assert b"onnection" not in replies[-1]
        assert worker.stats.requests == 20
        assert worker.stats.bytes_in == 20 * len(request)
        assert worker.stats.bytes_out == sum(len(r) for r in replies)


async def test_memoized_head_sees_headers_head_method_and_errors() -> None:
    worker = echo_worker()
    worker.on_error(lambda conn, exc: None)
    async with serving(worker) as port, connect(port) as (reader, writer):
        for _ in range(10):
            writer.write(get("/headers", "X-A: b\r\n"))
            assert (await read_reply(reader)).body == b'{"host":"t","x-a":"b"}'
            writer.write(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await read_reply(reader, head_only=True)
            assert (head.status, head.headers["content-length"]) == (200, "5")
            writer.write(get("/fail"))
            assert (await read_reply(reader)).status == 500
        writer.write(get())  # the connection is still in order after all that
        assert (await read_reply(reader)).body == b"hello"


async def test_memoized_head_is_not_taken_for_the_rest_of_a_split_request() -> None:
    # A chunk equal to a memoized head must still go to httptools when it continues a
    # request httptools has begun: here it ends the value of X-A. The beginning comes
    # behind a whole request, so the connection is idle (answered) when `known` comes.
    worker = echo_worker()
    known = get("/headers")
    async with serving(worker) as port, connect(port) as (reader, writer):
        for _ in range(10):
            writer.write(known)
            await read_reply(reader)
        server = worker._server
        assert server is not None and known in server.head_cache
        writer.write(get("/") + b"GET /headers HTTP/1.1\r\nX-A: ")
        assert (await read_reply(reader)).body == b"hello"
        writer.write(known)
        reply = await read_reply(reader)
        assert reply.body == b'{"x-a":"GET /headers HTTP/1.1","host":"t"}'


async def test_handler_answering_with_send_before_pipelined_ones() -> None:
    # conn.send() inside an inline async handler starts the next queued request's
    # handler while the first one is still running (it used to get a 500).
    worker = Worker("http://127.0.0.1:0")
    errors: list[BaseException] = []
    worker.on_error(lambda conn, exc: errors.append(exc))

    @worker.on_message
    async def handle(conn: HttpConnection, request: Request) -> None:
        if request.path == "/slow":
            await asyncio.sleep(0.02)  # the others queue behind it
        conn.send("by hand " + request.path)

    async with serving(worker) as port, connect(port) as (reader, writer):
        paths = ["/slow", "/b", "/c", "/d"]
        writer.write(b"".join(get(p) for p in paths))
        bodies = [(await read_reply(reader)).body.decode() for _ in paths]
        assert bodies == [f"by hand {p}" for p in paths]
        assert errors == []


async def test_memoized_head_with_a_handler_that_waits() -> None:
    worker = Worker("http://127.0.0.1:0")

    @worker.on_message
    async def handle(conn: HttpConnection, request: Request) -> str:
        await asyncio.sleep(0)  # every request suspends, memoized or not
        return "waited"

    async with serving(worker) as port, connect(port) as (reader, writer):
        for _ in range(20):
            writer.write(get())
            assert (await read_reply(reader)).body == b"waited"
        assert worker.stats.requests == 20


async def test_health_probe_listener_counts_in_no_stats() -> None:
    worker = echo_worker()
    probe = listening_socket()
    probe_port = int(probe.getsockname()[1])
    async with serving(worker, probe=probe) as port:
        async with connect(probe_port) as (reader, writer):
            for _ in range(20):  # keep-alive: the memoized-head path too
                writer.write(get("/probe"))
                assert (await read_reply(reader)).status == 200
            assert worker.stats.connections == 0
        for _ in range(2):  # a check per connection
            async with connect(probe_port) as (reader, writer):
                writer.write(get("/probe", "Connection: close\r\n"))
                assert (await read_reply(reader)).status == 200
        assert worker.stats.requests == 0
        assert worker.stats.bytes_in == worker.stats.bytes_out == 0
        async with connect(port) as (reader, writer):
            for _ in range(3):
                writer.write(get("/probe"))
                assert (await read_reply(reader)).status == 200
            assert worker.stats.connections == 1
        assert worker.stats.requests == 3
