"""Worker stdout/stderr capture: lines, per-service files with rotation, ring, follow.

Each worker's stdout and stderr are pipes; `LogStore.attach` reads the agent's end with
`loop.add_reader`. Lines go to `<directory>/<service>.log` (text or JSON lines), rotated
by size into `.1` .. `.N`, into a ring buffer for `svctl logs -n`, and to live followers
for `svctl logs -f`.

Invariants (a worker's output must never hurt supervision):
- Memory is bounded: a line longer than `LogSpec.max_line` bytes is cut there (the
  kept part ends with `CUT_MARK`, the rest up to the newline is discarded), whether or
  not a newline ever comes; each worker's ring holds `ring_lines` lines; each follower queue
  holds `FOLLOW_QUEUE` lines (a slow follower loses lines and is told how many).
- The loop is never held for long: at most `MAX_READS_PER_TICK` reads of `READ_CHUNK`
  bytes per wakeup per pipe; file writes are plain write(2) into the page cache, one
  per wakeup, never fsync.
- A failing disk (ENOSPC, EIO, a removed directory) loses file lines, counted in
  `dropped`, and nothing else: ring, followers and supervision go on; the file is
  reopened on a later write.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.spec import LogSpec
from supervisor.status import LogLine

log = logging.getLogger(__name__)

#: Bytes per read(2) of a pipe (the pipe buffer is 64 KiB by default).
READ_CHUNK = 64 * 1024
#: Reads per pipe per loop wakeup: 1 MiB, then other callbacks get their turn.
MAX_READS_PER_TICK = 16
#: Appended to a line cut at LogSpec.max_line.
CUT_MARK = " [svcd: line cut]"
_CUT_MARK_B = CUT_MARK.encode()
#: Lines queued per live follower before it starts losing lines.
FOLLOW_QUEUE = 10_000
#: After a failed open of the log file, wait this long before trying again.
REOPEN_INTERVAL = 5.0
#: Mode of created log files and of a log directory created for them.
FILE_MODE = 0o640
DIR_MODE = 0o750
#: `stream` of the marker line a follower gets after losing lines.
SVCD_STREAM = "svcd"


def format_time(wall: float) -> str:
    """`2026-11-27T10:00:00.123Z` (UTC, milliseconds)."""
    ms = int(wall * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{ms:03d}Z"


class LineSplitter:
    """Cuts a byte stream into lines of at most `max_line` bytes (plus CUT_MARK).

    A longer line keeps its first `max_line` bytes and ends with CUT_MARK; the rest of
    it, up to the newline, is discarded as it arrives, so memory stays bounded even
    when no newline ever comes. `cut` counts the lines cut.
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self.cut = 0
        self._partial = bytearray()
        self._discarding = False  # inside the rest of a line that was cut

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines completed by `chunk` (without their newlines)."""
        out: list[bytes] = []
        max_line = self.max_line
        parts = chunk.split(b"\n")
        rest = parts.pop()
        if parts:
            if self._discarding:
                self._discarding = False  # the newline that ends a cut line
                del parts[0]
            elif self._partial:
                self._partial += parts[0]
                parts[0] = bytes(self._partial)
            self._partial.clear()
            for line in parts:
                if len(line) > max_line:
                    self.cut += 1
                    line = line[:max_line] + _CUT_MARK_B
                out.append(line)
        if rest and not self._discarding:
            self._partial += rest
            if len(self._partial) > max_line:
                # no newline in sight: emit what fits now, drop the rest of this line
                self.cut += 1
                out.append(bytes(self._partial[:max_line]) + _CUT_MARK_B)
                self._partial.clear()
                self._discarding = True
        return out

    def finish(self) -> list[bytes]:
        """At EOF: the last line if it had no newline."""
        last = [] if self._discarding or not self._partial else [bytes(self._partial)]
        self._partial.clear()
        self._discarding = False
        return last


@dataclass
class _Pipe:
    worker: int
    pid: int
    stream: str
    fd: int
    prefix: bytes  # b"api:0[1234] stdout: "
    loop: asyncio.AbstractEventLoop
    closed: asyncio.Future[None]
    lines: LineSplitter


@dataclass(eq=False)  # identity semantics: kept in a set
class _Follower:
    worker: int | None
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    # lines, and ints where that many lines were lost (the queue was full)
    queue: collections.deque[LogLine | int] = field(default_factory=collections.deque)

    def offer(self, lines: list[LogLine]) -> None:
        queue = self.queue
        room = max(FOLLOW_QUEUE - len(queue), 0)
        queue.extend(lines[:room])
        lost = len(lines) - room
        if lost > 0:
            if queue and isinstance(queue[-1], int):
                queue[-1] += lost
            else:
                queue.append(lost)
        self.wakeup.set()


class _LogFile:
    """Appends to one file, rotating by size into path.1 .. path.N. Never raises."""

    def __init__(self, path: Path, spec: LogSpec) -> None:
        self.path = path
        self.spec = spec
        self._fd: int | None = None
        self._size = 0
        self._retry_at = 0.0
        self.failing = False

    def write(self, data: bytes) -> bool:
        """Append `data`; False if (part of) it was lost."""
        try:
            if self._fd is None:
                if time.monotonic() < self._retry_at:
                    return False
                self._open()
            while data:
                chunk = self._fitting(data)
                if not chunk:
                    self._rotate()
                    continue
                self._append(chunk)
                data = data[len(chunk) :]
        except OSError as exc:
            if not self.failing:
                log.warning("log file %s: %s; dropping lines until it works again", self.path, exc)
            self.failing = True
            self._close()
            self._retry_at = time.monotonic() + REOPEN_INTERVAL
            return False
        if self.failing:
            log.warning("log file %s: writing again", self.path)
            self.failing = False
        return True

    def _fitting(self, data: bytes) -> bytes:
        """The whole lines of `data` that fit before max_bytes; b"" means rotate first.

        A batch read in one wakeup can be far larger than the limit, so it is split at
        line boundaries; a single line longer than the limit goes alone into a fresh file.
        """
        limit = self.spec.max_bytes
        if limit <= 0 or self._size + len(data) <= limit:
            return data
        room = limit - self._size
        cut = data.rfind(b"\n", 0, room) + 1 if room > 0 else 0
        if cut:
            return data[:cut]
        if self._size > 0:
            return b""
        return data[: data.find(b"\n") + 1 or len(data)]

    def _append(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            self._size += n
            view = view[n:]

    def _open(self) -> None:
        self.path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        self._fd = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE
        )
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        self._close()
        backups = self.spec.backups
        if backups <= 0:
            os.truncate(self.path, 0)
        else:
            for i in range(backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._open()

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        self._close()


class LogStore:
    """All captured output of one service (every worker, both streams).

    Use from the loop thread. `attach` takes ownership of the read end of a pipe and
    closes it at EOF, on `detach` or on `close`.
    """

    def __init__(self, service: str, directory: Path | None, spec: LogSpec) -> None:
        if not service or "/" in service or service.startswith("."):
            raise ValueError(f"bad service name for a log file: {service!r}")
        self.service = service
        self.spec = spec
        self.path = None if directory is None else Path(directory) / f"{service}.log"
        self._file = None if self.path is None else _LogFile(self.path, spec)
        # one ring per worker slot, so a chatty sibling never evicts a quiet worker's lines
        self._rings: dict[int, collections.deque[LogLine]] = {}
        self._pipes: dict[int, _Pipe] = {}
        self._followers: set[_Follower] = set()
        self._closed = False
        self.lines = 0  # lines captured
        self._cut_closed = 0  # lines cut in pipes that are closed now
        self.dropped = 0  # lines that could not be written to the file

    @property
    def cut(self) -> int:
        """Lines cut at max_line so far."""
        return self._cut_closed + sum(p.lines.cut for p in self._pipes.values())

    # -- pipes ---------------------------------------------------------------------

    def attach(
        self, worker: int, pid: int, stream: str, fd: int, label: str | None = None
    ) -> None:
        """Start capturing `fd` (the read end of the worker's stdout or stderr pipe).

        `label` names the source in the file (default: the worker index).
        """
        if self._closed:
            os.close(fd)
            return
        loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        prefix = f"{self.service}:{label or worker}[{pid}] {stream}: ".encode()
        pipe = _Pipe(
            worker, pid, stream, fd, prefix, loop, loop.create_future(),
            LineSplitter(self.spec.max_line),
        )
        self._pipes[fd] = pipe
        loop.add_reader(fd, self._on_readable, pipe)

    def detach(self, worker: int, pid: int | None = None) -> None:
        """Stop capturing `worker`'s pipes (of `pid` only, if given), keeping what is
        already in the pipe now (bounded) and a last unterminated line."""
        for pipe in list(self._pipes.values()):
            if pipe.worker == worker and (pid is None or pipe.pid == pid):
                self._read(pipe)
                if pipe.fd in self._pipes:
                    last = pipe.lines.finish()
                    if last:
                        self._emit(pipe, last)
                    self._close_pipe(pipe)

    async def wait_eof(self, worker: int, pid: int | None = None, grace: float = 1.0) -> bool:
        """Wait until `worker`'s pipes (of `pid`) reached EOF; False after `grace` s.

        A worker's last lines arrive after its exit status; await this before reporting
        the exit to show them. Pipes still open after `grace` (a grandchild holds
        them) stay attached. Cancellation only stops the wait.
        """
        waits = [
            p.closed
            for p in self._pipes.values()
            if p.worker == worker and (pid is None or p.pid == pid)
        ]
        if not waits:
            return True
        _, pending = await asyncio.wait(waits, timeout=grace)
        return not pending

    def attached(self, worker: int | None = None) -> int:
        """Number of open pipes (of `worker`)."""
        return sum(1 for p in self._pipes.values() if worker is None or p.worker == worker)

    def _on_readable(self, pipe: _Pipe) -> None:
        try:
            self._read(pipe)
        except Exception:  # a reader must never raise into the loop
            log.exception("logs of %s: capture failed; closing the pipe", self.service)
            self._close_pipe(pipe)

    def _read(self, pipe: _Pipe) -> None:
        lines: list[bytes] = []
        eof = False
        for _ in range(MAX_READS_PER_TICK):
            try:
                chunk = os.read(pipe.fd, READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                eof = True
                break
            if not chunk:
                eof = True
                break
            lines += pipe.lines.feed(chunk)
        if eof:
            lines += pipe.lines.finish()
        if lines:
            self._emit(pipe, lines)
        if eof:
            self._close_pipe(pipe)

    def _close_pipe(self, pipe: _Pipe) -> None:
        if self._pipes.pop(pipe.fd, None) is None:
            return
        self._cut_closed += pipe.lines.cut
        if not pipe.loop.is_closed():
            pipe.loop.remove_reader(pipe.fd)
        with contextlib.suppress(OSError):
            os.close(pipe.fd)
        if not pipe.closed.done():
            pipe.closed.set_result(None)

    # -- output --------------------------------------------------------------------

    def _emit(self, pipe: _Pipe, lines: list[bytes]) -> None:
        now = time.time()
        self.lines += len(lines)
        if self._file is not None:
            data = self._file_bytes(pipe, lines, now)
            if not self._file.write(data):
                self.dropped += len(lines)
        followers = [f for f in self._followers if f.worker in (None, pipe.worker)]
        # Only the lines that will stay in the ring (or that a follower wants) become
        # LogLine objects: a flood costs a split and a write, not an object per line.
        ring = self._ring_of(pipe.worker)
        keep = len(lines) if followers else min(len(lines), ring.maxlen or 0)
        made = [
            LogLine(now, self.service, pipe.worker, pipe.pid, pipe.stream, _text(b))
            for b in lines[len(lines) - keep :]
        ]
        ring.extend(made)
        for follower in followers:
            follower.offer(made)

    def _file_bytes(self, pipe: _Pipe, lines: list[bytes], now: float) -> bytes:
        stamp = format_time(now)
        if self.spec.format == "json":
            head = {
                "time": stamp,
                "service": self.service,
                "worker": pipe.worker,
                "pid": pipe.pid,
                "stream": pipe.stream,
            }
            return "".join(
                json.dumps({**head, "line": _text(b)}, ensure_ascii=False) + "\n" for b in lines
            ).encode()
        head_b = stamp.encode() + b" " + pipe.prefix
        return head_b + (b"\n" + head_b).join(lines) + b"\n"

    # -- reading back --------------------------------------------------------------

    def _ring_of(self, worker: int) -> collections.deque[LogLine]:
        ring = self._rings.get(worker)
        if ring is None:
            ring = self._rings[worker] = collections.deque(maxlen=self.spec.ring_lines)
        return ring

    def tail(self, n: int, worker: int | None = None) -> list[LogLine]:
        """The last `n` captured lines (of `worker`, else of every worker), oldest first.

        Each worker slot keeps its own `ring_lines`; the service view merges them by time.
        """
        if n <= 0:
            return []
        if worker is not None:
            return list(self._rings.get(worker, ()))[-n:]
        recent = (list(ring)[-n:] for ring in self._rings.values())
        return list(heapq.merge(*recent, key=lambda line: line.time))[-n:]

    async def follow(self, worker: int | None = None) -> AsyncIterator[LogLine]:
        """Live lines (of `worker`) from now on, until `close()`.

        A follower that falls more than FOLLOW_QUEUE lines behind loses lines; where
        they were, it gets one line with stream "svcd" saying how many. Cancelling the consumer (or
        leaving the `async for`) unsubscribes.
        """
        follower = _Follower(worker)
        self._followers.add(follower)
        try:
            while True:
                while follower.queue:
                    item = follower.queue.popleft()
                    if isinstance(item, int):
                        yield LogLine(
                            time.time(), self.service, -1 if worker is None else worker, 0,
                            SVCD_STREAM, f"[svcd: {item} lines skipped: reader too slow]",
                        )
                    else:
                        yield item
                if self._closed:
                    return
                follower.wakeup.clear()
                await follower.wakeup.wait()
        finally:
            self._followers.discard(follower)

    # -- lifecycle -----------------------------------------------------------------

    def update_spec(self, spec: LogSpec) -> None:
        """Apply new rotation/ring/line settings live (no restart of workers)."""
        self.spec = spec
        if self._file is not None:
            self._file.spec = spec
        for worker, ring in list(self._rings.items()):
            if spec.ring_lines != ring.maxlen:
                self._rings[worker] = collections.deque(ring, maxlen=spec.ring_lines)

    def close(self) -> None:
        """Close every pipe and the file; followers finish. Idempotent."""
        self._closed = True
        for pipe in list(self._pipes.values()):
            self._close_pipe(pipe)
        if self._file is not None:
            self._file.close()
        for follower in self._followers:
            follower.wakeup.set()


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace")
