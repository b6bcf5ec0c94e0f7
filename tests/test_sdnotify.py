"""agent.sdnotify against a real unix datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
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
