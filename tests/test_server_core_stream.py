"""server_core tcp://, text:// and frame:// protocols; back-pressure; timers; metrics."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import pytest

from server_core import Connection, Worker
from server_core.stats import MetricRegistry
from tests.test_server_core_support import connect, serving
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(60)


def echo(listen: str, **kwargs: Any) -> Worker:
    worker = Worker(listen, **kwargs)

    @worker.on_message
    async def handle(conn: Connection, message: Any) -> Any:
        if message in ("slow", b"slow"):
            await asyncio.sleep(0.05)
        return message

    return worker


def frame(payload: bytes) -> bytes:
    return (len(payload) + 4).to_bytes(4, "big") + payload


async def test_tcp_echo() -> None:
    async with serving(echo("tcp://127.0.0.1:0")) as port, connect(port) as (reader, writer):
        writer.write(b"raw bytes")
        async with asyncio.timeout(5):
            assert await reader.readexactly(9) == b"raw bytes"


async def test_text_lines_split_and_joined_across_writes() -> None:
    worker = echo("text://127.0.0.1:0")
    async with serving(worker) as port, connect(port) as (reader, writer):
        writer.write(b"one\r\ntw")
        await writer.drain()
        writer.write(b"o\nslow\nthree\n\xff\n")
        async with asyncio.timeout(5):
            lines = [await reader.readline() for _ in range(5)]
        assert lines == [b"one\n", b"two\n", b"slow\n", b"three\n", "\ufffd\n".encode()]
        assert worker.stats.requests == 5


async def test_text_line_too_long_is_refused() -> None:
    worker = echo("text://127.0.0.1:0", max_package_size=100)
    errors: list[BaseException] = []
    worker.on_error(lambda conn, exc: errors.append(exc))
    async with serving(worker) as port:
        async with connect(port) as (reader, writer):
            writer.write(b"a" * 150)  # no newline at all
            async with asyncio.timeout(5):
                assert await reader.read() == b""
        async with connect(port) as (reader, writer):
            writer.write(b"fine\n")
            async with asyncio.timeout(5):
                assert await reader.readline() == b"fine\n"
    assert "line too long" in str(errors[0])


async def test_frames_round_trip_split_anywhere() -> None:
    async with serving(echo("frame://127.0.0.1:0")) as port, connect(port) as (reader, writer):
        stream = frame(b"first") + frame(b"") + frame(b"slow") + frame(b"x" * 70000)
        for i in range(0, len(stream), 3):  # worst case: the header split too
            writer.write(stream[i : i + 3])
        async with asyncio.timeout(10):
            for expected in (b"first", b"", b"slow", b"x" * 70000):
                header = await reader.readexactly(4)
                total = int.from_bytes(header, "big")
                assert await reader.readexactly(total - 4) == expected


@pytest.mark.parametrize("declared", [0, 3, 1_000_000])
async def test_bad_frame_length_is_refused_before_buffering(declared: int) -> None:
    worker = echo("frame://127.0.0.1:0", max_package_size=1000)
    errors: list[BaseException] = []
    worker.on_error(lambda conn, exc: errors.append(exc))
    async with serving(worker) as port, connect(port) as (reader, writer):
        writer.write(declared.to_bytes(4, "big") + b"abc")
        async with asyncio.timeout(5):
            assert await reader.read() == b""
    assert "frame length" in str(errors[0])


async def test_back_pressure_callbacks_and_awaitable_send() -> None:
    worker = Worker("tcp://127.0.0.1:0", max_send_buffer=64 * 1024)
    events: list[str] = []
    worker.on_buffer_full(lambda conn: events.append("full"))
    worker.on_buffer_drain(lambda conn: events.append("drain"))
    chunk = b"z" * 65536
    total = 64

    @worker.on_message
    async def flood(conn: Connection, message: bytes) -> None:
        for _ in range(total):
            await conn.send(chunk)  # waits whenever the buffer is above the mark

    async with serving(worker) as port, connect(port) as (reader, writer):
        writer.write(b"go")
        await wait_for(lambda: "full" in events, what="buffer full")
        async with asyncio.timeout(20):
            received = await reader.readexactly(len(chunk) * total)
        assert len(received) == len(chunk) * total
        await wait_for(lambda: "drain" in events, what="buffer drained")
        assert worker.stats.send_fail == 0


async def test_send_after_close_counts_a_failure() -> None:
    worker = Worker("tcp://127.0.0.1:0")
    results: list[bool] = []

    @worker.on_message
    def once(conn: Connection, message: bytes) -> None:
        conn.close(b"bye")
        results.append(bool(conn.send(b"too late")))

    async with serving(worker) as port, connect(port) as (reader, writer):
        writer.write(b"x")
        async with asyncio.timeout(5):
            assert await reader.read() == b"bye"
    assert results == [False]
    assert worker.stats.send_fail == 1


# How each message protocol frames what the client writes and what the worker answers.
WIRE: dict[str, Callable[[bytes], bytes]] = {
    "tcp": lambda payload: payload,
    "text": lambda payload: payload + b"\n",
    "frame": frame,
}


def unsendable_reply_worker(scheme: str, mode: str, release: asyncio.Event) -> Worker:
    """Echoes messages, but answers `dict` / `slowdict` with a dict, which tcp://,
    text:// and frame:// cannot encode. `mode`: a sync handler, an async one that
    finishes without waiting, or one that waits (for `release`) on `slowdict`."""
    worker = Worker(f"{scheme}://127.0.0.1:0")

    def answer(message: Any) -> Any:
        text = message.decode() if isinstance(message, bytes) else message
        return {"k": 1} if text in ("dict", "slowdict") else message

    if mode == "sync":
        worker.on_message(lambda conn, message: answer(message))
    else:

        @worker.on_message
        async def handle(conn: Connection, message: Any) -> Any:
            if message in ("slowdict", b"slowdict"):
                await release.wait()
            return answer(message)

    return worker


def read_at_least(worker: Worker, total: int) -> bool:
    return worker.stats.bytes_in >= total


@pytest.mark.parametrize("scheme", ["tcp", "text", "frame"])
@pytest.mark.parametrize("mode", ["sync", "async", "suspended"])
async def test_an_unsendable_reply_goes_to_on_error_and_later_messages_are_answered(
    scheme: str, mode: str
) -> None:
    release = asyncio.Event()
    worker = unsendable_reply_worker(scheme, mode, release)
    errors: list[BaseException] = []
    worker.on_error(lambda conn, exc: errors.append(exc))
    wire = WIRE[scheme]
    first = b"slowdict" if mode == "suspended" else b"dict"
    async with serving(worker) as port, connect(port) as (reader, writer):
        sent = 0
        for message in (first, b"next1", b"next2"):
            data = wire(message)
            writer.write(data)
            await writer.drain()
            sent += len(data)
            # one read per message, so raw tcp:// sees each as a message of its own
            await wait_for(functools.partial(read_at_least, worker, sent), what="it read")
        release.set()
        expected = wire(b"next1") + wire(b"next2")
        async with asyncio.timeout(5):
            assert await reader.readexactly(len(expected)) == expected
        await wait_for(lambda: errors, what="on_error")
        assert len(errors) == 1 and isinstance(errors[0], TypeError), errors
        assert "cannot send a dict" in str(errors[0])
        assert worker.stats.requests == 3
        assert worker.stats.send_fail == 1  # the dropped reply
        # the connection is still usable
        writer.write(wire(b"again"))
        async with asyncio.timeout(5):
            assert await reader.readexactly(len(wire(b"again"))) == wire(b"again")


async def test_timers_every_after_cancel() -> None:
    worker = Worker("tcp://127.0.0.1:0")
    ticks: list[str] = []
    repeating = worker.every(0.01, ticks.append, "every")
    cancelled = worker.after(0.01, ticks.append, "cancelled")
    cancelled.cancel()

    async def later() -> None:
        await asyncio.sleep(0)
        ticks.append("async after")

    worker.after(0.02, later)
    assert worker.stats_snapshot()["timers"] == 2
    async with serving(worker):
        await wait_for(lambda: ticks.count("every") >= 3, what="three ticks")
        await wait_for(lambda: "async after" in ticks, what="the one-shot timer")
        repeating.cancel()
        assert not repeating.active
        count = ticks.count("every")
        await asyncio.sleep(0.05)  # a cancelled timer must stay silent
        assert ticks.count("every") == count
    assert "cancelled" not in ticks
    assert worker.stats_snapshot()["timers"] == 0


async def test_worker_start_and_stop_callbacks_order() -> None:
    worker = Worker("tcp://127.0.0.1:0")
    order: list[str] = []

    @worker.on_worker_start
    async def start(w: Worker) -> None:
        await asyncio.sleep(0)
        order.append("start")

    worker.on_worker_stop(lambda w: order.append("stop"))
    async with serving(worker):
        assert order == ["start"]
    assert order == ["start", "stop"]


def test_metrics_registry() -> None:
    registry = MetricRegistry()
    hits = registry.counter("hits_total", {"route": "/"})
    assert registry.counter("hits_total", {"route": "/"}) is hits
    hits.inc()
    hits.inc(2)
    with pytest.raises(ValueError, match="cannot decrease"):
        hits.inc(-1)
    queue = registry.gauge("queue_depth")
    queue.set(5)
    queue.dec()
    with pytest.raises(ValueError, match="already registered"):
        registry.gauge("hits_total")
    with pytest.raises(ValueError, match="not a valid"):
        registry.counter("bad-name")
    with pytest.raises(ValueError, match="label name"):
        registry.counter("ok", {"bad-label": "x"})
    assert registry.render() == [
        {"name": "hits_total", "type": "counter", "labels": {"route": "/"}, "value": 3},
        {"name": "queue_depth", "type": "gauge", "labels": {}, "value": 4},
    ]
