"""Run a real `svcd` process and `svctl` commands against it, for end-to-end tests.

`with AgentProcess(...) as agent:` never leaves an agent behind: a start that fails
(the socket or readiness never comes) stops the agent and closes its stderr file
before the error propagates.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import psutil

from tests.waiting import GiveUp, wait_for_sync

ROOT = Path(__file__).resolve().parent.parent
HTTP_WORKER = ROOT / "tests" / "programs" / "http_worker.py"
#: Seconds `start()` waits for the control socket, then for `svctl probe ready`.
SOCKET_WAIT = 20.0
READY_WAIT = 30.0


def worker_command(*args: str) -> str:
    """TOML array literal running the stdlib test worker with `args`."""
    argv = [sys.executable, str(HTTP_WORKER), *args]
    return json.dumps(argv)


def api_service(port: int, count: int = 2, args: tuple[str, ...] = ()) -> str:
    """`[services.api]`: `count` stdlib test workers (with `args`) on 127.0.0.1:`port`."""
    return f"""
[services.api]
command = {worker_command(*args)}
count = {count}
listen = ["tcp://127.0.0.1:{port}"]
graceful_timeout = 5
"""


class AgentProcess:
    """A `svcd --config` child with its own temp dirs and control socket."""

    def __init__(self, tmp: Path, services_toml: str, extra_agent: str = "", registry: str = "",
                 state_dir: Path | None = None):
        self.tmp = tmp
        self.socket = str(tmp / "run" / "svcd.sock")
        self.config = tmp / "svcd.toml"
        self.config.write_text(
            textwrap.dedent(
                f"""
                [agent]
                name = "test-agent"
                control_socket = "{self.socket}"
                log_dir = "{tmp / 'logs'}"
                state_dir = "{state_dir or tmp / 'state'}"
                {extra_agent}
                """
            )
            + registry
            + services_toml
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = tmp / "svcd.stderr"
        self._stderr: IO[bytes] | None = None
        self.ready_wait = READY_WAIT  # tests of a failing start may shorten it

    def start(self, wait_ready: bool = True) -> AgentProcess:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            env=env,
            cwd=ROOT,
        )
        wait_for_sync(
            lambda: os.path.exists(self.socket) or self._died(), SOCKET_WAIT, "control socket"
        )
        if wait_ready:
            wait_for_sync(
                lambda: self.svctl("probe", "ready").returncode == 0, self.ready_wait, "agent ready"
            )
        return self

    def _died(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise GiveUp(f"svcd exited {self.proc.returncode}: {self.stderr()}")
        return False

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def svctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", "--socket", self.socket, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )

    def status(self) -> dict[str, Any]:
        out = self.svctl("status", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def events(self) -> list[dict[str, Any]]:
        """The agent's recent events (`svctl events --json`), oldest first."""
        out = svctl(self, "events", "--json")  # with the generous query deadline
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    def worker_pids(self, service: str) -> list[int]:
        for svc in self.status()["services"]:
            if svc["name"] == service:
                return [w["pid"] for w in svc["workers"] if w["pid"]]
        raise KeyError(service)

    def descendants(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            children: list[psutil.Process] = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return children

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait(5)
        finally:
            self._close_stderr()
        return code

    def _close_stderr(self) -> None:
        if self._stderr is not None:
            self._stderr.close()

    def __enter__(self) -> AgentProcess:
        try:
            return self.start()
        except BaseException:
            # __exit__ will not run: stop what start() left running, then re-raise
            if self.proc is not None:
                self.stop()
            else:
                self._close_stderr()  # Popen itself failed
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: Deadline of every svctl call in the slow end-to-end tests: the machine may be loaded
#: by other suites, and a slow answer is not what they measure (svctl's default is 10 s).
QUERY_DEADLINE = 60.0


def argv(program: Path, *args: str) -> str:
    """TOML array literal: run `program` with this interpreter."""
    return json.dumps([sys.executable, str(program), *args])


def svctl(
    agent: AgentProcess, *args: str, timeout: float = QUERY_DEADLINE
) -> subprocess.CompletedProcess[str]:
    """`svctl` against `agent` with a generous query deadline."""
    return agent.svctl("--timeout", str(timeout), *args, timeout=timeout + 30)


def agent_status(agent: AgentProcess) -> dict[str, Any]:
    out = svctl(agent, "status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def worker_pids(agent: AgentProcess, service: str) -> list[int]:
    for svc in agent_status(agent)["services"]:
        if svc["name"] == service:
            return [w["pid"] for w in svc["workers"] if w["pid"]]
    raise KeyError(service)


@contextlib.contextmanager
def running(
    tmp: Path, services: str, extra_agent: str = "", wait_ready: bool = True
) -> Iterator[AgentProcess]:
    """A started agent, stopped (and its workers reaped) however the test ends; its
    stderr is printed when the test fails."""
    agent = AgentProcess(tmp, services, extra_agent=extra_agent)
    try:
        agent.start(wait_ready=wait_ready)
        yield agent
    except BaseException:
        print(agent.stderr())
        raise
    finally:
        agent.stop()
