"""Health checks of one worker: the check kinds and the rise/fall monitor that runs them.

A *check* is a coroutine `(HealthSpec, CheckTarget) -> CheckResult`; it never raises for
an unhealthy worker, it answers `CheckResult(ok=False, reason=...)`. This module provides
the `http`, `tcp` and `exec` kinds (`default_checks`); other kinds plug in through the
same signature (the agent adds `grpc`, so that this package never imports grpc).

`HealthMonitor` runs one check against one worker every `interval`, each run bounded by
`timeout`, and turns the results into a health state with hysteresis:

    unknown/failing --rise passes in a row--> passing
    unknown/passing --fall failures in a row--> failing

Invariants:
- `on_change(health, reason)` is called exactly once per change of `health`, never for a
  repeat of the current state; `reason` is "" for "passing".
- Failures before the first pass and within `start_period` of `run()` starting do not
  count (a slow-starting worker is not condemned); the first pass ends that grace.
- A check never outlives its `timeout`: the monitor cancels it, and the exec kind kills
  its child's whole process group on timeout or cancellation and waits for the reaper.
- A tcp check passes only for a connection the worker accepted, not one the kernel
  merely completed into the backlog of the (agent-bound) health listener.
- Cancelling `run()` stops the monitor; it holds no resources between checks.
- No asyncio subprocesses: the exec kind spawns through `supervisor.spawn` and waits through
  the agent's one `Reaper` (asyncio's child watchers would steal exit statuses).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from supervisor.errors import SupervisorError
from supervisor.reaper import ExitStatus, Reaper, signal_group
from supervisor.spawn import EXIT_EXEC_FAILED, SpawnRequest, spawn
from supervisor.spec import EMPTY_ENV, HealthSpec

log = logging.getLogger(__name__)

Health = Literal["unknown", "passing", "failing"]

#: An HTTP status line longer than this is not one (and must not make us buffer forever).
MAX_STATUS_LINE = 4096
#: After SIGKILL of a timed-out exec check, how long to wait for the reaper to see it go.
EXEC_REAP_GRACE = 5.0
#: Output of an exec check kept for its failure reason, and how much of it is shown.
MAX_EXEC_OUTPUT = 4096
MAX_REASON_OUTPUT = 200
EXEC_READ_CHUNK = 65536
#: Reads per wakeup of the output drain, so a chatty check cannot hold the loop.
EXEC_READS_PER_WAKEUP = 16
#: struct tcp_info (linux/tcp.h): `tcpi_state` is byte 0, and `tcpi_unacked`, a u32 at
#: byte 24, is the accept-queue length when the socket is in LISTEN state.
TCP_INFO_LEN = 104
TCPI_UNACKED_OFFSET = 24
TCP_STATE_LISTEN = 10
#: How often a tcp check looks at the accept queue while waiting for the worker to accept.
ACCEPT_POLL_INTERVAL = 0.005
#: Environment variable telling an exec check which worker it is checking.
WORKER_PID_ENV = "SVCD_WORKER_PID"
USER_AGENT = "svcd-health"


@dataclass(frozen=True)
class CheckTarget:
    """The one worker a check looks at.

    `host`/`port` is that worker's private `svcd-health` listener (http, tcp, grpc);
    `env` is the worker's environment (the exec kind runs its command with it);
    `listener` is the agent's own copy of that listening socket, when it has one: the
    tcp kind reads its accept queue to tell an accepting worker from a hung one.
    """

    host: str
    port: int
    worker: str  # "service:index"
    pid: int
    env: Mapping[str, str] = field(default_factory=lambda: EMPTY_ENV)
    listener: socket.socket | None = None


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check run; `reason` says why it failed ("" when ok)."""

    ok: bool
    reason: str = ""


CheckFn = Callable[[HealthSpec, CheckTarget], Awaitable[CheckResult]]

PASS = CheckResult(True)


