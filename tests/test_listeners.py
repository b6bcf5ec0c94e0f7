"""supervisor.listeners: real sockets on 127.0.0.1 / ::1 / temp unix paths."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.errors import ListenerError
from supervisor.listeners import (
    UNIX_SOCKET_MODE,
    ListenerSet,
    bind_listener,
    bind_private_health,
)
from supervisor.spec import ListenSpec
from tests.conftest import free_port

TIMEOUT = 5.0


def tcp(host: str, port: int, backlog: int = 16) -> ListenSpec:
    shown = f"[{host}]" if ":" in host else host
    return ListenSpec(f"tcp://{shown}:{port}", "tcp", host=host, port=port, backlog=backlog)


def unix(path: Path) -> ListenSpec:
    return ListenSpec(f"unix://{path}", "unix", path=str(path))


@pytest.fixture
def listeners() -> Iterator[ListenerSet]:
    ls = ListenerSet()
    yield ls
    ls.close_all()


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_tcp_listener_is_bound_blocking_and_not_inheritable() -> None:
    sock = bind_listener(tcp("127.0.0.1", 0))
    with sock:
        assert sock.getsockname()[0] == "127.0.0.1"
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        assert not sock.get_inheritable()
        assert sock.getblocking()  # O_NONBLOCK would be shared with every worker
        # a client is queued by the backlog although nobody accepts yet
        with socket.create_connection(sock.getsockname(), timeout=TIMEOUT):
            conn, _ = sock.accept()
            conn.close()


def test_address_in_use_is_a_clear_error() -> None:
    port = free_port()
    with bind_listener(tcp("127.0.0.1", port)), pytest.raises(ListenerError) as err:
        bind_listener(tcp("127.0.0.1", port))
    assert str(err.value) == f"tcp://127.0.0.1:{port}: cannot listen: address already in use"


def test_unresolvable_or_foreign_hosts_fail_clearly() -> None:
    with pytest.raises(ListenerError, match="cannot resolve host"):
        bind_listener(tcp("no-such-host.invalid", 0))
    with pytest.raises(ListenerError, match="address not available"):
        bind_listener(tcp("192.0.2.1", 0))  # TEST-NET-1: not on this host


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_privileged_port_as_non_root_is_permission_denied() -> None:
    # binding as root always works: check the message through a child running as nobody
    import subprocess

    root = str(Path(__file__).resolve().parent.parent)
    code = (
        f"import sys; sys.path.insert(0, {root!r})\n"
        "from supervisor.listeners import bind_listener\n"
        "from supervisor.spec import ListenSpec\n"
        "from supervisor.errors import ListenerError\n"
        "try:\n"
        "    bind_listener(ListenSpec('tcp://127.0.0.1:81', 'tcp', host='127.0.0.1', port=81))\n"
        "except ListenerError as e:\n"
        "    print(e)\n"
    )
    python = "/usr/bin/python3"
    if not os.path.exists(python):
        pytest.skip("no system python3 (the venv may be unreadable for nobody)")
    proc = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", python, "-c", code],
        capture_output=True, text=True, timeout=30, check=False, cwd="/",
    )
    if "No such file" in proc.stderr and "supervisor" in proc.stderr:
        pytest.skip("the source tree is not readable by nobody")
    assert "tcp://127.0.0.1:81: cannot listen: permission denied" in proc.stdout, proc.stderr


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")
def test_ipv6_hosts_bind() -> None:
    with bind_listener(tcp("::1", 0)) as sock:
        assert sock.family == socket.AF_INET6
        host, port = sock.getsockname()[:2]
        assert host == "::1"
        with socket.create_connection(("::1", port), timeout=TIMEOUT):
            pass
    with bind_listener(tcp("[::1]", 0)) as sock:  # brackets as in a URL
        assert sock.getsockname()[0] == "::1"


def test_unix_listener_mode_and_stale_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "app.sock"
    with bind_listener(unix(path)) as sock:
        assert (path.stat().st_mode & 0o777) == UNIX_SOCKET_MODE
        assert not sock.get_inheritable()
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))
    # closed without unlink: the file is stale now, and a new bind takes it over
    assert path.exists()
    with bind_listener(unix(path)) as sock, socket.socket(socket.AF_UNIX) as c:
        c.connect(str(path))


def test_unix_listener_refuses_a_live_server_or_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    with bind_listener(unix(path)), pytest.raises(ListenerError, match="another server"):
        bind_listener(unix(path))
    regular = tmp_path / "file"
    regular.write_text("data")
    with pytest.raises(ListenerError, match="not a socket"):
        bind_listener(unix(regular))
    assert regular.read_text() == "data"


def test_unix_path_too_long(tmp_path: Path) -> None:
    with pytest.raises(ListenerError, match="longer than"):
        bind_listener(unix(tmp_path / ("x" * 120)))


def test_private_health_listener() -> None:
    with bind_private_health() as sock:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        assert not sock.get_inheritable()
        with socket.create_connection((host, port), timeout=TIMEOUT):
            pass


def test_listener_set_shares_and_refcounts(listeners: ListenerSet) -> None:
    spec = tcp("127.0.0.1", free_port())
    first = listeners.acquire(spec)
    second = listeners.acquire(spec)  # e.g. the new generation during a rolling reload
    assert first is second
    assert listeners.users(spec.url) == 2
    listeners.release(spec)  # the old generation is gone
    assert first.fileno() != -1  # still open: the new generation uses it
    with socket.create_connection(("127.0.0.1", spec.port), timeout=TIMEOUT):
        pass  # queued by the backlog, no worker needed
    listeners.release(spec)
    assert first.fileno() == -1
    assert listeners.get(spec.url) is None
    # the port is free again
    with bind_listener(spec):
        pass


def test_listener_set_survives_a_listener_change(listeners: ListenerSet) -> None:
    shared = tcp("127.0.0.1", free_port())
    old_only = tcp("127.0.0.1", free_port())
    new_only = tcp("127.0.0.1", free_port())
    kept = listeners.acquire(shared)
    listeners.acquire(old_only)
    # config change: new generation listens on shared + new_only, then the old releases
    assert listeners.acquire(shared) is kept
    listeners.acquire(new_only)
    listeners.release(shared)
    listeners.release(old_only)
    assert sorted(listeners.urls) == sorted([shared.url, new_only.url])
    assert kept.fileno() != -1


def test_listener_set_changes_backlog_in_place(listeners: ListenerSet) -> None:
    port = free_port()
    sock = listeners.acquire(tcp("127.0.0.1", port, backlog=4))
    assert listeners.acquire(tcp("127.0.0.1", port, backlog=64)) is sock


def test_listener_set_unlinks_its_unix_file_on_last_release(
    listeners: ListenerSet, tmp_path: Path
) -> None:
    spec = unix(tmp_path / "svc.sock")
    listeners.acquire(spec)
    listeners.release(spec)
    assert not Path(spec.path).exists()
    # a file someone else put there after us is not ours to remove
    listeners.acquire(spec)
    os.unlink(spec.path)
    with bind_listener(spec) as other:
        listeners.release(spec)
        assert Path(spec.path).exists()
        assert other.fileno() != -1


def test_release_of_unknown_url_is_harmless(listeners: ListenerSet) -> None:
    listeners.release(tcp("127.0.0.1", 1))
    assert listeners.users("tcp://127.0.0.1:1") == 0


def test_close_all(listeners: ListenerSet) -> None:
    a = listeners.acquire(tcp("127.0.0.1", free_port()))
    b = listeners.acquire(tcp("127.0.0.1", free_port()))
    listeners.close_all()
    assert a.fileno() == -1 and b.fileno() == -1
    assert listeners.urls == []
