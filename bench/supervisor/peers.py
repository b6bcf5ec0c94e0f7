"""The peers svcd is measured against, each started the way its users would run it.

Every peer runs the same stdlib worker as svcd's stdlib case (tiny_http.py wraps
tests/programs/http_worker.py) except gunicorn (its own WSGI worker, forked from the
arbiter) and PM2 cluster mode (a Node hello, since cluster mode is Node-only).

Each peer object: `start()` (returns once every worker answers on its port),
`daemon_pid`, `ports`, `status_argv` + `status_env` (the peer's `status` command, for
hyperfine), `worker_pids()`. Processes go through the run's `Procs`, so they end with
it; PM2's daemon (which leaves our process tree) is ended by `pm2 kill` and then by
the pid it wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import psutil
from common import PYTHON, TINY_HTTP, BenchError, Procs, free_port, http_get, wait_until

START_WITHIN = 120.0  # seconds for a peer's workers to answer after its start
HERE = Path(__file__).resolve().parent


def _answers(ports: list[int]) -> bool:
    for port in ports:
        http_get(port, "/", timeout=2)
    return True


class Peer:
    name = "peer"

    def __init__(self, procs: Procs, tmp: Path, tools: dict[str, str], count: int) -> None:
        self.procs = procs
        self.tmp = tmp / self.name
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.tools = tools
        self.count = count
        self.ports: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.status_argv: list[str] = []
        self.status_env: dict[str, str] = {}

    @property
    def daemon_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Peer:
        raise NotImplementedError

    def worker_pids(self) -> list[int]:
        return [c.pid for c in psutil.Process(self.daemon_pid).children(recursive=True)]

    def _wait_serving(self) -> None:
        def ok() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited {self.proc.returncode}: {self._log()}")
            return _answers(self.ports)

        wait_until(ok, START_WITHIN, f"{self.name} workers answering", interval=0.1)

    def _log(self) -> str:
        logs = sorted(self.tmp.glob("*.log"))
        return "\n".join(p.read_text(errors="replace")[-1500:] for p in logs)


class Supervisord(Peer):
    """supervisord -n; one [program:wN] per worker, each binding its own port."""

    name = "supervisord"

    def start(self) -> Supervisord:
        conf = self.tmp / "supervisord.conf"
        programs = ""
        for i in range(self.count):
            port = free_port()
            self.ports.append(port)
            programs += textwrap.dedent(
                f"""
                [program:w{i}]
                command={PYTHON} {TINY_HTTP} --port {port}
                autorestart=true
                startsecs=1
                stopwaitsecs=5
                stdout_logfile={self.tmp}/w{i}.out
                redirect_stderr=true
                """
            )
        conf.write_text(
            textwrap.dedent(
                f"""
                [unix_http_server]
                file={self.tmp}/supervisor.sock
                [supervisord]
                logfile={self.tmp}/supervisord.log
                pidfile={self.tmp}/supervisord.pid
                childlogdir={self.tmp}
                nodaemon=true
                [rpcinterface:supervisor]
                supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
                [supervisorctl]
                serverurl=unix://{self.tmp}/supervisor.sock
                """
            )
            + programs
        )
        self.proc = self.procs.spawn(self.name, [self.tools["supervisord"], "-n", "-c", str(conf)],
                                     cwd=self.tmp, log=self.tmp / "stdout.log")
        self.status_argv = [self.tools["supervisorctl"], "-c", str(conf), "status"]
        self._wait_serving()
        wait_until(self._all_running, START_WITHIN, "supervisorctl status RUNNING")
        return self

    def _all_running(self) -> bool:
        out = subprocess.run(self.status_argv, capture_output=True, text=True, timeout=30)
        lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
        return len(lines) == self.count and all(" RUNNING " in ln for ln in lines)


class Circus(Peer):
    """circusd in the foreground; one watcher on a circus socket (use_sockets)."""

    name = "circus"

    def start(self) -> Circus:
        port = free_port()
        self.ports = [port]
        endpoint = f"ipc://{self.tmp}/ctl.sock"
        ini = self.tmp / "circus.ini"
        ini.write_text(
            textwrap.dedent(
                f"""
                [circus]
                endpoint = {endpoint}
                pubsub_endpoint = ipc://{self.tmp}/pub.sock
                statsd = False
                check_delay = 5

                [watcher:w]
                cmd = {PYTHON}
                args = {TINY_HTTP} --fd $(circus.sockets.web)
                numprocesses = {self.count}
                use_sockets = True
                copy_env = True
                graceful_timeout = 5

                [socket:web]
                host = 127.0.0.1
                port = {port}
                """
            )
        )
        self.proc = self.procs.spawn(self.name, [self.tools["circusd"], str(ini)], cwd=self.tmp,
                                     log=self.tmp / "circusd.log")
        self.status_argv = [self.tools["circusctl"], "--endpoint", endpoint, "status"]
        self._wait_serving()
        wait_until(lambda: len(self.worker_pids()) == self.count, START_WITHIN, "circus workers")
        return self


class Gunicorn(Peer):
    """gunicorn -w N (sync workers forked from the arbiter) with wsgi_hello:app."""

    name = "gunicorn"

    def start(self) -> Gunicorn:
        port = free_port()
        self.ports = [port]
        argv = [self.tools["gunicorn"], "-w", str(self.count), "-b", f"127.0.0.1:{port}",
                "--chdir", str(HERE), "--graceful-timeout", "5", "wsgi_hello:app"]
        self.proc = self.procs.spawn(self.name, argv, cwd=self.tmp, log=self.tmp / "gunicorn.log")
        self._wait_serving()
        wait_until(lambda: len(self.worker_pids()) == self.count, START_WITHIN, "gunicorn workers")
        return self


class Pm2(Peer):
    """PM2 with its own PM2_HOME; `mode` is "cluster" (Node hello) or "fork" (stdlib worker)."""

    def __init__(self, procs: Procs, tmp: Path, tools: dict[str, str], count: int,
                 mode: str = "fork") -> None:
        self.name = f"pm2-{mode}"
        super().__init__(procs, tmp, tools, count)
        self.mode = mode
        self.home = self.tmp / "home"
        self.env = {**os.environ, "PM2_HOME": str(self.home)}
        self.env.pop("NOTIFY_SOCKET", None)
        self.status_argv = [tools["pm2"], "jlist"]
        self.status_env = {"PM2_HOME": str(self.home)}

    def pm2(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.tools["pm2"], *args], capture_output=True, text=True,
                              env=env or self.env, timeout=timeout, cwd=self.tmp)

    @property
    def daemon_pid(self) -> int:
        return int((self.home / "pm2.pid").read_text().strip())

    def _kill(self) -> None:
        pid = None
        with contextlib.suppress(OSError, ValueError):
            pid = self.daemon_pid
        with contextlib.suppress(Exception):
            self.pm2("kill", timeout=30)
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                daemon = psutil.Process(pid)
                for proc in [*daemon.children(recursive=True), daemon]:
                    proc.send_signal(signal.SIGKILL)

    def start(self) -> Pm2:
        self.procs.on_close(self._kill)
        if self.mode == "cluster":
            port = free_port()
            self.ports = [port]
            out = self.pm2("start", str(HERE / "hello.js"), "-i", str(self.count), "--name", "c",
                           env={**self.env, "PORT": str(port)})
        else:
            out = None
            for i in range(self.count):
                port = free_port()
                self.ports.append(port)
                out = self.pm2("start", str(TINY_HTTP), "--interpreter", PYTHON, "--name", f"f{i}",
                               "--", "--port", str(port))
                if out.returncode != 0:
                    break
        assert out is not None
        if out.returncode != 0:
            raise BenchError(f"pm2 start: {out.stdout[-1000:]} {out.stderr[-1000:]}")
        self._wait_serving()
        wait_until(lambda: len(self.worker_pids()) == self.count, START_WITHIN, "pm2 workers")
        return self

    def worker_pids(self) -> list[int]:
        out = self.pm2("jlist")
        apps = json.loads(out.stdout)
        return [int(a["pid"]) for a in apps if a.get("pid")]
