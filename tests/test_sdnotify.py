"""agent.sdnotify against a real unix datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import SystemdNotifier
from tests.waiting import wait_for

RECV_SIZE = 4096
RECV_TIMEOUT = 5.0


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket and the NOTIFY_SOCKET value that reaches it."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(RECV_TIMEOUT)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())


def recv(sock: socket.socket) -> dict[str, str]:
    return fields(sock.recv(RECV_SIZE))


def assert_empty(sock: socket.socket) -> None:
    """Nothing queued: delivery on a unix datagram socket is synchronous with sendto."""
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(RECV_SIZE)


def test_lifecycle_messages_reach_the_socket(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    n = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path})
    try:
        assert n.enabled
        assert n.ready(status="2 services, 5 workers")
        assert recv(sock) == {"READY": "1", "STATUS": "2 services, 5 workers"}

        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert n.reloading()
        msg = recv(sock)
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert msg["RELOADING"] == "1"
        assert before <= int(msg["MONOTONIC_USEC"]) <= after

        assert n.ready()
        assert recv(sock) == {"READY": "1"}
        assert n.status("line one\nline two")
        assert recv(sock) == {"STATUS": "line one line two"}
        assert n.watchdog()
        assert recv(sock) == {"WATCHDOG": "1"}
        assert n.extend_timeout(1.5)
        assert recv(sock) == {"EXTEND_TIMEOUT_USEC": "1500000"}
        assert n.stopping()
        assert recv(sock) == {"STOPPING": "1"}
    finally:
        n.close()


def test_abstract_socket() -> None:
    name = f"svcd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(RECV_TIMEOUT)
        n = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        try:
            assert n.ready()
            assert recv(sock) == {"READY": "1"}
        finally:
            n.close()


def test_no_socket_is_a_silent_no_op() -> None:
    n = SystemdNotifier.from_environ({})
    assert not n.enabled
    assert n.watchdog_interval is None
    assert not n.ready()
    assert not n.stopping()


def test_missing_socket_never_raises_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = SystemdNotifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with caplog.at_level(logging.WARNING, logger="agent.sdnotify"):
        assert not n.ready()
        assert not n.reloading()
        assert not n.watchdog()
    n.close()
    assert len([r for r in caplog.records if r.name == "agent.sdnotify"]) == 1


def test_unsupported_address_is_disabled() -> None:
    assert not SystemdNotifier.from_environ({"NOTIFY_SOCKET": "relative.sock"}).enabled
    assert not SystemdNotifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
    assert not SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@"}).enabled


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    env = {"NOTIFY_SOCKET": "/run/x.sock", "WATCHDOG_USEC": "20000000"}
    assert SystemdNotifier.from_environ(env).watchdog_interval == 10.0
    mine = {**env, "WATCHDOG_PID": str(os.getpid())}
    assert SystemdNotifier.from_environ(mine).watchdog_interval == 10.0
    assert SystemdNotifier.from_environ(mine, pid=os.getpid() + 1).watchdog_interval is None
    for bad in ("0", "-5", "soon"):
        assert SystemdNotifier.from_environ({**env, "WATCHDOG_USEC": bad}).watchdog_interval is None
    # No socket, no watchdog: there is no one to ping.
    assert SystemdNotifier.from_environ({"WATCHDOG_USEC": "20000000"}).watchdog_interval is None


def test_from_environ_only_reads(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    before = dict(os.environ)
    n = SystemdNotifier.from_environ()
    assert n.enabled and n.watchdog_interval == 2.0
    assert dict(os.environ) == before


async def test_watchdog_pings_only_while_healthy(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    sock.setblocking(False)
    # 20 ms watchdog -> a ping every 10 ms: quick, and nothing here depends on timing.
    n = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    assert n.watchdog_interval == 0.01

    healthy = True
    unhealthy_calls = 0
    drained = False

    def is_healthy() -> bool:
        nonlocal unhealthy_calls, drained
        if not healthy:
            if not drained:
                # Everything sent so far was sent while healthy: forget it.
                while True:
                    try:
                        sock.recv(RECV_SIZE)
                    except BlockingIOError:
                        break
                drained = True
            unhealthy_calls += 1
        return healthy

    def pings() -> int:
        count = 0
        while True:
            try:
                assert fields(sock.recv(RECV_SIZE)) == {"WATCHDOG": "1"}
            except BlockingIOError:
                return count
            count += 1

    async with asyncio.timeout(10):
        task = asyncio.create_task(n.run_watchdog(is_healthy))
        try:
            seen = 0

            def pinged_twice() -> bool:
                nonlocal seen
                seen += pings()
                return seen >= 2

            await wait_for(pinged_twice, what="two watchdog pings while healthy")

            healthy = False
            await wait_for(lambda: unhealthy_calls >= 3, what="three unhealthy ticks")
            assert_empty(sock)

            healthy = True
            await wait_for(lambda: pings() >= 1, what="pings to resume")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            n.close()


async def test_watchdog_callback_error_counts_as_unhealthy(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    n = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    calls = 0

    def broken() -> bool:
        nonlocal calls
        calls += 1
        raise RuntimeError("health probe broke")

    async with asyncio.timeout(10):
        task = asyncio.create_task(n.run_watchdog(broken))
        try:
            await wait_for(lambda: calls >= 3, what="three ticks")
            assert not task.done()
            assert_empty(sock)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            n.close()


async def test_run_watchdog_returns_without_a_watchdog(
    notify_socket: tuple[socket.socket, str],
) -> None:
    _, path = notify_socket
    n = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path})
    async with asyncio.timeout(5):
        await n.run_watchdog(lambda: True)


# ------------------------------------------------------------ the real agent under a fake systemd

AGENT_START_TIMEOUT = 30.0
AGENT_STOP_TIMEOUT = 30.0
SVCTL_TIMEOUT = 30.0
# 2 s watchdog: the agent pings every second while its loop is healthy.
AGENT_WATCHDOG_USEC = 2_000_000
# How often a wait for a datagram looks whether the agent is still alive.
RECV_SLICE = 0.2
# `svctl reload` answers after the reload: its datagrams are already queued by then.
QUEUED_TIMEOUT = 5.0
ROOT = Path(__file__).resolve().parent.parent
HTTP_WORKER = ROOT / "tests" / "programs" / "http_worker.py"


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeSystemd:
    """A `svcd --config` child started the way systemd starts it: NOTIFY_SOCKET and
    WATCHDOG_USEC in its environment, the notify socket bound by the test."""

    def __init__(self, sock: socket.socket, notify_path: str, tmp: Path) -> None:
        self.sock = sock
        self.notify_path = notify_path
        self.control = tmp / "run" / "svcd.sock"
        self.env_dump = tmp / "worker-env.json"
        self.stderr_path = tmp / "svcd.stderr"
        # The worker records its environment, then execs the test worker (same pid, so
        # LISTEN_PID still matches).
        record_then_exec = (
            "import json, os, sys; "
            f"open({str(self.env_dump)!r}, 'w').write(json.dumps(dict(os.environ))); "
            f"os.execv(sys.executable, [sys.executable, {str(HTTP_WORKER)!r}])"
        )
        self.config = tmp / "svcd.toml"
        self.config.write_text(
            f"""
