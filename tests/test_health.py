"""Health checks against real sockets and real processes, and the rise/fall monitor."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import psutil
import pytest

from supervisor.health import (
    CheckFn,
    CheckResult,
    CheckTarget,
    HealthMonitor,
    check_http,
    check_tcp,
    default_checks,
    parse_status_line,
)
from supervisor.reaper import Reaper
from supervisor.spec import HealthSpec
from tests.conftest import free_port
from tests.waiting import wait_for

TEST_TIMEOUT = 20.0
FAST = 0.02  # check interval in tests: conditions are waited for, never timed


class ScriptedHttp:
    """An HTTP server on 127.0.0.1 answering the n-th request with `statuses[n]`.

    After the script runs out it repeats the last status. `hang=True` accepts and
    reads but never answers.
    """

    def __init__(self, statuses: Sequence[int] = (200,), hang: bool = False) -> None:
        self.statuses = list(statuses)
        self.hang = hang
        self.requests = 0
        self.paths: list[str] = []
        self._server: asyncio.Server | None = None
        self._release = asyncio.Event()

    async def __aenter__(self) -> ScriptedHttp:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._release.set()
        self._server.close()
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.paths.append(head.split()[1].decode())
            if self.hang:
                await self._release.wait()
                return
            n = self.requests
            self.requests += 1
            status = self.statuses[min(n, len(self.statuses) - 1)]
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok".encode())
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def target(port: int, **env: str) -> CheckTarget:
    return CheckTarget(host="127.0.0.1", port=port, worker="api:0", pid=4242, env=env)


class Changes:
    """Records on_change calls with the monitor's check count at that moment."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, int]] = []
        self.monitor: HealthMonitor | None = None

    def __call__(self, health: str, reason: str) -> None:
        assert self.monitor is not None
        self.seen.append((health, reason, self.monitor.checks_run))


