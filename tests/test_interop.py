"""Interop: gunicorn, uvicorn and server_core workers under a real svcd, reloaded under load.

Every test runs a real `svcd --config` (tests/agent_proc.py), real worker programs and
`svctl reload`, with a load client on 127.0.0.1 that keeps requests going through
every reload (keep-alive connections and one-request connections, like wrk and like
browsers). The bar is the one of issue 4: 0 failed requests and every worker pid
changes. A failed request is anything a strict client (wrk) counts as an error:
refused, reset, timed out, closed before a complete response, or not a 200.

Worker programs: tests/programs/core_app.py (server_core), wsgi_app.py (gunicorn; the
body is the arbiter's pid, the process svcd supervises), asgi_app.py +
uvicorn_launcher.py (uvicorn on the inherited sockets; docs/workers.md says why not
`uvicorn --fd`). Each answers `GET /` with the pid of its svcd worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.agent_proc import ROOT, AgentProcess
from tests.conftest import free_port
from tests.waiting import wait_for_sync

PROGRAMS = ROOT / "tests" / "programs"
GUNICORN = Path(sys.executable).with_name("gunicorn")
REQUEST_TIMEOUT = 5.0  # seconds per request of the load client
LOAD_MAX_SECONDS = 240.0  # the load client stops by itself after this, whatever happens
RECONNECT_PAUSE = 0.001  # seconds between a failed connect and the next try
SERVE_WITHIN = 20.0  # seconds for a worker generation to answer on its port
CORE_RELOADS = 10
SYS_PIDFD_GETFD = 438  # the same number on x86_64 and aarch64 (new syscalls are unified)
INTEROP_RELOADS = 3

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


# --- load ---------------------------------------------------------------------------


class LoadError(Exception):
    """One failed request (the reason is the message)."""


def _read_response(sock: socket.socket, buf: bytes) -> tuple[int, bytes, bool, bytes]:
    """Read one response: (status, body, server keeps the connection, leftover bytes)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise LoadError(f"closed before a complete head ({len(buf)} bytes read)")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise LoadError(f"bad status line {lines[0][:80]!r}")
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    keep = headers.get(b"connection") != b"close" and parts[0] == b"HTTP/1.1"
    if b"content-length" not in headers:
        raise LoadError("response without content-length")
    length = int(headers[b"content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise LoadError("closed in the middle of a body")
        rest += chunk
    return status, rest[:length], keep, rest[length:]


class Load:
    """Threads sending `GET /` until stopped; half keep connections alive, half do not.

    `served` records (monotonic time the request was sent, body) of every 200, so a
    test can ask which workers answered after a given moment.
    """

    def __init__(self, port: int, keepalive: int = 4, oneshot: int = 4) -> None:
        self.port = port
        self.ok = 0
        self.failed = 0
        self.errors: list[str] = []
        self.served: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(True,), daemon=True)
            for _ in range(keepalive)
        ] + [
            threading.Thread(target=self._loop, args=(False,), daemon=True)
            for _ in range(oneshot)
        ]
        self._until = 0.0

    def _loop(self, keepalive: bool) -> None:
        request = (
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + (b"" if keepalive else b"Connection: close\r\n")
            + b"\r\n"
        )
        sock: socket.socket | None = None
        buf = b""
        while not self._stop.is_set() and time.monotonic() < self._until:
            sent_at = time.monotonic()
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.port), REQUEST_TIMEOUT)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    buf = b""
                sock.sendall(request)
                status, body, keep, buf = _read_response(sock, buf)
                if status != 200:
                    raise LoadError(f"status {status}")
                with self._lock:
                    self.ok += 1
                    self.served.append((sent_at, body.decode().strip()))
                if not (keep and keepalive):
                    sock.close()
                    sock = None
            except (OSError, LoadError, ValueError) as exc:
                with self._lock:
                    self.failed += 1
                    if len(self.errors) < 20:
                        kind = "keep-alive" if keepalive else "one-shot"
                        self.errors.append(f"{kind}: {exc!r}")
                if sock is not None:
                    sock.close()
                    sock = None
                time.sleep(RECONNECT_PAUSE)
        if sock is not None:
            sock.close()

    def start(self) -> Load:
        self._until = time.monotonic() + LOAD_MAX_SECONDS
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT + 1)

    def wait_requests(self, n: int, within: float = SERVE_WITHIN) -> None:
        target = self.ok + n
        wait_for_sync(lambda: self.ok >= target, within, f"{n} more requests ({self.errors})")

    def answered_since(self, since: float) -> set[str]:
        with self._lock:
            return {body for sent_at, body in self.served if sent_at >= since}


@contextlib.contextmanager
def loaded(port: int) -> Iterator[Load]:
    load = Load(port).start()
    try:
        yield load
    finally:
        load.stop()


# --- helpers ------------------------------------------------------------------------


def service_toml(name: str, command: list[str], port: int, extra: str = "") -> str:
    return f"""
[services.{name}]
command = {json.dumps(command)}
count = 2
listen = ["tcp://127.0.0.1:{port}"]
graceful_timeout = 15
ready_timeout = 20
{extra}
"""