[agent]
name = "sdnotify-test"
control_socket = "{self.control}"
log_dir = "{tmp / 'logs'}"
state_dir = "{tmp / 'state'}"
drain_delay = 0.1

[services.w]
command = {json.dumps([sys.executable, "-c", record_then_exec])}
count = 1
listen = ["tcp://127.0.0.1:{free_tcp_port()}"]
graceful_timeout = 5
"""
        )
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("WATCHDOG_", "LISTEN_"))
        }
        env.update(NOTIFY_SOCKET=notify_path, WATCHDOG_USEC=str(AGENT_WATCHDOG_USEC))
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=ROOT,
            )

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-3000:]

    def wait_message(self, key: str, timeout: float) -> dict[str, str]:
        """Read datagrams until one sets `key`; AssertionError at the deadline or when
        the agent exits first."""
        deadline = time.monotonic() + timeout
        seen: list[dict[str, str]] = []
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(min(left, RECV_SLICE))
            try:
                msg = fields(self.sock.recv(RECV_SIZE))
            except TimeoutError:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"agent exited {self.proc.returncode} before {key}=: {self.stderr()}"
                    ) from None
                continue
            if key in msg:
                return msg
            seen.append(msg)
        raise AssertionError(f"no {key}= within {timeout}s; got {seen}; {self.stderr()}")

    def svctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", "--socket", str(self.control), *args],
            capture_output=True, text=True, timeout=SVCTL_TIMEOUT, cwd=ROOT, check=False,
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=AGENT_STOP_TIMEOUT)


@pytest.fixture
def fake_systemd(
    notify_socket: tuple[socket.socket, str], tmp_path: Path
) -> Iterator[FakeSystemd]:
    agent = FakeSystemd(*notify_socket, tmp_path)
    try:
        yield agent
    finally:
        agent.close()


@pytest.mark.slow
def test_agent_tells_systemd_ready_watchdog_reloading_stopping(
    fake_systemd: FakeSystemd,
) -> None:
    """READY once the workers are up, WATCHDOG while alive, RELOADING..READY around a
    SIGHUP reload, STOPPING on SIGTERM, exit 0; none of it leaks into a worker."""
    agent = fake_systemd
    assert agent.wait_message("READY", AGENT_START_TIMEOUT)["READY"] == "1"
    assert agent.env_dump.exists(), "READY=1 before the worker even started"

    two_periods = 2 * AGENT_WATCHDOG_USEC / 1e6
    assert agent.wait_message("WATCHDOG", two_periods)["WATCHDOG"] == "1"

    agent.proc.send_signal(signal.SIGHUP)
    reloading = agent.wait_message("RELOADING", SVCTL_TIMEOUT)
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert agent.wait_message("READY", SVCTL_TIMEOUT)["READY"] == "1"

    worker_env = json.loads(agent.env_dump.read_text())
    assert worker_env.get("NOTIFY_SOCKET") != agent.notify_path, "NOTIFY_SOCKET leaked"
    assert worker_env.get("WATCHDOG_USEC") != str(AGENT_WATCHDOG_USEC)
    assert worker_env.get("WATCHDOG_PID") != str(agent.proc.pid)

    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait_message("STOPPING", AGENT_STOP_TIMEOUT)["STOPPING"] == "1"
    assert agent.proc.wait(timeout=AGENT_STOP_TIMEOUT) == 0, agent.stderr()


@pytest.mark.slow
def test_svctl_reload_as_execreload_announces_reloading(fake_systemd: FakeSystemd) -> None:
    """`systemctl reload svcd` runs ExecReload=svctl reload: that reload, too, must be
    wrapped in RELOADING=1 .. READY=1."""
    agent = fake_systemd
    agent.wait_message("READY", AGENT_START_TIMEOUT)
    result = agent.svctl("reload")
    assert result.returncode == 0, result.stdout + result.stderr
    assert int(agent.wait_message("RELOADING", QUEUED_TIMEOUT)["MONOTONIC_USEC"]) > 0
    assert agent.wait_message("READY", QUEUED_TIMEOUT)["READY"] == "1"