def _connect_reason(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connect refused"
    return f"connect failed: {exc.strerror or exc!r}"


def _host_header(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def accept_queue_length(listener: socket.socket) -> int | None:
    """How many connections wait in `listener`'s accept queue; None when unknown.

    Linux reports it as `tcpi_unacked` of a listening socket's TCP_INFO. None when the
    socket is closed, not listening, or the kernel does not answer.
    """
    try:
        info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
    except OSError:
        return None
    if len(info) < TCPI_UNACKED_OFFSET + 4 or info[0] != TCP_STATE_LISTEN:
        return None
    queued: int = struct.unpack_from("=I", info, TCPI_UNACKED_OFFSET)[0]
    return queued


async def check_tcp(spec: HealthSpec, target: CheckTarget) -> CheckResult:
    """Pass when the worker accepts a TCP connection on its health listener.

    A connect alone proves nothing there: the agent binds the listener before the worker
    runs, so the kernel completes every handshake into the backlog whether or not the
    worker is alive. With `target.listener` (the agent's copy of that socket) the check
    therefore connects, then waits until the accept queue is empty: only the agent
    connects to the private listener, so an empty queue means the worker took our
    connection (and any left behind by earlier, timed-out checks). Without a listener
    (a check against some other address) an open connection is all it can ask for.
    Bounded by `spec.timeout`: a worker that never accepts fails with a timeout.
    """
    try:
        async with asyncio.timeout(spec.timeout):
            _, writer = await asyncio.open_connection(target.host, target.port)
            try:
                if target.listener is None:
                    return PASS
                return await _wait_accepted(target.listener)
            finally:
                await _close(writer)
    except TimeoutError:
        return CheckResult(False, f"timeout after {spec.timeout}s")
    except OSError as exc:
        return CheckResult(False, _connect_reason(exc))


async def _wait_accepted(listener: socket.socket) -> CheckResult:
    """Poll the listener's accept queue until it is empty; the caller bounds the wait."""
    # On loopback the kernel queues our connection while handling the handshake's last
    # ACK, in the same softirq pass that woke our connect, long before this coroutine
    # resumes; so an empty queue here is the worker accepting, not a connection still on
    # its way. Were it ever seen too early, the next check would catch it: a connection
    # nobody accepts stays in the queue after we close it.
    while True:
        queued = accept_queue_length(listener)
        if queued is None:
            return CheckResult(False, "health listener closed or not listening")
        if queued == 0:
            return PASS
        await asyncio.sleep(ACCEPT_POLL_INTERVAL)


def parse_status_line(line: bytes) -> int | None:
    """The status code of an HTTP/1.x status line, or None when it is not one."""
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        return None
    code = parts[1]
    if len(code) != 3 or not code.isdigit():
        return None
    return int(code)


async def check_http(spec: HealthSpec, target: CheckTarget) -> CheckResult:
    """GET `spec.path` from the worker; pass when the status is within `expect_status`.

    Only the status line is read: a health endpoint's body carries nothing we act on,
    and reading it would let a misbehaving worker make us buffer without bound.
    """
    try:
        reader, writer = await asyncio.open_connection(
            target.host, target.port, limit=MAX_STATUS_LINE
        )
    except OSError as exc:
        return CheckResult(False, _connect_reason(exc))
    try:
        request = (
            f"GET {spec.path} HTTP/1.1\r\n"
            f"Host: {_host_header(target.host, target.port)}\r\n"
            f"User-Agent: {USER_AGENT}\r\n"
            "Accept: */*\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(request.encode("latin-1"))
        await writer.drain()
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return CheckResult(False, "connection closed without a response")
        return CheckResult(False, "truncated status line")
    except (asyncio.LimitOverrunError, ValueError):
        return CheckResult(False, "status line too long")
    except OSError as exc:
        return CheckResult(False, f"connection error: {exc.strerror or exc!r}")
    finally:
        await _close(writer)
    status = parse_status_line(line)
    if status is None:
        return CheckResult(False, f"bad status line: {line[:80]!r}")
    low, high = spec.expect_status
    if low <= status <= high:
        return PASS
    return CheckResult(False, f"HTTP {status}")


class _OutputTail:
    """Drains a check's stdout/stderr pipe on the loop, keeping only the first bytes.

    Draining matters: a check writing more than a pipe buffer would otherwise block and
    read as a timeout. Only the first `MAX_EXEC_OUTPUT` bytes are kept (for the reason).
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._kept = bytearray()
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._drain)

    def _drain(self) -> None:
        for _ in range(EXEC_READS_PER_WAKEUP):
            try:
                chunk = os.read(self._fd, EXEC_READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._loop.remove_reader(self._fd)  # EOF: every writer is gone
                return
            room = MAX_EXEC_OUTPUT - len(self._kept)
            if room > 0:
                self._kept += chunk[:room]

    def close(self) -> str:
        """Stop draining; the first non-empty line of what was kept."""
        self._drain()
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        for line in self._kept.decode("utf-8", "replace").splitlines():
            if line.strip():
                return line.strip()[:MAX_REASON_OUTPUT]
        return ""


def make_exec_check(reaper: Reaper) -> CheckFn:
    """The `exec` kind: run `spec.command`, exit 0 = pass, bounded by `spec.timeout`.

    The command gets the worker's environment plus SVCD_WORKER_PID and is never run by
    a shell. Its process group is killed when it is done, times out or is cancelled:
    whatever a check starts ends with it. Its first line of output goes into the reason.
    """

    async def check_exec(spec: HealthSpec, target: CheckTarget) -> CheckResult:
        if not spec.command:
            return CheckResult(False, "no command")
        env = dict(target.env)
        env[WORKER_PID_ENV] = str(target.pid)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        since = time.monotonic()
        try:
            pid = spawn(
                SpawnRequest(argv=spec.command, env=env, stdout=write_fd, stderr=write_fd)
            )
        except SupervisorError as exc:
            os.close(read_fd)
            return CheckResult(False, f"cannot run {spec.command[0]}: {exc}")
        finally:
            os.close(write_fd)
        exited = reaper.watch(pid, since=since)
        output = _OutputTail(read_fd)
        status: ExitStatus | None = None
        try:
            async with asyncio.timeout(spec.timeout):
                status = await asyncio.shield(exited)
        except TimeoutError:
            pass
        finally:
            # Done, timed out or cancelled by the monitor: leave no process behind.
            signal_group(pid, signal.SIGKILL)
            first_line = output.close()
        if status is None:
            # The reaper reports the killed leader soon; wait for it so it is not
            # left for a later check to trip over (bounded: SIGKILL cannot be ignored).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EXEC_REAP_GRACE):
                    await asyncio.shield(exited)
            return CheckResult(False, f"timeout after {spec.timeout}s")
        if status.success:
            return PASS
        reason = status.describe()
        if status.code == EXIT_EXEC_FAILED:
            reason = f"cannot run {spec.command[0]} ({reason})"
        return CheckResult(False, f"{reason}: {first_line}" if first_line else reason)

    return check_exec


def default_checks(reaper: Reaper) -> dict[str, CheckFn]:
    """The kinds this package implements: http, tcp and exec (exec needs the reaper)."""
    return {"http": check_http, "tcp": check_tcp, "exec": make_exec_check(reaper)}


class HealthMonitor:
    """Runs one check against one worker and tracks its health with rise/fall.

    Created by the worker slot for each worker process; `run()` is its long-lived task.
    Attributes are read by status: `health`, `reason` (the last failure; cleared when
    the worker turns passing), `consecutive_failures`, `consecutive_passes`.
    """

    def __init__(
        self,
        spec: HealthSpec,
        target: CheckTarget,
        check: CheckFn,
        on_change: Callable[[str, str], None],
    ) -> None:
        self.spec = spec
        self.target = target
        self._check = check
        self._on_change = on_change
        self.health: Health = "unknown"
        self.reason = ""
        self.consecutive_failures = 0
        self.consecutive_passes = 0
        self.checks_run = 0
        self._in_grace = spec.start_period > 0
        self._grace_until = 0.0

    async def run(self) -> None:
        """Check every `interval` until cancelled (cancellation is the only way out).

        A kind of "none" has nothing to run: returns at once, health stays "unknown".
        Exceptions from `on_change` are logged, not raised: one bad callback must not end
        health checking of a worker.
        """
        if self.spec.kind == "none":
            return
        self._grace_until = time.monotonic() + self.spec.start_period
        while True:
            started = time.monotonic()
            result = await self.check_once()
            self._record(result, started)
            delay = started + self.spec.interval - time.monotonic()
            # A check that overran the interval is followed at once, never twice at once.
            await asyncio.sleep(max(0.0, delay))

    async def check_once(self) -> CheckResult:
        """Run the check once, bounded by `timeout`; errors become failures."""
        self.checks_run += 1
        try:
            async with asyncio.timeout(self.spec.timeout):
                return await self._check(self.spec, self.target)
        except TimeoutError:
            return CheckResult(False, f"timeout after {self.spec.timeout}s")
        except Exception as exc:  # a buggy check kind must read as a failure, not a crash
            log.exception("health check of %s raised", self.target.worker)
            return CheckResult(False, f"check error: {exc!r}")

    def _record(self, result: CheckResult, at: float) -> None:
        if self._in_grace and (result.ok or at >= self._grace_until):
            self._in_grace = False  # the first pass (or the deadline) ends the grace
        if result.ok:
            self.consecutive_passes += 1
            self.consecutive_failures = 0
            if self.health != "passing" and self.consecutive_passes >= self.spec.rise:
                self.reason = ""
                self._set("passing", "")
            return
        self.reason = result.reason
        self.consecutive_passes = 0
        if self._in_grace:
            return  # start_period: the worker may still be starting
        self.consecutive_failures += 1
        if self.health != "failing" and self.consecutive_failures >= self.spec.fall:
            self._set("failing", result.reason)

    def _set(self, health: Health, reason: str) -> None:
        self.health = health
        try:
            self._on_change(health, reason)
        except Exception:
            log.exception("health change callback of %s raised", self.target.worker)