def core_command() -> list[str]:
    return [sys.executable, str(PROGRAMS / "core_app.py")]


def gunicorn_command(app: str = "wsgi_app:app", *options: str) -> list[str]:
    # --graceful-timeout below svcd's graceful_timeout: gunicorn finishes its drain
    # (and exits 0) before svcd would SIGKILL it. --no-control-socket: every arbiter
    # would otherwise serve the same per-user socket path (docs/workers.md)
    return [str(GUNICORN), "--workers", "1", "--graceful-timeout", "10",
            "--no-control-socket", "--chdir", str(PROGRAMS), *options, app]


def uvicorn_command() -> list[str]:
    return [sys.executable, str(PROGRAMS / "uvicorn_launcher.py"),
            "--app-dir", str(PROGRAMS), "asgi_app:app"]


HEALTH_READY = """
ready = "health"
[services.{name}.health]
kind = "http"
path = "/healthz"
interval = 0.5
rise = 1
"""


def reload_under_load(agent: AgentProcess, service: str, port: int, reloads: int) -> None:
    """`svctl reload` `reloads` times under load: 0 failures, every pid new each time."""
    with loaded(port) as load:
        load.wait_requests(50)
        seen: set[int] = set()
        for _ in range(reloads):
            before = set(agent.worker_pids(service))
            assert len(before) == 2
            seen |= before
            out = agent.svctl("reload", service, timeout=90)
            assert out.returncode == 0, out.stdout + out.stderr
            done = time.monotonic()
            after = set(agent.worker_pids(service))
            assert len(after) == 2 and not after & seen, (before, after)
            # the new generation serves: both new workers answer requests sent after
            # the reload returned (by then every old worker has exited)
            expected = {str(pid) for pid in after}
            wait_for_sync(lambda: load.answered_since(done) >= expected, SERVE_WITHIN,  # noqa: B023
                          f"new workers {expected} answering")
            assert load.answered_since(done) <= expected
    assert load.failed == 0, (load.failed, load.ok, load.errors)
    status = agent.status()["services"][0]
    assert status["ready"] == 2 and status["state"] == "running"
    reloaded = [e for e in agent.events() if e["type"] == "reloaded"]
    assert len(reloaded) == reloads


# --- server_core --------------------------------------------------------------------


@pytest.mark.parametrize("preload", [False, True], ids=["exec", "preload"])
def test_server_core_worker_through_ten_reloads(tmp_path: Path, preload: bool) -> None:
    # preload: every generation is forked from a new template, and an old worker ends
    # with _exit right after its drain: nothing it answered may be lost on the way out
    port = free_port()
    extra = "preload = true" if preload else ""
    with AgentProcess(tmp_path, service_toml("web", core_command(), port, extra)) as agent:
        reload_under_load(agent, "web", port, CORE_RELOADS)


# --- gunicorn -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "readiness"),
    [((), HEALTH_READY), (("--preload",), "")],
    ids=["ready-health", "preload-notify"],
)
def test_gunicorn_reloaded_under_load(tmp_path: Path, options: tuple[str, ...],
                                      readiness: str) -> None:
    port = free_port()
    toml = service_toml("web", gunicorn_command("wsgi_app:app", *options), port,
                        readiness.format(name="web"))
    with AgentProcess(tmp_path, toml) as agent:
        reload_under_load(agent, "web", port, INTEROP_RELOADS)


@pytest.mark.parametrize(
    ("options", "readiness"),
    [((), HEALTH_READY), (("--preload",), "")],
    ids=["ready-health", "preload-notify"],
)
def test_gunicorn_generation_whose_app_fails_is_rolled_back(
    tmp_path: Path, options: tuple[str, ...], readiness: str
) -> None:
    """The safe configurations: a broken app never replaces a working one."""
    port = free_port()
    good = service_toml("web", gunicorn_command("wsgi_app:app", *options), port,
                        readiness.format(name="web"))
    with AgentProcess(tmp_path, good) as agent, loaded(port) as load:
        load.wait_requests(50)
        before = set(agent.worker_pids("web"))
        agent.config.write_text(agent.config.read_text().replace("wsgi_app:app", "wsgi_app:nope"))
        out = agent.svctl("reload", timeout=90)
        assert out.returncode == 1, out.stdout + out.stderr
        assert set(agent.worker_pids("web")) == before
        load.wait_requests(50)
        load.stop()
        assert load.failed == 0, (load.failed, load.ok, load.errors)
        assert any(e["type"] == "reload_failed" for e in agent.events())


