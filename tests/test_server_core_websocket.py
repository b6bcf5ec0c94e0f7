"""server_core WebSocket: upgrade, text/binary, ping/pong, close, limits, drain (1001),
driven by the `websockets` client library over real sockets."""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from server_core import Request, Response, WebSocketConnection, Worker
from tests.test_server_core_support import REPO, connect, get, read_reply, serving
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(60)


def echo_worker(**kwargs: Any) -> Worker:
    worker = Worker("ws://127.0.0.1:0", **kwargs)

    @worker.on_message
    async def echo(conn: WebSocketConnection, message: str | bytes) -> str | bytes:
        if message == "path":
            return conn.request.path
        if message == "slow":
            await asyncio.sleep(0.05)
        return message

    return worker


async def test_text_and_binary_echo() -> None:
    async with serving(echo_worker()) as port:
        url = f"ws://127.0.0.1:{port}/room?x=1"
        async with ws_connect(url) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.send(b"\x00\x01\x02")
            assert await ws.recv() == b"\x00\x01\x02"
            await ws.send("path")
            assert await ws.recv() == "/room"


async def test_messages_keep_their_order_across_slow_handlers() -> None:
    async with serving(echo_worker()) as port, ws_connect(f"ws://127.0.0.1:{port}/") as ws:
        for message in ("1", "slow", "2", "slow", "3"):
            await ws.send(message)
        assert [await ws.recv() for _ in range(5)] == ["1", "slow", "2", "slow", "3"]


async def test_an_unsendable_reply_goes_to_on_error_and_the_socket_goes_on() -> None:
    worker = Worker("ws://127.0.0.1:0")
    errors: list[BaseException] = []
    worker.on_error(lambda conn, exc: errors.append(exc))

    @worker.on_message
    async def handle(conn: WebSocketConnection, message: str) -> Any:
        if message == "slow42":
            await asyncio.sleep(0.05)
            return 42  # a WebSocket sends str, bytes, dict or list: not an int
        return 42 if message == "42" else message

    async with serving(worker) as port, ws_connect(f"ws://127.0.0.1:{port}/") as ws:
        for message in ("42", "one", "slow42", "two"):
            await ws.send(message)
        assert [await ws.recv() for _ in range(2)] == ["one", "two"]
    assert [type(exc) for exc in errors] == [TypeError, TypeError]
    assert worker.stats.send_fail == 2


async def test_fragmented_and_large_messages() -> None:
    async with serving(echo_worker()) as port:
        url = f"ws://127.0.0.1:{port}/"
        async with ws_connect(url, max_size=None) as ws:
            await ws.send(["part one, ", "part two"])  # a fragmented message
            assert await ws.recv() == "part one, part two"
            big = bytes(range(256)) * 4096  # 1 MiB
            await ws.send(big)
            assert await ws.recv() == big


async def test_ping_pong() -> None:
    async with serving(echo_worker()) as port, ws_connect(f"ws://127.0.0.1:{port}/") as ws:
        pong = await ws.ping(b"are you there")
        async with asyncio.timeout(5):
            await pong


async def test_client_close_runs_on_close() -> None:
    worker = echo_worker()
    closed: list[int] = []
    worker.on_close(lambda conn: closed.append(conn.id))
    async with serving(worker) as port:
        async with ws_connect(f"ws://127.0.0.1:{port}/") as ws:
            await ws.send("x")
            await ws.recv()
        assert ws.close_code == 1000
        await wait_for(lambda: len(closed) == 1, what="on_close")
        await wait_for(lambda: worker.stats.connections == 0, what="connection gone")


async def test_server_close_sends_close_frame() -> None:
    worker = Worker("ws://127.0.0.1:0")

    @worker.on_message
    def bye(conn: WebSocketConnection, message: str | bytes) -> None:
        conn.close("bye")

    async with serving(worker) as port, ws_connect(f"ws://127.0.0.1:{port}/") as ws:
        await ws.send("x")
        assert await ws.recv() == "bye"
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1000


async def test_too_big_message_closes_with_1009() -> None:
    errors: list[BaseException] = []
    worker = echo_worker(max_package_size=1000)
    worker.on_error(lambda conn, exc: errors.append(exc))
    async with serving(worker) as port:
        async with ws_connect(f"ws://127.0.0.1:{port}/") as ws:
            await ws.send("x" * 2000)
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1009
        async with ws_connect(f"ws://127.0.0.1:{port}/") as ws:  # others unaffected
            await ws.send("ok")
            assert await ws.recv() == "ok"
    assert errors and "too big" in str(errors[0])


