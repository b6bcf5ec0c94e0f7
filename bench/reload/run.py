"""Rolling reload under load: svcd against PM2, gunicorn, uvicorn and circus (issue 4).

    .venv/bin/python bench/reload/run.py [--rounds 10] [--peer-rounds 3] [--steady-runs 3]
                                         [--only NAMES]

For every system, 2 workers on 127.0.0.1 under `wrk -t1 -c50 -d20s --latency`:
`steady-runs` runs without a reload (the one with the median p99 is the baseline: one
run's p99 moves by 1.5x on this noisy machine), then `rounds` runs with a reload at
~5 s and ~12 s. Per
run: wrk's socket errors (connect, read, write, timeout) + non-2xx responses, p99 and
max latency, req/s; per reload: seconds from issuing the reload until every old worker
process is gone (polled every few ms with psutil). For svcd also the agent's own
timeline from `svctl events --json`: per new worker spawn -> READY, per old worker
SIGTERM -> exit, and the `reloaded` event's total.

Systems (each the way its users run it):
- `svcd-core`: svcd + examples/hello.py (server_core), `svctl reload`
- `svcd-core-surge2`: the same with `max_surge = 2` (both slots roll at once)
- `svcd-core-preload`: the same with `preload = true` (workers forked from a template)
- `svcd-core-preload-api`: the same, reloaded by a call on an open control-API channel
  instead of a new `svctl` process (the reload itself, as `kill -HUP` is for the peers)
- `svcd-gunicorn`: svcd + `gunicorn --preload --workers 1` per svcd worker, `svctl reload`
- `svcd-uvicorn`: svcd + tests/programs/uvicorn_launcher.py, `svctl reload`
- `svcd-uvicorn-fd` (only with `--only`): svcd + `uvicorn --fd 3`, `ready = "started"`:
  what the launcher is for
- `gunicorn`: `gunicorn --workers 2` (sync), `kill -HUP` the arbiter
- `uvicorn`: `uvicorn --workers 2`, `kill -HUP` the supervisor process
- `pm2-cluster`: `pm2 start hello.js -i 2`, `pm2 reload`
- `circus`: circusd, a circus socket, the same server_core hello as svcd-core (through
  activate.py), `circusctl reload`

svcd (the agent, svctl, and the Python that runs server_core's hello for svcd and
circus) comes from a regular `pip install .` of the working tree into
bench/.work/venv-svcd, as users install it; `--editable` uses the dev venv instead,
whose editable-install site hook every process pays at start-up.

Peers come from bench/peers/install.sh (bench/.work/peers.env); a missing one is
skipped with a note. Bounded: every wait has a deadline, every run a fixed length.
Clean: every process goes through `Procs` and is ended in a `finally` (process groups,
then every descendant seen; PM2's daemon by `pm2 kill` with its own PM2_HOME, then by
pid). Loopback only. Results: bench/reload/results/latest.json and a markdown table on
stdout (copied by hand into bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for benchlib

from benchlib import (
    PYTHON,
    REPO,
    SVCD_VENV,
    VENV_BIN,
    BenchError,
    Procs,
    free_port,
    install_svcd,
    machine,
    peers,
    run_dir,
    svcd_agent_table,
    wait_until,
)

HERE = Path(__file__).resolve().parent
PROGRAMS = REPO / "tests" / "programs"
HELLO = REPO / "examples" / "hello.py"
RESULTS = HERE / "results" / "latest.json"


@dataclass
class SvcdInstall:
    """Where svcd, svctl and the Python running server_core's hello come from: a regular
    install (bench/.work/venv-svcd, as users have it) unless --editable."""

    bin: Path = VENV_BIN
    python: str = PYTHON


SVCD = SvcdInstall()

WORKERS = 2
CONNECTIONS = 50
DURATION = 20  # seconds of one wrk run
RELOAD_AT = (5.0, 12.0)  # seconds into a run
START_WITHIN = 60.0  # seconds for a system to serve after its start
GONE_WITHIN = 60.0  # seconds for the old workers to be gone after a reload
POLL = 0.005  # seconds between polls of the worker pids during a reload
WRK_MARGIN = 30.0  # seconds past DURATION before a wrk run counts as hung
GRACEFUL = 5  # seconds every system gives a worker to drain


# --- probes --------------------------------------------------------------------------


def answers(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        status_line = s.recv(64).split(b"\r\n", 1)[0]
    return b" 200 " in status_line


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def children(pid: int, skip: str = "") -> set[int]:
    """Direct children of `pid` that are alive (and whose cmdline lacks `skip`)."""
    found = set()
    for child in psutil.Process(pid).children():
        with contextlib.suppress(psutil.Error):
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            if skip and skip in " ".join(child.cmdline()):
                continue
            found.add(child.pid)
    return found


# --- systems -------------------------------------------------------------------------


class System:
    """One way of running 2 workers on `port` and reloading them."""

    name = "system"
    needs: tuple[str, ...] = ()

    def __init__(self, procs: Procs, tmp: Path, tools: dict[str, str]) -> None:
        self.procs = procs
        self.tmp = tmp / self.name
        self.tmp.mkdir(parents=True)
        self.tools = tools
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.issued: list[float] = []  # wall time of each reload command, for svcd's timeline

    def start(self) -> None:
        raise NotImplementedError

    def worker_pids(self) -> set[int]:
        raise NotImplementedError

    def reload(self) -> None:
        """Issue the reload; may block until the system says it is done."""
        raise NotImplementedError

    def command(self) -> str:
        return ""

    def extra(self) -> dict[str, Any]:
        return {}

    def _serving(self) -> None:
        def ok() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited {self.proc.returncode}: {self.log()}")
            return answers(self.port) and len(self.worker_pids()) == WORKERS

        wait_until(ok, START_WITHIN, f"{self.name} serving with {WORKERS} workers", 0.1)

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in self.tmp.glob("*.log"))


class Svcd(System):
    """A real `svcd --config` with one service of 2 workers; `svctl reload SERVICE`."""

    worker: list[str] = []
    service_extra = ""

    def start(self) -> None:
        self.socket, agent_table = svcd_agent_table(self.tmp)
        config = self.tmp / "svcd.toml"
        config.write_text(agent_table + textwrap.dedent(f"""
            [services.web]
            command = {json.dumps(self.worker)}
            count = {WORKERS}
            listen = ["tcp://127.0.0.1:{self.port}"]
            graceful_timeout = {GRACEFUL + 5}
            ready_timeout = 30
            """) + textwrap.dedent(self.service_extra))
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self.proc = self.procs.spawn(self.name, [str(SVCD.bin / "svcd"), "--config", str(config)],
                                     env=env, cwd=REPO, log=self.tmp / "svcd.log")
        self._serving()
        wait_until(lambda: self.status()["services"][0]["ready"] == WORKERS, START_WITHIN,
                   "svcd workers ready", 0.1)

    def svctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(SVCD.bin / "svctl"), "--socket", self.socket, *args],
                              capture_output=True, text=True, timeout=120, cwd=REPO)

    def status(self) -> dict[str, Any]:
        return json.loads(self.svctl("status", "--json").stdout)  # type: ignore[no-any-return]

    def worker_pids(self) -> set[int]:
        # from status, not the agent's children: a preload template is a child too
        return {w["pid"] for w in self.status()["services"][0]["workers"] if w["pid"]}

    def reload(self) -> None:
        out = self.svctl("reload", "web")
        if out.returncode != 0:
            raise BenchError(f"svctl reload: {out.returncode} {out.stdout} {out.stderr}")

    def command(self) -> str:
        return "svctl reload web"

    def extra(self) -> dict[str, Any]:
        return {"timeline": svcd_timeline(self.svctl("events", "--json").stdout, self.issued)}


class SvcdCore(Svcd):
    name = "svcd-core"

    def start(self) -> None:
        self.worker = [SVCD.python, str(HELLO)]
        super().start()


class SvcdCoreSurge2(SvcdCore):
    """The same, both slots at once: what `max_surge` buys (default 1: one slot at a time)."""

    name = "svcd-core-surge2"
    service_extra = "max_surge = 2\n"


class SvcdCorePreload(SvcdCore):
    """server_core forked from a per-generation template (`preload = true`)."""

    name = "svcd-core-preload"
    service_extra = "preload = true\n"


class SvcdCorePreloadApi(SvcdCorePreload):
    """The same, reloaded through the control API from a client that is already running
    (a deploy tool's way; the counterpart of `kill -HUP` for gunicorn and uvicorn):
    the reload's own time, without svctl's interpreter and grpcio start-up."""

    name = "svcd-core-preload-api"

    def start(self) -> None:
        super().start()
        import grpc  # the dev venv's; only this system needs it in the bench process

        from agent._pb import agent_pb2, agent_pb2_grpc

        self._request = agent_pb2.ReloadRequest(service="web")
        channel = grpc.insecure_channel(f"unix://{self.socket}")
        self._stub = agent_pb2_grpc.AgentStub(channel)  # type: ignore[no-untyped-call]
        self.procs.on_close(channel.close)

    def reload(self) -> None:
        results = [u.result for u in self._stub.Reload(self._request, timeout=120)
                   if u.WhichOneof("update") == "result"]
        if not results or not results[-1].ok:
            raise BenchError(f"Reload API call: {results}")

    def command(self) -> str:
        return "Agent.Reload(service=web) on an open channel"


class SvcdGunicorn(Svcd):
    name = "svcd-gunicorn"
    needs = ("gunicorn",)

    def start(self) -> None:
        # --preload: the arbiter imports the app before it sends READY=1 (docs/workers.md)
        self.worker = [self.tools["gunicorn"], "--preload", "--workers", "1",
                       "--graceful-timeout", str(GRACEFUL), "--no-control-socket",
                       "--chdir", str(PROGRAMS), "wsgi_app:app"]
        super().start()


class SvcdUvicorn(Svcd):
    name = "svcd-uvicorn"
    worker = [PYTHON, str(PROGRAMS / "uvicorn_launcher.py"), "--app-dir", str(PROGRAMS),
              "--drain-timeout", str(GRACEFUL), "asgi_app:app"]


class SvcdUvicornFd(Svcd):
    """`uvicorn --fd 3` under svcd: what the launcher avoids (no TCP_NODELAY, no READY=1)."""

    name = "svcd-uvicorn-fd"
    worker = [str(VENV_BIN / "uvicorn"), "--fd", "3", "--no-access-log",
              "--timeout-graceful-shutdown", str(GRACEFUL), "--app-dir", str(PROGRAMS),
              "asgi_app:app"]
    service_extra = 'ready = "started"\n'


class Gunicorn(System):
    name = "gunicorn"
    needs = ("gunicorn",)

    def start(self) -> None:
        self.proc = self.procs.spawn(
            self.name,
            [self.tools["gunicorn"], "--workers", str(WORKERS), "--bind",
             f"127.0.0.1:{self.port}", "--graceful-timeout", str(GRACEFUL), "--chdir",
             str(PROGRAMS), "wsgi_app:app"], log=self.tmp / "gunicorn.log")
        self._serving()

    def worker_pids(self) -> set[int]:
        assert self.proc is not None
        return children(self.proc.pid)

    def reload(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGHUP)

    def command(self) -> str:
        return "kill -HUP <arbiter>"


class Uvicorn(System):
    name = "uvicorn"
    needs = ("uvicorn",)

    def start(self) -> None:
        self.proc = self.procs.spawn(
            self.name,
            [self.tools["uvicorn"], "--workers", str(WORKERS), "--host", "127.0.0.1",
             "--port", str(self.port), "--no-access-log", "--timeout-graceful-shutdown",
             str(GRACEFUL), "--app-dir", str(PROGRAMS), "asgi_app:app"],
            log=self.tmp / "uvicorn.log")
        self._serving()

    def worker_pids(self) -> set[int]:
        assert self.proc is not None
        # multiprocessing's resource tracker is a child too, but not a worker
        return children(self.proc.pid, skip="resource_tracker")

    def reload(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGHUP)

    def command(self) -> str:
        return "kill -HUP <uvicorn>"


class Pm2Cluster(System):
    name = "pm2-cluster"
    needs = ("pm2",)

    def start(self) -> None:
        self.home = self.tmp / "home"  # our own PM2_HOME: no clash with other PM2 users
        self.env = {**os.environ, "PM2_HOME": str(self.home), "PORT": str(self.port)}
        self.env.pop("NOTIFY_SOCKET", None)
        self.procs.on_close(self.kill)
        out = self.pm2("start", str(HERE / "hello.js"), "-i", str(WORKERS), "--name", "c")
        if out.returncode != 0:
            raise BenchError(f"pm2 start: {out.stdout[-800:]} {out.stderr[-800:]}")
        self._serving()

    def pm2(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.tools["pm2"], *args], capture_output=True, text=True,
                              env=self.env, timeout=120, cwd=self.tmp)

    def daemon(self) -> int:
        return int((self.home / "pm2.pid").read_text().strip())

    def worker_pids(self) -> set[int]:
        return children(self.daemon())

    def reload(self) -> None:
        out = self.pm2("reload", "c")
        if out.returncode != 0:
            raise BenchError(f"pm2 reload: {out.stdout[-800:]} {out.stderr[-800:]}")

    def kill(self) -> None:
        pid = None
        with contextlib.suppress(OSError, ValueError):
            pid = self.daemon()
        with contextlib.suppress(Exception):
            self.pm2("kill")
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                daemon = psutil.Process(pid)
                for proc in [*daemon.children(recursive=True), daemon]:
                    proc.kill()

    def command(self) -> str:
        return "pm2 reload c"


class Circus(System):
    name = "circus"
    needs = ("circusd", "circusctl")

    def start(self) -> None:
        self.endpoint = f"ipc://{self.tmp}/ctl.sock"
        ini = self.tmp / "circus.ini"
        ini.write_text(textwrap.dedent(f"""
            [circus]
            endpoint = {self.endpoint}
            pubsub_endpoint = ipc://{self.tmp}/pub.sock
            statsd = False
            check_delay = 5

            [watcher:w]
            cmd = {SVCD.python}
            args = {HERE / 'activate.py'} $(circus.sockets.web) {SVCD.python} {HELLO}
            numprocesses = {WORKERS}
            use_sockets = True
            copy_env = True
            graceful_timeout = {GRACEFUL}

            [socket:web]
            host = 127.0.0.1
            port = {self.port}
            """))
        self.proc = self.procs.spawn(self.name, [self.tools["circusd"], str(ini)], cwd=self.tmp,
                                     log=self.tmp / "circusd.log")
        self._serving()

    def worker_pids(self) -> set[int]:
        assert self.proc is not None
        return children(self.proc.pid)

    def reload(self) -> None:
        out = subprocess.run([self.tools["circusctl"], "--endpoint", self.endpoint, "reload",
                              "w"], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise BenchError(f"circusctl reload: {out.stdout} {out.stderr}")

    def command(self) -> str:
        return "circusctl reload w"


SYSTEMS: dict[str, type[System]] = {
    cls.name: cls
    for cls in (SvcdCore, SvcdCoreSurge2, SvcdCorePreload, SvcdCorePreloadApi,
                SvcdGunicorn, SvcdUvicorn, SvcdUvicornFd,
                Gunicorn, Uvicorn, Pm2Cluster, Circus)
}
#: run only when named in --only: they show what not to do, not a peer
OPT_IN = ("svcd-uvicorn-fd",)
SVCD_SYSTEMS = ("svcd-core", "svcd-core-preload", "svcd-core-preload-api", "svcd-gunicorn")


# --- svcd's own timeline --------------------------------------------------------------


def svcd_timeline(events_json: str, issued: Sequence[float]) -> list[dict[str, Any]]:
    """Per reload, from the agent's events: `svctl reload` issued -> reload_started,
    per new worker spawn -> READY, per old worker SIGTERM -> exit, and the total
    (reload_started -> reloaded). `issued` are the wall times the commands were run."""
    events = [json.loads(line) for line in events_json.splitlines() if line.strip()]
    reloads: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    spawned: dict[int, float] = {}
    stopping: dict[int, float] = {}
    for e in events:
        kind, pid, at = e.get("type"), e.get("pid") or 0, float(e["time"])
        if kind == "reload_started":
            current = {"started": at, "spawn_to_ready_s": [], "drain_s": []}
            if len(reloads) < len(issued):
                current["issue_to_start_s"] = round(at - issued[len(reloads)], 3)
            spawned, stopping = {}, {}
        elif current is None:
            continue
        elif kind == "started":
            spawned[pid] = at
        elif kind == "ready" and pid in spawned:
            current["spawn_to_ready_s"].append(round(at - spawned[pid], 3))
        elif kind == "stopping":
            stopping[pid] = at
        elif kind == "exited" and pid in stopping:
            current["drain_s"].append(round(at - stopping[pid], 3))
        elif kind == "reloaded":
            current["total_s"] = round(at - current.pop("started"), 3)
            reloads.append(current)
            current = None
    return reloads


# --- wrk -----------------------------------------------------------------------------

UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"latency {text!r}")
    return float(match[1]) * UNITS[match[2]]


@dataclass
class Wrk:
    requests: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    socket_errors: dict[str, int] = field(default_factory=dict)
    non_2xx: int = 0

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values()) + self.non_2xx


def parse_wrk(out: str) -> Wrk:
    result = Wrk()
    for line in out.splitlines():
        words = line.split()
        if line.strip().startswith("Latency ") and len(words) >= 4 and "Distribution" not in line:
            result.max_ms = _ms(words[3])
        elif words[:1] == ["50%"]:
            result.p50_ms = _ms(words[1])
        elif words[:1] == ["99%"]:
            result.p99_ms = _ms(words[1])
        elif "requests in" in line:
            result.requests = int(words[0])
        elif line.startswith("Requests/sec:"):
            result.rps = float(words[1])
        elif "Socket errors:" in line:
            for part in line.split(":", 1)[1].split(","):
                name, value = part.split()
                result.socket_errors[name] = int(value)
        elif "Non-2xx or 3xx responses:" in line:
            result.non_2xx = int(words[-1])
    if not result.requests:
        raise BenchError(f"wrk printed no result:\n{out}")
    return result


@dataclass
class Run:
    wrk: Wrk
    reload_s: list[float] = field(default_factory=list)
    pids_changed: bool = True
    loadavg: float = 0.0  # 1-minute load average at the start: other work on the machine


def one_run(system: System, wrk: str, reload: bool) -> Run:
    argv = [wrk, "-t1", f"-c{CONNECTIONS}", f"-d{DURATION}s", "--latency",
            f"http://127.0.0.1:{system.port}/"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    start = time.monotonic()
    run = Run(Wrk(), loadavg=round(os.getloadavg()[0], 2))
    try:
        if reload:
            for at in RELOAD_AT:
                time.sleep(max(0.0, start + at - time.monotonic()))
                seconds, changed = reload_once(system)
                run.reload_s.append(round(seconds, 3))
                run.pids_changed = run.pids_changed and changed
        out, _ = proc.communicate(timeout=DURATION + WRK_MARGIN)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    run.wrk = parse_wrk(out)
    return run


def reload_once(system: System) -> tuple[float, bool]:
    """Issue a reload; seconds until every old worker is gone, and whether all are new."""
    old = system.worker_pids()
    failure: list[BaseException] = []

    def issue() -> None:
        try:
            system.reload()
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)

    system.issued.append(time.time())
    began = time.monotonic()
    thread = threading.Thread(target=issue, daemon=True)
    thread.start()
    deadline = began + GONE_WITHIN
    while any(alive(pid) for pid in old):
        if time.monotonic() > deadline or failure:
            thread.join(1)
            raise BenchError(f"{system.name}: old workers {old} not gone: {failure}")
        time.sleep(POLL)
    gone = time.monotonic() - began
    thread.join(GONE_WITHIN)
    if failure:
        raise BenchError(f"{system.name}: reload failed: {failure[0]}")
    def full() -> set[int] | None:
        pids = system.worker_pids()
        return pids if len(pids) == WORKERS else None

    new: set[int] = wait_until(full, START_WITHIN, f"{system.name}: {WORKERS} new workers", POLL)
    return gone, not (new & old)


# --- the run -------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return round(statistics.median(values), 3) if values else float("nan")


def bench_system(cls: type[System], tools: dict[str, str], tmp: Path,
                 rounds: int, steady_runs: int = 1) -> dict[str, Any]:
    procs = Procs()
    try:
        system = cls(procs, tmp, tools)
        system.start()
        loadavg = os.getloadavg()
        steadies = [one_run(system, tools["wrk"], reload=False) for _ in range(steady_runs)]
        steady = sorted(steadies, key=lambda r: r.wrk.p99_ms)[len(steadies) // 2]
        runs = [one_run(system, tools["wrk"], reload=True) for _ in range(rounds)]
        extra = system.extra()
        command = system.command()
    finally:
        procs.close()
    reload_s = [s for r in runs for s in r.reload_s]
    return {
        "system": cls.name,
        "reload_command": command,
        "loadavg_at_start": [round(x, 2) for x in loadavg],
        "steady": asdict(steady.wrk) | {"errors": steady.wrk.errors},
        "steady_loadavg": steady.loadavg,
        "steady_p99_ms_runs": [r.wrk.p99_ms for r in steadies],
        "runs": [asdict(r.wrk) | {"errors": r.wrk.errors, "reload_s": r.reload_s,
                                  "pids_changed": r.pids_changed, "loadavg": r.loadavg}
                 for r in runs],
        "reloads": len(reload_s),
        "errors_total": sum(r.wrk.errors for r in runs),
        "errors_median_per_run": median([r.wrk.errors for r in runs]),
        "p99_ms_median": median([r.wrk.p99_ms for r in runs]),
        "max_ms_median": median([r.wrk.max_ms for r in runs]),
        "rps_median": median([r.wrk.rps for r in runs]),
        "reload_s_median": median(reload_s),
        "reload_s_max": max(reload_s) if reload_s else float("nan"),
        "every_pid_changed": all(r.pids_changed for r in runs),
        **extra,
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| system | reload command | reloads | errors (total) | errors/run (median) "
        "| p99 steady → reload (ms) | max steady → reload (ms) | req/s steady → reload "
        "| old workers gone (s, median / max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["steady"]
        lines.append(
            f"| {r['system']} | `{r['reload_command']}` | {r['reloads']} | {r['errors_total']} "
            f"| {r['errors_median_per_run']:g} | {s['p99_ms']:.1f} → {r['p99_ms_median']:.1f} "
            f"| {s['max_ms']:.0f} → {r['max_ms_median']:.0f} "
            f"| {s['rps']:.0f} → {r['rps_median']:.0f} "
            f"| {r['reload_s_median']:.2f} / {r['reload_s_max']:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="reload runs per svcd system")
    parser.add_argument("--peer-rounds", type=int, default=3, help="reload runs per peer")
    parser.add_argument("--steady-runs", type=int, default=3,
                        help="runs without a reload; the median-p99 one is the baseline")
    parser.add_argument("--only", default="", help="comma-separated system names")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--editable", action="store_true",
                        help="run svcd from the dev venv's editable install, not from a "
                             f"regular install in {SVCD_VENV.relative_to(REPO)}")
    args = parser.parse_args()
    if args.editable:
        svcd_install: dict[str, Any] = {"venv": "editable dev venv"}
    else:
        svcd_install = install_svcd(SVCD_VENV)
        SVCD.bin = SVCD_VENV / "bin"
        SVCD.python = str(SVCD.bin / "python")
    tools = peers()
    tools.setdefault("wrk", shutil.which("wrk") or "")
    tools.setdefault("gunicorn", str(VENV_BIN / "gunicorn"))
    if not tools["wrk"]:
        print("wrk not found: run bench/peers/install.sh", file=sys.stderr)
        return 1
    names = [n for n in args.only.split(",") if n] or [n for n in SYSTEMS if n not in OPT_IN]
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    with run_dir("svcd-reload-") as tmp:  # short: unix sockets
        for name in names:
            cls = SYSTEMS[name]
            missing = [t for t in cls.needs if not os.path.exists(tools.get(t, ""))]
            if missing:
                skipped[name] = f"not installed: {', '.join(missing)}"
                continue
            rounds = args.rounds if name in SVCD_SYSTEMS else args.peer_rounds
            print(f"== {name}: {args.steady_runs} steady + {rounds} reload runs of {DURATION} s",
                  flush=True)
            try:
                results.append(bench_system(cls, tools, tmp, rounds, args.steady_runs))
            except BenchError as exc:
                skipped[name] = f"failed: {exc}"
                print(f"   {name} failed: {exc}", flush=True)
                continue
            r = results[-1]
            print(f"   errors {r['errors_total']} over {r['reloads']} reloads, p99 "
                  f"{r['steady']['p99_ms']:.1f} -> {r['p99_ms_median']:.1f} ms, old gone "
                  f"{r['reload_s_median']:.2f} s (max {r['reload_s_max']:.2f})", flush=True)
    payload = {
        "machine": machine(),
        "command": "bench/reload/run.py " + " ".join(sys.argv[1:]),
        "wrk": f"wrk -t1 -c{CONNECTIONS} -d{DURATION}s --latency, reloads at {RELOAD_AT} s",
        "svcd_install": svcd_install,
        "results": results,
        "skipped": skipped,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(table(results))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(f"details: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
