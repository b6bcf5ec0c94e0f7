"""supervisor.logs: capture real pipes into files, ring and followers; floods stay bounded."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.logs import CUT_MARK, FOLLOW_QUEUE, SVCD_STREAM, LineSplitter, LogStore
from supervisor.reaper import Reaper
from supervisor.spawn import SpawnRequest, clean_environ, spawn
from supervisor.spec import LogSpec, ServiceSpec
from supervisor.status import LogLine
from tests.programs.harness import running
from tests.waiting import wait_for

WAIT = 10.0
#: A sanity bound, not a benchmark: no loop stall this long while a flood is captured.
MAX_STALL = 1.0
TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z api:(\d+)\[(\d+)\] (stdout|stderr): (.*)$"
)


@pytest.fixture
async def reaper() -> AsyncIterator[Reaper]:
    r = Reaper()
    r.start()
    yield r
    r.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LogStore]:
    s = LogStore("api", tmp_path, LogSpec())
    yield s
    s.close()


class Feeder:
    """The writing end of a pipe attached to a LogStore, written from the test."""

    def __init__(self, store: LogStore, worker: int = 0, pid: int = 100, stream: str = "stdout"):
        r, self.w = os.pipe()
        store.attach(worker, pid, stream, r)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.w, view) :]

    def close(self) -> None:
        if self.w >= 0:
            os.close(self.w)
            self.w = -1


@contextlib.contextmanager
def feeding(store: LogStore, **kwargs: object) -> Iterator[Feeder]:
    f = Feeder(store, **kwargs)  # type: ignore[arg-type]
    try:
        yield f
    finally:
        f.close()


def run_child(
    store: LogStore, reaper: Reaper, code: str, worker: int = 0
) -> asyncio.Future[object]:
    """Spawn python -c code with stdout/stderr attached to `store`; return its exit future."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        pid = spawn(SpawnRequest([sys.executable, "-c", textwrap.dedent(code)],
                                 clean_environ(os.environ), stdout=out_w, stderr=err_w))
    finally:
        os.close(out_w)
        os.close(err_w)
    fut = reaper.watch(pid)
    store.attach(worker, pid, "stdout", out_r)
    store.attach(worker, pid, "stderr", err_r)
    return fut  # type: ignore[return-value]


def has_lines(store: LogStore, n: int) -> bool:
    return store.lines == n


def files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def file_sizes(directory: Path) -> list[int]:
    return [os.stat(directory / name).st_size for name in files(directory)]