async def test_plain_http_on_ws_worker() -> None:
    worker = echo_worker()
    async with serving(worker) as port, connect(port) as (reader, writer):
        writer.write(get("/healthz"))
        assert (await read_reply(reader)).status == 426  # no on_http handler
    worker = echo_worker()
    worker.on_http(lambda conn, request: Response("ok\n"))
    async with serving(worker) as port, connect(port) as (reader, writer):
        writer.write(get("/healthz"))
        reply = await read_reply(reader)
        assert (reply.status, reply.body) == (200, b"ok\n")
        assert worker.connections == set()  # plain HTTP is not a websocket client


async def test_bad_handshake_gets_400() -> None:
    async with serving(echo_worker()) as port, connect(port) as (reader, writer):
        writer.write(get("/", "Upgrade: websocket\r\nConnection: Upgrade\r\n"))  # no key
        assert (await read_reply(reader)).status == 400


async def test_drain_closes_with_going_away() -> None:
    worker = echo_worker()
    async with serving(worker) as port, ws_connect(f"ws://127.0.0.1:{port}/") as ws:
        await ws.send("x")
        await ws.recv()
        worker.stop()
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1001


def load_chat() -> Any:
    spec = importlib.util.spec_from_file_location("chat_example", REPO / "examples" / "chat.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_chat_example_broadcasts_to_everyone() -> None:
    worker = load_chat().build("ws://127.0.0.1:0")
    async with serving(worker) as port:
        url = f"ws://127.0.0.1:{port}/"
        async with ws_connect(url) as alice:
            assert "joined" in await alice.recv()
            async with ws_connect(url) as bob:
                assert "joined (2 online)" in await bob.recv()
                assert "joined (2 online)" in await alice.recv()
                await bob.send("hi all")
                assert str(await alice.recv()).endswith(": hi all")
                assert str(await bob.recv()).endswith(": hi all")
            assert str(await alice.recv()).endswith("left")
        snapshot = worker.stats_snapshot()
        assert {"name": "chat_messages_total", "type": "counter", "labels": {}, "value": 1} in (
            snapshot["metrics"]
        )


async def test_request_object_available_on_connect() -> None:
    worker = echo_worker()
    seen: list[Request] = []
    worker.on_connect(lambda conn: seen.append(conn.request))
    async with serving(worker) as port:
        url = f"ws://127.0.0.1:{port}/feed?token=abc"
        async with ws_connect(url) as ws:
            await ws.send("x")
            await ws.recv()
    assert seen[0].path == "/feed"
    assert seen[0].query_param("token") == "abc"


async def raw_websocket(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        get(
            "/",
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
        )
    )
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    return reader, writer


def masked(opcode: int, payload: bytes) -> bytes:
    mask = b"\x11\x22\x33\x44"
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


async def close_code(reader: asyncio.StreamReader) -> int:
    """Read frames until the server's close frame; its status code."""
    async with asyncio.timeout(5):
        while True:
            head = await reader.readexactly(2)
            payload = await reader.readexactly(head[1] & 0x7F)
            if head[0] & 0x0F == 0x8:
                return int.from_bytes(payload[:2], "big")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (masked(0x1, b"\xff\xfe"), 1007),  # invalid UTF-8 in a text message
        (bytes([0x81, 0x02]) + b"hi", 1002),  # a client frame without a mask
        (masked(0x0, b"orphan"), 1002),  # a continuation with nothing to continue
    ],
)
async def test_protocol_violations_close_with_the_right_code(frame: bytes, code: int) -> None:
    worker = echo_worker()
    errors: list[BaseException] = []
    worker.on_error(lambda conn, exc: errors.append(exc))
    async with serving(worker) as port:
        reader, writer = await raw_websocket(port)
        try:
            writer.write(frame)
            assert await close_code(reader) == code
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # and the server closes TCP
        finally:
            writer.close()
        async with ws_connect(f"ws://127.0.0.1:{port}/") as ws:  # the worker is fine
            await ws.send("still ok")
            assert await ws.recv() == "still ok"
    assert errors