@contextlib.asynccontextmanager
async def running(monitor: HealthMonitor) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(monitor.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def monitor_for(spec: HealthSpec, tgt: CheckTarget, check: CheckFn = check_http) -> tuple[
    HealthMonitor, Changes
]:
    changes = Changes()
    mon = HealthMonitor(spec, tgt, check, changes)
    changes.monitor = mon
    return mon, changes


@pytest.fixture
async def reaper() -> AsyncIterator[Reaper]:
    r = Reaper()
    r.start()
    yield r
    r.close()


@pytest.fixture
def exec_check(reaper: Reaper) -> Iterator[CheckFn]:
    yield default_checks(reaper)["exec"]


def py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


# -- http ------------------------------------------------------------------------------


async def test_http_rise_and_fall_counts_are_respected() -> None:
    script = [200, 200, 500, 200, 500, 500, 500, 200, 200]
    spec = HealthSpec(kind="http", path="/healthz", interval=FAST, timeout=2.0, rise=2, fall=3)
    async with asyncio.timeout(TEST_TIMEOUT), ScriptedHttp(script) as server:
        mon, changes = monitor_for(spec, target(server.port))
        async with running(mon):
            await wait_for(lambda: len(changes.seen) >= 3, what="three health changes")
        assert changes.seen[:3] == [
            ("passing", "", 2),  # two passes in a row
            ("failing", "HTTP 500", 7),  # the lone 500 at check 3 did not count
            ("passing", "", 9),
        ]
        assert server.paths[0] == "/healthz"
        assert mon.reason == ""  # cleared on the way back to passing


async def test_http_status_range() -> None:
    spec = HealthSpec(kind="http", expect_status=(200, 204))
    async with asyncio.timeout(TEST_TIMEOUT):
        async with ScriptedHttp([204]) as server:
            assert await check_http(spec, target(server.port)) == CheckResult(True)
        async with ScriptedHttp([301]) as server:
            assert await check_http(spec, target(server.port)) == CheckResult(False, "HTTP 301")


async def test_http_server_that_never_answers_fails_by_timeout() -> None:
    spec = HealthSpec(kind="http", interval=FAST, timeout=0.2, rise=1, fall=2)
    async with asyncio.timeout(TEST_TIMEOUT), ScriptedHttp(hang=True) as server:
        mon, changes = monitor_for(spec, target(server.port))
        async with running(mon):
            await wait_for(lambda: changes.seen, what="failing")
        assert changes.seen == [("failing", "timeout after 0.2s", 2)]
        assert mon.consecutive_failures >= 2


async def test_http_connect_refused_and_garbage() -> None:
    spec = HealthSpec(kind="http")
    async with asyncio.timeout(TEST_TIMEOUT):
        result = await check_http(spec, target(free_port()))
        assert result == CheckResult(False, "connect refused")

        async def garbage(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"SSH-2.0-nope\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(garbage, "127.0.0.1", 0)
        try:
            port = server.sockets[0].getsockname()[1]
            result = await check_http(spec, target(port))
            assert not result.ok and result.reason.startswith("bad status line")
        finally:
            server.close()
            await server.wait_closed()


def test_parse_status_line() -> None:
    assert parse_status_line(b"HTTP/1.1 200 OK\r\n") == 200
    assert parse_status_line(b"HTTP/1.0 503\r\n") == 503
    assert parse_status_line(b"HTTP/1.1 20 OK\r\n") is None
    assert parse_status_line(b"hello\r\n") is None


# -- tcp -------------------------------------------------------------------------------


async def test_tcp_check_against_closed_port_fails() -> None:
    spec = HealthSpec(kind="tcp", interval=FAST, timeout=1.0, rise=1, fall=2)
    async with asyncio.timeout(TEST_TIMEOUT):
        mon, changes = monitor_for(spec, target(free_port()), check_tcp)
        async with running(mon):
            await wait_for(lambda: changes.seen, what="failing")
        assert changes.seen == [("failing", "connect refused", 2)]


async def test_tcp_check_passes_on_accepting_port() -> None:
    spec = HealthSpec(kind="tcp")
    async with asyncio.timeout(TEST_TIMEOUT), ScriptedHttp(hang=True) as server:
        assert await check_tcp(spec, target(server.port)) == CheckResult(True)


@contextlib.contextmanager
def health_listener() -> Iterator[tuple[socket.socket, CheckTarget]]:
    """A listening socket like the agent's private one, and a target carrying it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        port = sock.getsockname()[1]
        yield sock, CheckTarget("127.0.0.1", port, "api:0", 4242, listener=sock)
    finally:
        sock.close()


async def test_tcp_check_fails_when_nobody_accepts_on_the_listener() -> None:
    # The agent's listener completes every handshake into its backlog: a worker that
    # exists but never accepts must still fail, by timeout.
    spec = HealthSpec(kind="tcp", interval=FAST, timeout=0.2, rise=1, fall=2)
    async with asyncio.timeout(TEST_TIMEOUT):
        with health_listener() as (_, tgt):
            assert await check_tcp(spec, tgt) == CheckResult(False, "timeout after 0.2s")
            mon, changes = monitor_for(spec, tgt, check_tcp)
            async with running(mon):
                await wait_for(lambda: changes.seen, what="failing")
            assert changes.seen == [("failing", "timeout after 0.2s", 2)]


async def test_tcp_check_passes_when_the_worker_accepts_on_the_listener() -> None:
    spec = HealthSpec(kind="tcp", interval=FAST, timeout=5.0, rise=2, fall=1)
    accepted = 0

    async def worker(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    async with asyncio.timeout(TEST_TIMEOUT):
        with health_listener() as (sock, tgt):
            # the worker's own copy of the listening socket, as socket activation hands it
            server = await asyncio.start_server(worker, sock=sock.dup())
            try:
                mon, changes = monitor_for(spec, tgt, check_tcp)
                async with running(mon):
                    await wait_for(lambda: changes.seen, what="passing")
                assert changes.seen == [("passing", "", 2)]
                assert accepted >= 2
            finally:
                server.close()
                await server.wait_closed()


async def test_tcp_check_fails_when_the_listener_is_closed() -> None:
    spec = HealthSpec(kind="tcp", timeout=1.0)
    async with asyncio.timeout(TEST_TIMEOUT), ScriptedHttp(hang=True) as server:
        with health_listener() as (sock, _):
            sock.close()
            tgt = CheckTarget("127.0.0.1", server.port, "api:0", 4242, listener=sock)
            result = await check_tcp(spec, tgt)
            assert result == CheckResult(False, "health listener closed or not listening")


# -- start_period and the monitor's own rules --------------------------------------------


async def test_failures_within_start_period_do_not_count() -> None:
    spec = HealthSpec(kind="http", interval=FAST, rise=1, fall=1, start_period=60.0)
    async with asyncio.timeout(TEST_TIMEOUT), ScriptedHttp([500]) as server:
        mon, changes = monitor_for(spec, target(server.port))
        async with running(mon):
            await wait_for(lambda: mon.checks_run >= 5, what="five checks")
            assert mon.health == "unknown"
            assert mon.consecutive_failures == 0
            assert mon.reason == "HTTP 500"  # visible, just not counted
        assert changes.seen == []


async def test_first_pass_ends_the_start_period() -> None:
    spec = HealthSpec(kind="http", interval=FAST, rise=1, fall=1, start_period=60.0)
    async with asyncio.timeout(TEST_TIMEOUT), ScriptedHttp([500, 500, 200, 500]) as server:
        mon, changes = monitor_for(spec, target(server.port))
        async with running(mon):
            await wait_for(lambda: len(changes.seen) >= 2, what="passing then failing")
        assert changes.seen[:2] == [("passing", "", 3), ("failing", "HTTP 500", 4)]


async def test_start_period_ends_by_time() -> None:
    spec = HealthSpec(kind="http", interval=FAST, rise=1, fall=2, start_period=0.1)
    async with asyncio.timeout(TEST_TIMEOUT), ScriptedHttp([500]) as server:
        mon, changes = monitor_for(spec, target(server.port))
        async with running(mon):
            await wait_for(lambda: changes.seen, what="failing after the start period")
        assert changes.seen[0][:2] == ("failing", "HTTP 500")


async def test_kind_none_returns_at_once() -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        mon, _ = monitor_for(HealthSpec(kind="none"), target(1))
        await mon.run()
        assert mon.health == "unknown" and mon.checks_run == 0


async def test_raising_check_and_callback_do_not_stop_the_monitor() -> None:
    calls = 0

    async def broken(spec: HealthSpec, tgt: CheckTarget) -> CheckResult:
        nonlocal calls
        calls += 1
        raise RuntimeError("bug")

    def bad_callback(health: str, reason: str) -> None:
        raise RuntimeError("callback bug")

    spec = HealthSpec(kind="tcp", interval=FAST, rise=1, fall=1)
    mon = HealthMonitor(spec, target(1), broken, bad_callback)
    async with asyncio.timeout(TEST_TIMEOUT), running(mon):
        await wait_for(lambda: calls >= 3, what="checks go on")
    assert mon.health == "failing"
    assert "RuntimeError('bug')" in mon.reason


# -- exec ------------------------------------------------------------------------------


async def test_exec_check_exit_codes_and_env(exec_check: CheckFn, tmp_path: Path) -> None:
    check = exec_check
    async with asyncio.timeout(TEST_TIMEOUT):
        ok = HealthSpec(kind="exec", command=py(
            "import os, sys; sys.exit(0 if os.environ['SVCD_WORKER_PID'] == '4242'"
            " and os.environ['APP'] == 'x' else 3)"
        ))
        assert await check(ok, target(0, APP="x")) == CheckResult(True)
        bad = HealthSpec(kind="exec", command=py("print('db down'); raise SystemExit(1)"))
        result = await check(bad, target(0))
        assert result == CheckResult(False, "exited with code 1: db down")
        missing = HealthSpec(kind="exec", command=(str(tmp_path / "no-such-program"),))
        result = await check(missing, target(0))
        assert not result.ok and result.reason.startswith("cannot run")


async def test_exec_check_drains_large_output(exec_check: CheckFn) -> None:
    spec = HealthSpec(kind="exec", timeout=10.0, command=py(
        "import sys; sys.stdout.write('first\\n' + 'x' * 2_000_000); sys.exit(2)"
    ))
    async with asyncio.timeout(TEST_TIMEOUT):
        result = await exec_check(spec, target(0))
    assert result == CheckResult(False, "exited with code 2: first")


async def test_exec_check_timeout_kills_the_process_group(
    exec_check: CheckFn, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    code = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(60)\n"
    )
    spec = HealthSpec(kind="exec", timeout=3.0, command=py(code))
    async with asyncio.timeout(TEST_TIMEOUT):
        result = await exec_check(spec, target(0))
        assert result == CheckResult(False, "timeout after 3.0s")
        leader, child = (int(p) for p in pids.read_text().split())
        await wait_for(lambda: gone(leader) and gone(child), what="check processes gone")


async def test_exec_check_cancelled_by_monitor_timeout(
    exec_check: CheckFn, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    # The monitor's own timeout cancels the check: the cancellation path must kill too.
    spec = HealthSpec(kind="exec", interval=FAST, timeout=3.0, rise=1, fall=1, command=py(code))
    mon, _ = monitor_for(spec, target(0), exec_check)
    async with asyncio.timeout(TEST_TIMEOUT):
        result = await mon.check_once()
        assert result == CheckResult(False, "timeout after 3.0s")
        pid = int(pid_file.read_text())
        await wait_for(lambda: gone(pid), what="the check process is killed")