class LagProbe:
    """Measures the longest gap between wakeups of a task that wants to run every 10 ms."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.worst = max(self.worst, now - last)
            last = now

    async def stop(self) -> float:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.worst


# ---------------------------------------------------------------- line splitting


def model_lines(data: bytes, max_line: int) -> list[bytes]:
    parts = data.split(b"\n")
    if parts[-1] == b"":
        parts.pop()
    cut = CUT_MARK.encode()
    return [p if len(p) <= max_line else p[:max_line] + cut for p in parts]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from([b"a", b"bb", b"\n", b"cccccccc", b"\n\n", b"dddd\ne"]), max_size=40),
    st.integers(min_value=1, max_value=8),
    st.data(),
)
def test_splitter_matches_the_model_however_the_stream_is_chunked(
    pieces: list[bytes], max_line: int, data: st.DataObject
) -> None:
    stream = b"".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    splitter = LineSplitter(max_line)
    got: list[bytes] = []
    start = 0
    for end in [*cuts, len(stream)]:
        got += splitter.feed(stream[start:end])
        start = end
    got += splitter.finish()
    assert got == model_lines(stream, max_line)


# ---------------------------------------------------------------- capture


async def test_captures_a_real_process_into_file_and_ring(
    store: LogStore, reaper: Reaper
) -> None:
    exited = run_child(store, reaper, """
        import sys
        print("hello")
        print("oops", file=sys.stderr)
        sys.stdout.write("no newline at the end")
    """)
    async with asyncio.timeout(WAIT):
        await exited
    assert await store.wait_eof(0, grace=WAIT)
    assert store.attached() == 0
    lines = store.tail(10)
    assert sorted((line.stream, line.line) for line in lines) == [
        ("stderr", "oops"), ("stdout", "hello"), ("stdout", "no newline at the end"),
    ]
    assert all(line.service == "api" and line.worker == 0 for line in lines)
    assert store.path is not None
    text = store.path.read_text().splitlines()
    assert len(text) == 3
    for row in text:
        m = TEXT_LINE.match(row)
        assert m, row
        assert m.group(2) == str(lines[0].pid)


async def test_json_format(tmp_path: Path) -> None:
    store = LogStore("api", tmp_path, LogSpec(format="json"))
    try:
        with feeding(store, worker=2, pid=42, stream="stderr") as f:
            f.write(b'say "hi"\n' + "ünïcode\n".encode())
            await wait_for(lambda: store.lines == 2, WAIT, "two lines")
        assert store.path is not None
        rows = [json.loads(r) for r in store.path.read_text().splitlines()]
        assert [r["line"] for r in rows] == ['say "hi"', "ünïcode"]
        assert rows[0]["worker"] == 2 and rows[0]["pid"] == 42 and rows[0]["stream"] == "stderr"
        assert rows[0]["service"] == "api" and rows[0]["time"].endswith("Z")
    finally:
        store.close()


async def test_tail_filters_by_worker_and_ring_is_bounded(tmp_path: Path) -> None:
    store = LogStore("api", None, LogSpec(ring_lines=50))
    try:
        with feeding(store, worker=0) as a, feeding(store, worker=1) as b:
            a.write(b"".join(b"a%d\n" % i for i in range(100)))
            b.write(b"b0\nb1\n")
            await wait_for(lambda: store.lines == 102, WAIT, "all lines")
        assert len(store.tail(1000)) == 52  # each worker keeps its own 50
        assert [line.line for line in store.tail(2, worker=1)] == ["b0", "b1"]
        assert [line.line for line in store.tail(3, worker=0)][-1] == "a99"
        assert store.tail(0) == []
        assert store.path is None  # no directory: ring only
    finally:
        store.close()


async def test_invalid_utf8_is_replaced_not_fatal(store: LogStore) -> None:
    with feeding(store) as f:
        f.write(b"bad \xff\xfe bytes\nok\n")
        await wait_for(lambda: store.lines == 2, WAIT, "lines")
    assert [line.line for line in store.tail(2)] == ["bad \ufffd\ufffd bytes", "ok"]


# ---------------------------------------------------------------- rotation


async def test_rotation_keeps_the_configured_number_of_files(tmp_path: Path) -> None:
    store = LogStore("api", tmp_path, LogSpec(max_bytes=2000, backups=2))
    try:
        with feeding(store) as f:
            for batch in range(20):
                f.write(b"".join(b"batch %02d line %02d\n" % (batch, i) for i in range(20)))
                await wait_for(functools.partial(has_lines, store, (batch + 1) * 20), WAIT, "batch")
        assert files(tmp_path) == ["api.log", "api.log.1", "api.log.2"]
        newest = (tmp_path / "api.log").read_text().splitlines()[-1]
        assert newest.endswith("batch 19 line 19")
        oldest_kept = (tmp_path / "api.log.2").read_text()
        assert "batch 00 " not in oldest_kept  # rotated away
        assert all(size <= 2000 for size in file_sizes(tmp_path))
    finally:
        store.close()


def file_bytes(directory: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted(directory.iterdir())]


async def test_one_large_batch_is_split_at_lines_across_rotations(tmp_path: Path) -> None:
    store = LogStore("api", tmp_path, LogSpec(max_bytes=1000, backups=3))
    try:
        with feeding(store) as f:
            f.write(b"".join(b"line %04d\n" % i for i in range(300)))  # 3000 bytes at once
            await wait_for(functools.partial(has_lines, store, 300), WAIT, "lines")
        assert files(tmp_path) == ["api.log", "api.log.1", "api.log.2", "api.log.3"]
        assert all(size <= 1000 for size in file_sizes(tmp_path))
        assert all(blob.endswith(b"\n") for blob in file_bytes(tmp_path))  # whole lines only
    finally:
        store.close()


async def test_rotation_without_backups_truncates(tmp_path: Path) -> None:
    store = LogStore("api", tmp_path, LogSpec(max_bytes=1000, backups=0))
    try:
        with feeding(store) as f:
            for batch in range(10):
                f.write(b"x" * 99 + b"\n")
                f.write(b"y" * 199 + b"\n")
                await wait_for(functools.partial(has_lines, store, (batch + 1) * 2), WAIT, "batch")
        assert files(tmp_path) == ["api.log"]
        assert file_sizes(tmp_path)[0] <= 1000
    finally:
        store.close()


async def test_live_spec_update(tmp_path: Path) -> None:
    store = LogStore("api", tmp_path, LogSpec(ring_lines=10))
    try:
        store.update_spec(LogSpec(ring_lines=3, max_bytes=100, backups=1))
        with feeding(store) as f:
            f.write(b"".join(b"line %d with some padding to grow\n" % i for i in range(10)))
            await wait_for(lambda: store.lines == 10, WAIT, "lines")
            f.write(b"one more line to rotate the file\n")
            await wait_for(lambda: store.lines == 11, WAIT, "line")
        assert len(store.tail(100)) == 3
        assert (tmp_path / "api.log.1").exists()
    finally:
        store.close()


# ---------------------------------------------------------------- bounded under floods


async def test_a_huge_line_without_newline_is_cut_and_bounded(
    tmp_path: Path, reaper: Reaper
) -> None:
    store = LogStore("api", tmp_path, LogSpec(max_line=1000))
    probe = LagProbe()
    try:
        exited = run_child(store, reaper, """
            import sys
            out = sys.stdout.buffer
            out.write(b"x" * (10 * 1024 * 1024))   # 10 MB, no newline yet
            out.flush()
            out.write(b"\\nnext line\\n")
            out.write(b"y" * (10 * 1024 * 1024))   # and one that never ends
        """)
        async with asyncio.timeout(WAIT * 3):
            await exited
        assert await store.wait_eof(0, grace=WAIT)
    finally:
        stall = await probe.stop()
        store.close()
    lines = [line.line for line in store.tail(10)]
    assert lines == ["x" * 1000 + CUT_MARK, "next line", "y" * 1000 + CUT_MARK]
    assert store.cut == 2
    assert stall < MAX_STALL, f"the loop stalled for {stall:.2f}s"


async def test_a_50_mb_burst_keeps_the_loop_responsive(
    tmp_path: Path, reaper: Reaper
) -> None:
    store = LogStore("api", tmp_path, LogSpec(max_bytes=8 * 1024 * 1024, backups=2))
    line_count = 500_000  # 100 bytes each: 50 MB
    probe = LagProbe()
    try:
        exited = run_child(store, reaper, f"""
            import sys
            line = b"z" * 99 + b"\\n"
            chunk = line * 10_000
            for _ in range({line_count} // 10_000):
                sys.stdout.buffer.write(chunk)
        """)
        async with asyncio.timeout(WAIT * 6):
            await exited
            assert await store.wait_eof(0, grace=WAIT * 6)
    finally:
        stall = await probe.stop()
        store.close()
    assert store.lines == line_count
    assert len(store.tail(10**9)) == LogSpec().ring_lines
    assert files(tmp_path) == ["api.log", "api.log.1", "api.log.2"]
    assert stall < MAX_STALL, f"the loop stalled for {stall:.2f}s"


async def test_a_full_disk_loses_file_lines_but_not_supervision(tmp_path: Path) -> None:
    (tmp_path / "api.log").symlink_to("/dev/full")  # every write fails with ENOSPC
    store = LogStore("api", tmp_path, LogSpec())
    try:
        with feeding(store) as f:
            f.write(b"one\ntwo\n")
            await wait_for(lambda: store.lines == 2, WAIT, "lines")
            f.write(b"three\n")
            await wait_for(lambda: store.lines == 3, WAIT, "line")
        assert store.dropped == 3
        assert [line.line for line in store.tail(3)] == ["one", "two", "three"]
    finally:
        store.close()


async def test_a_missing_log_directory_is_created(tmp_path: Path) -> None:
    store = LogStore("api", tmp_path / "new" / "dir", LogSpec())
    try:
        with feeding(store) as f:
            f.write(b"line\n")
            await wait_for(lambda: store.lines == 1, WAIT, "line")
        assert store.dropped == 0
        assert files(tmp_path / "new" / "dir") == ["api.log"]
    finally:
        store.close()


async def test_an_unusable_directory_is_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    store = LogStore("api", tmp_path / "file" / "logs", LogSpec())  # under a regular file
    try:
        with feeding(store) as f:
            f.write(b"still captured\n")
            await wait_for(lambda: store.lines == 1, WAIT, "line")
        assert store.dropped == 1
        assert store.tail(1)[0].line == "still captured"
    finally:
        store.close()


# ---------------------------------------------------------------- follow


async def collect(it: AsyncIterator[LogLine], n: int) -> list[LogLine]:
    out: list[LogLine] = []
    async with asyncio.timeout(WAIT):
        async for line in it:
            out.append(line)
            if len(out) == n:
                break
    return out


async def test_follow_sees_live_lines_of_one_worker(store: LogStore) -> None:
    everything = store.follow()
    only_1 = store.follow(worker=1)
    all_task = asyncio.create_task(collect(everything, 3))
    one_task = asyncio.create_task(collect(only_1, 1))
    await asyncio.sleep(0)  # both subscribed before anything is written
    with feeding(store, worker=0) as a, feeding(store, worker=1) as b:
        a.write(b"a1\n")
        await wait_for(lambda: store.lines == 1, WAIT, "a1")
        b.write(b"b1\n")
        await wait_for(lambda: store.lines == 2, WAIT, "b1")
        a.write(b"a2\n")
        got_all = await all_task
        got_one = await one_task
    assert [line.line for line in got_all] == ["a1", "b1", "a2"]
    assert [line.line for line in got_one] == ["b1"]
    await everything.aclose()  # type: ignore[attr-defined]
    await only_1.aclose()  # type: ignore[attr-defined]


async def test_a_slow_follower_is_told_what_it_missed(store: LogStore) -> None:
    follower = store.follow()
    first = asyncio.create_task(collect(follower, 1))
    await asyncio.sleep(0)
    total = FOLLOW_QUEUE + 500
    with feeding(store) as f:
        f.write(b"first\n")
        assert [line.line for line in await first] == ["first"]
        # the follower does not read while many lines arrive
        f.write(b"".join(b"n%d\n" % i for i in range(total)))
        await wait_for(lambda: store.lines == total + 1, WAIT, "the flood")
        f.write(b"lost too\n")  # the queue is still full
        await wait_for(lambda: store.lines == total + 2, WAIT, "one more")
        rest = await collect(follower, FOLLOW_QUEUE + 1)
        assert rest[FOLLOW_QUEUE - 1].line == f"n{FOLLOW_QUEUE - 1}"
        marker = rest[FOLLOW_QUEUE]
        assert marker.stream == SVCD_STREAM and "501 lines skipped" in marker.line
        # caught up: later lines come again, in order
        f.write(b"after\n")
        assert [line.line for line in await collect(follower, 1)] == ["after"]
    assert len(store.tail(10**9)) == LogSpec().ring_lines  # the ring lost nothing recent
    await follower.aclose()  # type: ignore[attr-defined]


async def test_close_ends_followers(store: LogStore) -> None:
    follower = store.follow()
    task = asyncio.create_task(collect(follower, 10))
    await asyncio.sleep(0)
    store.close()
    async with asyncio.timeout(WAIT):
        assert await task == []


# ---------------------------------------------------------------- pipes


async def test_detach_keeps_the_last_partial_line(store: LogStore) -> None:
    with feeding(store, worker=3, pid=7) as f:
        f.write(b"complete\nhalf a line")
        await wait_for(lambda: store.lines == 1, WAIT, "complete line")
        assert store.attached(3) == 1
        store.detach(3, pid=7)  # e.g. a grandchild still holds the write end
        assert store.attached(3) == 0
        assert [line.line for line in store.tail(2)] == ["complete", "half a line"]
        assert await store.wait_eof(3)


async def test_wait_eof_times_out_while_a_writer_lives(store: LogStore) -> None:
    with feeding(store, worker=0):
        assert not await store.wait_eof(0, grace=0.05)
        assert store.attached(0) == 1


def test_service_names_cannot_escape_the_directory(tmp_path: Path) -> None:
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError):
            LogStore(bad, tmp_path, LogSpec())


async def test_attach_after_close_closes_the_fd(store: LogStore) -> None:
    store.close()
    r, w = os.pipe()
    store.attach(0, 1, "stdout", r)
    with pytest.raises(OSError):
        os.fstat(r)
    os.close(w)


async def test_a_services_status_counts_its_dropped_and_cut_lines(tmp_path: Path) -> None:
    """LogStore.dropped and .cut reach ServiceStatus (and from there the metrics)."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "chatty.log").symlink_to("/dev/full")  # every write: ENOSPC
    code = "import sys, time; print('a\\nb\\n' + 'x' * 300, flush=True); time.sleep(60)"
    spec = ServiceSpec(
        name="chatty", command=(sys.executable, "-c", code), ready="started",
        graceful_timeout=5.0, logs=LogSpec(max_line=100),
    )  # fmt: skip
    async with asyncio.timeout(WAIT * 3), running(tmp_path) as sup:
        svc = await sup.add_service(spec)
        await wait_for(lambda: svc.status().log_lines_dropped == 3, WAIT, "3 dropped lines")
        assert svc.status().log_lines_cut == 1