def test_gunicorn_notify_without_preload_is_ready_before_its_app_loads(tmp_path: Path) -> None:
    """Why docs/workers.md asks for --preload or ready = "health" with gunicorn.

    gunicorn's arbiter sends READY=1 before it forks a worker, and without --preload
    the app is imported only in the workers: a generation whose app cannot be imported
    counts as ready, replaces the working one and then exits.
    """
    port = free_port()
    good = service_toml("web", gunicorn_command("wsgi_app:app"), port,
                        "[services.web.backoff]\nfirst_delay = 0.5\n")
    with AgentProcess(tmp_path, good) as agent:
        before = set(agent.worker_pids("web"))
        agent.config.write_text(agent.config.read_text().replace("wsgi_app:app", "wsgi_app:nope"))
        out = agent.svctl("reload", timeout=90)
        assert out.returncode == 0, out.stdout + out.stderr  # accepted: READY=1 came first
        assert not set(agent.worker_pids("web")) & before
        wait_for_sync(
            lambda: any(e["type"] == "exited" and e["generation"] == 2 for e in agent.events()),
            SERVE_WITHIN, "the broken generation exiting",
        )


# --- uvicorn ------------------------------------------------------------------------


def test_uvicorn_launcher_reloaded_under_load(tmp_path: Path) -> None:
    port = free_port()
    with AgentProcess(tmp_path, service_toml("web", uvicorn_command(), port)) as agent:
        reload_under_load(agent, "web", port, INTEROP_RELOADS)
        # the launcher reports stats like a server_core worker does
        wait_for_sync(
            lambda: sum(w["requests"] for w in agent.status()["services"][0]["workers"]) > 0,
            SERVE_WITHIN, "X_SVCD_STATS from the launcher",
        )


def _peer_socket_option(pid: int, local_port: int, level: int, option: int) -> int:
    """getsockopt on worker `pid`'s accepted socket whose peer is our `local_port`.

    The socket is borrowed with pidfd_getfd(2) (needs ptrace rights over the worker:
    root, or the same user without Yama restrictions).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for conn in psutil.Process(pid).net_connections(kind="tcp"):
        if conn.raddr and conn.raddr.port == local_port:
            pidfd = os.pidfd_open(pid)
            try:
                fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, conn.fd, 0)
                if fd < 0:
                    pytest.skip(f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(pidfd)
            with socket.socket(fileno=fd) as borrowed:
                return borrowed.getsockopt(level, option)
    raise LookupError(f"no connection from port {local_port} in worker {pid}")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="syscall number")
def test_uvicorn_launcher_sets_tcp_nodelay_and_uvicorn_fd_does_not(tmp_path: Path) -> None:
    """Why the launcher: `uvicorn --fd` takes a TCP socket for AF_UNIX, so TCP_NODELAY is
    never set on its connections (40 ms delayed-ACK stalls); the launcher's are."""
    launcher_port, fd_port = free_port(), free_port()
    uvicorn = str(Path(sys.executable).with_name("uvicorn"))
    toml = service_toml("launcher", uvicorn_command(), launcher_port) + service_toml(
        "fd", [uvicorn, "--fd", "3", "--app-dir", str(PROGRAMS), "asgi_app:app"], fd_port,
        'ready = "started"',
    )
    with AgentProcess(tmp_path, toml) as agent:
        nodelay = {}
        for service, port in (("launcher", launcher_port), ("fd", fd_port)):
            with socket.create_connection(("127.0.0.1", port), REQUEST_TIMEOUT) as client:
                client.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                _, body, keep, _ = _read_response(client, b"")
                assert keep
                nodelay[service] = _peer_socket_option(
                    int(body), client.getsockname()[1], socket.IPPROTO_TCP, socket.TCP_NODELAY
                )
        assert agent.worker_pids("launcher")
    assert nodelay["launcher"] != 0
    assert nodelay["fd"] == 0


# --- readiness by tcp check ---------------------------------------------------------


def test_tcp_health_readiness_needs_a_worker_that_accepts(tmp_path: Path) -> None:
    port = free_port()
    never_accepts = [sys.executable, "-c", "import time; time.sleep(60)"]
    toml = service_toml(
        "web", never_accepts, port,
        'ready = "health"\n[services.web.health]\nkind = "tcp"\ninterval = 0.5\nrise = 1\n',
    ).replace("ready_timeout = 20", "ready_timeout = 2")
    agent = AgentProcess(tmp_path, toml).start(wait_ready=False)
    try:
        # expected: never ready, so replaced after ready_timeout
        wait_for_sync(
            lambda: any("not ready within" in str(e.get("message", "")) for e in agent.events()),
            SERVE_WITHIN, "the worker that never accepts to be found not ready",
        )
    finally:
        agent.stop()


def test_tcp_health_readiness_of_a_worker_that_accepts(tmp_path: Path) -> None:
    # the counterpart: a server_core worker (it serves svcd-health like any inherited
    # socket) becomes ready by its first tcp check, and stays passing
    port = free_port()
    toml = service_toml(
        "web", core_command(), port,
        'ready = "health"\n[services.web.health]\nkind = "tcp"\ninterval = 0.5\nrise = 1\n',
    )
    with AgentProcess(tmp_path, toml) as agent:
        workers = agent.status()["services"][0]["workers"]
        assert [w["ready"] for w in workers] == [True, True]
        wait_for_sync(
            lambda: all(w["health"] == "passing"
                        for w in agent.status()["services"][0]["workers"]),
            SERVE_WITHIN, "both workers passing",
        )
        assert not any("not ready within" in str(e.get("message", "")) for e in agent.events())
