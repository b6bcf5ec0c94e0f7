"""Chaos scenarios against a real svcd: the load, the faults, the figures.

Shared by the chaos tests (tests/test_chaos.py: short runs with assertions) and by
bench/chaos/run.py (long runs, a table for bench/RESULTS.md). Everything runs on
127.0.0.1; every loop is bounded in count and time.

- `LoadClient`: a bounded asyncio HTTP/1.1 client (N keep-alive connections, reconnect
  on close) run in its own thread. Every response carries the serving worker's pid
  (tests/programs/core_app.py), so each failure is traced to the connection's worker.
- `kill_workers`: SIGKILL a random worker every `interval` seconds for `duration`;
  failures are *explained* when the connection's worker was killed (or, for a
  connection that never got an answer, when a kill fell inside the request).
- `stop_worker`: SIGSTOP one worker; its health check must find it and get it replaced.
- `etcd_freeze_and_wipe`: SIGSTOP etcd past the lease TTL, resume, then wipe it: the
  workers go on untouched and the agent's keys come back.
- `kill_agent`: SIGKILL svcd: workers die with it, keys expire; a restart brings both back.
- `log_dir_full`: a 1 MiB tmpfs log dir under a flood of lines (root only).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: bench/chaos/run.py
    sys.path.insert(0, str(ROOT))

from agent._pb import agent_pb2 as pb  # noqa: E402
from tests.agent_proc import AgentProcess  # noqa: E402
from tests.waiting import wait_for  # noqa: E402

#: The server_core worker that answers its pid (shared with the interop tests).
PID_WORKER = ROOT / "tests" / "programs" / "core_app.py"
REQUEST = b"GET / HTTP/1.1\r\nHost: chaos\r\n\r\n"
#: A request not answered by then failed (a SIGSTOPped worker never answers).
REQUEST_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5.0
#: Pause before reconnecting after a failed connect (the agent holds the listener, so
#: this should never be needed; it bounds a spin if it is).
RECONNECT_PAUSE = 0.05
MAX_HEADER_BYTES = 16 * 1024
#: Status polls while waiting for a replacement or a detection.
POLL = 0.01
RPC_TIMEOUT = 5.0
#: A kill "explains" a pid-less failure if it fell within the request, give or take this.
CLOCK_SLACK = 0.05
#: Failures one kill may cost, as a fraction of the open connections: in the worst case
#: every connection sits on the killed worker (accept() on a shared socket need not
#: spread them evenly), each loses the one request it had in flight.
CONNECTIONS_PER_KILL_BOUND = 1.0


# ---------------------------------------------------------------- the load


@dataclass
class Failure:
    started: float  # time.monotonic() when the request was sent (or connect began)
    failed: float
    pid: int | None  # the worker that served this connection last; None: none yet
    error: str


@dataclass
class LoadClient:
    """N keep-alive connections sending GET / back to back until stopped."""

    port: int
    connections: int = 16
    sent: int = 0
    ok: int = 0
    failures: list[Failure] = field(default_factory=list)
    served_by: dict[int, int] = field(default_factory=dict)
    _stop: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    @contextlib.contextmanager
    def running(self) -> Iterator[LoadClient]:
        """Run the load in a thread for the duration of the block."""
        started = threading.Event()
        errors: list[BaseException] = []

        def main() -> None:
            try:
                asyncio.run(self._main(started))
            except BaseException as exc:  # reported when the block ends
                errors.append(exc)
                started.set()

        self._thread = threading.Thread(target=main, name="chaos-load", daemon=True)
        self._thread.start()
        started.wait(CONNECT_TIMEOUT)
        try:
            yield self
        finally:
            if self._loop is not None and self._stop is not None:
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(REQUEST_TIMEOUT + CONNECT_TIMEOUT + 5)
            if errors:
                raise errors[0]

    async def _main(self, started: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        tasks = [asyncio.create_task(self._connection()) for _ in range(self.connections)]
        started.set()
        await self._stop.wait()
        await asyncio.gather(*tasks)

    async def _connection(self) -> None:
        assert self._stop is not None
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except (OSError, TimeoutError) as exc:
                self.failures.append(Failure(began, time.monotonic(), None, f"connect: {exc!r}"))
                await asyncio.sleep(RECONNECT_PAUSE)
                continue
            try:
                await self._requests(reader, writer)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._stop is not None
        pid: int | None = None
        while not self._stop.is_set():
            began = time.monotonic()
            self.sent += 1
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    writer.write(REQUEST)
                    await writer.drain()
                    body, close = await _read_response(reader)
                pid = int(body)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                self.failures.append(Failure(began, time.monotonic(), pid, repr(exc)))
                return  # reconnect
            self.ok += 1
            self.served_by[pid] = self.served_by.get(pid, 0) + 1
            if close:
                return  # the worker drains (or said so): a new connection


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError("headers too long")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 200"):
        raise ValueError(f"status {lines[0]!r}")
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
        elif name.strip().lower() == "connection" and "close" in value.lower():
            close = True
    return await reader.readexactly(length), close


# ---------------------------------------------------------------- talking to the agent


class Control:
    """Raw gRPC to the agent's control socket (faster than forking svctl per poll)."""

    def __init__(self, socket_path: str) -> None:
        self._channel = grpc.insecure_channel(f"unix:{socket_path}")
        self._status = self._channel.unary_unary(
            "/svcd.v1.Agent/Status",
            request_serializer=pb.StatusRequest.SerializeToString,
            response_deserializer=pb.StatusResponse.FromString,
        )

    def close(self) -> None:
        self._channel.close()

    def status(self, service: str = "") -> pb.StatusResponse:
        reply: pb.StatusResponse = self._status(
            pb.StatusRequest(service=service), timeout=RPC_TIMEOUT
        )
        return reply

    def workers(self, service: str) -> list[pb.WorkerStatus]:
        (svc,) = self.status(service).services
        return list(svc.workers)


def wait_until(predicate: Callable[[], Any], timeout: float) -> float | None:
    """Seconds until `predicate()` held, or None after `timeout` (errors: not yet)."""
    began = time.monotonic()
    deadline = began + timeout
    while True:
        with contextlib.suppress(Exception):
            if predicate():
                return time.monotonic() - began
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def pid_service(port: int, name: str = "api", count: int = 4, extra: str = "") -> str:
    """TOML of a service running tests/programs/core_app.py."""
    return f"""
[services.{name}]
command = {json.dumps([sys.executable, str(PID_WORKER)])}
count = {count}
listen = ["tcp://127.0.0.1:{port}"]
graceful_timeout = 2
{extra}
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def summary(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"median {statistics.median(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms"


# ---------------------------------------------------------------- SIGKILL under load


@dataclass
class KillFigures:
    duration: float
    connections: int
    workers: int
    sent: int = 0
    ok: int = 0
    failed: int = 0
    kills: int = 0
    unexplained: list[Failure] = field(default_factory=list)
    most_failures_per_kill: int = 0
    replaced: list[float] = field(default_factory=list)  # kill -> new worker ready (s)
    not_replaced_in_time: int = 0

    def row(self) -> dict[str, str]:
        return {
            "scenario": f"SIGKILL a random worker every 2 s for {self.duration:g} s "
            f"({self.workers} workers, {self.connections} keep-alive connections)",
            "figures": f"{self.sent} requests sent, {self.failed} failed "
            f"({self.failed / max(self.kills, 1):.1f} per kill, at most "
            f"{self.most_failures_per_kill}), {len(self.unexplained)} unexplained; "
            f"{self.kills} kills; kill → replacement ready: {summary(self.replaced)}"
            + (
                f" ({self.not_replaced_in_time} took longer than the kill interval)"
                if self.not_replaced_in_time
                else ""
            ),
        }


#: The kill loop's backoff: a worker that ran this long counts as stable, so that a
#: slot picked twice in a row by the random kills is not taken for a crash loop. (With
#: the defaults, stable_after = 10 s and start_limit = 5, kills every 2 s among 4
#: workers send every slot to `fatal` within a minute: SIGKILLs from outside, the OOM
#: killer's for instance, count as quick failures.)
KILL_BACKOFF = """
[services.api.backoff]
initial = 0
first_delay = 0
stable_after = 1.5
"""


def kill_workers(
    agent: AgentProcess,
    port: int,
    *,
    duration: float,
    interval: float = 2.0,
    connections: int = 16,
    service: str = "api",
    seed: int | None = None,
) -> KillFigures:
    """SIGKILL a random ready worker every `interval` s for `duration` s under load."""
    rng = random.Random(seed)
    control = Control(agent.socket)
    workers = len(control.workers(service))
    figures = KillFigures(duration, connections, workers)
    kills: list[tuple[float, int]] = []
    load = LoadClient(port, connections)
    try:
        with load.running():
            wait_until(lambda: load.ok >= connections, 10.0)  # warmed up
            end = time.monotonic() + duration
            next_kill = time.monotonic()
            while time.monotonic() < end:
                ready = [w for w in control.workers(service) if w.ready and w.pid]
                if ready:
                    victim = rng.choice(ready)
                    os.kill(victim.pid, signal.SIGKILL)
                    kills.append((time.monotonic(), victim.pid))
                    took = wait_until(
                        functools.partial(_replaced, control, service, victim), interval
                    )
                    if took is None:
                        figures.not_replaced_in_time += 1
                    else:
                        figures.replaced.append(took)
                next_kill += interval
                time.sleep(max(0.0, next_kill - time.monotonic()))
    finally:
        control.close()
    figures.sent, figures.ok, figures.kills = load.sent, load.ok, len(kills)
    figures.failed = len(load.failures)
    per_kill: dict[int, int] = {}
    killed = {pid: at for at, pid in kills}
    for failure in load.failures:
        if failure.pid is not None and failure.pid in killed:
            per_kill[failure.pid] = per_kill.get(failure.pid, 0) + 1
            continue
        during = [
            pid for at, pid in kills
            if failure.started - CLOCK_SLACK <= at <= failure.failed + CLOCK_SLACK
        ]  # fmt: skip
        if failure.pid is None and during:
            per_kill[during[0]] = per_kill.get(during[0], 0) + 1
        else:
            figures.unexplained.append(failure)
    figures.most_failures_per_kill = max(per_kill.values(), default=0)
    return figures


def _replaced(control: Control, service: str, victim: pb.WorkerStatus) -> bool:
    """Has the slot of `victim` a new worker that is ready?"""
    return any(
        w.index == victim.index and w.pid not in (0, victim.pid) and w.ready
        for w in control.workers(service)
    )


# ---------------------------------------------------------------- SIGSTOP: the health check


@dataclass
class StopFigures:
    interval: float
    timeout: float
    fall: int
    graceful: float
    detected: float | None = None  # SIGSTOP -> health "failing"
    replaced: float | None = None  # SIGSTOP -> a new worker in the slot, ready
    old_gone: bool = False

    @property
    def detection_bound(self) -> float:
        """The check's own arithmetic: `fall` failed checks, `interval` apart, each
        taking up to `timeout`, plus one interval for the phase of the first one."""
        return self.interval * self.fall + self.timeout

    def row(self) -> dict[str, str]:
        return {
            "scenario": f"SIGSTOP a worker (http check every {self.interval:g} s, "
            f"timeout {self.timeout:g} s, fall {self.fall}, graceful_timeout {self.graceful:g} s)",
            "figures": f"detected after {_s(self.detected)} (interval x fall + timeout = "
            f"{self.detection_bound:g} s); replacement ready after {_s(self.replaced)}",
        }


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


HEALTH_INTERVAL = 0.5
HEALTH_TIMEOUT = 0.25
HEALTH_FALL = 2
STOP_GRACEFUL = 2.0
HEALTH_START_PERIOD = 10.0


def health_checked_service(port: int, count: int = 2) -> str:
    return pid_service(
        port,
        count=count,
        extra=f"""
[services.api.health]
kind = "http"
path = "/healthz"
interval = {HEALTH_INTERVAL}
timeout = {HEALTH_TIMEOUT}
rise = 1
fall = {HEALTH_FALL}
# checks run before READY=1 too, and a failing one replaces the worker as soon as it
# is ready: give the interpreter time to import server_core
start_period = {HEALTH_START_PERIOD}
""",
    ).replace("graceful_timeout = 2", f"graceful_timeout = {STOP_GRACEFUL}")


def stop_worker(agent: AgentProcess, service: str = "api") -> StopFigures:
    figures = StopFigures(HEALTH_INTERVAL, HEALTH_TIMEOUT, HEALTH_FALL, STOP_GRACEFUL)
    control = Control(agent.socket)
    try:
        wait_until(
            lambda: all(w.ready and w.health == "passing" for w in control.workers(service)),
            30,
        )
        victim = control.workers(service)[0]
        os.kill(victim.pid, signal.SIGSTOP)
        began = time.monotonic()
        try:

            def slot() -> pb.WorkerStatus:
                return next(w for w in control.workers(service) if w.index == victim.index)

            figures.detected = wait_until(
                lambda: slot().pid != victim.pid or slot().health == "failing",
                figures.detection_bound + STOP_GRACEFUL + 10,
            )
            bound = figures.detection_bound + STOP_GRACEFUL + 10
            wait_until(lambda: slot().pid not in (0, victim.pid) and slot().ready, bound)
            if slot().pid not in (0, victim.pid) and slot().ready:
                figures.replaced = time.monotonic() - began
            figures.old_gone = wait_until(lambda: not alive(victim.pid), 10) is not None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim.pid, signal.SIGCONT)
    finally:
        control.close()
    return figures


# ---------------------------------------------------------------- etcd


def etcd_keys(endpoint: str, prefix: str) -> dict[str, Any]:
    """Every key under `prefix` and its JSON value, through etcd's HTTP/JSON gateway."""
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    body = json.dumps({"key": _b64(prefix), "range_end": _b64(end)}).encode()
    request = urllib.request.Request(f"{endpoint}/v3/kv/range", body, method="POST")
    with urllib.request.urlopen(request, timeout=RPC_TIMEOUT) as resp:
        reply = json.loads(resp.read())
    return {
        base64.b64decode(kv["key"]).decode(): json.loads(base64.b64decode(kv.get("value", "")))
        for kv in reply.get("kvs", [])
    }


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def registry_toml(endpoint: str, ttl: int) -> str:
    return f"""
[registry]
endpoints = ["{endpoint}"]
prefix = "/chaos"
ttl = {ttl}
timeout = 1
"""


def worker_keys(endpoint: str, service: str = "api") -> set[int]:
    """Pids of the worker keys of `service` in etcd."""
    return {v["pid"] for v in etcd_keys(endpoint, f"/chaos/services/{service}/").values()}


@dataclass
class EtcdFigures:
    ttl: int
    frozen_for: float
    sent: int = 0
    failed: int = 0
    workers_untouched: bool = False
    back_after_freeze: float | None = None  # SIGCONT -> every worker key there again
    back_after_wipe: float | None = None  # wiped etcd healthy -> every key back

    def row(self) -> dict[str, str]:
        return {
            "scenario": f"etcd frozen (SIGSTOP) {self.frozen_for:g} s (TTL {self.ttl} s), "
            "then wiped, under load",
            "figures": f"{self.sent} requests sent, {self.failed} failed; workers untouched: "
            f"{'yes' if self.workers_untouched else 'NO'}; keys back {_s(self.back_after_freeze)} "
            f"after resume, {_s(self.back_after_wipe)} after the wipe",
        }


def etcd_freeze_and_wipe(
    agent: AgentProcess, etcd: Any, port: int, *, ttl: int, connections: int = 8
) -> EtcdFigures:
    """`etcd` is a tests.etcd_fixture.EtcdServer (pause, resume, wipe)."""
    figures = EtcdFigures(ttl, frozen_for=2.0 * ttl + 1)
    control = Control(agent.socket)
    load = LoadClient(port, connections)
    try:
        pids = {w.pid for w in control.workers("api")}
        wait_until(lambda: worker_keys(etcd.endpoint) == pids, 30)
        with load.running():
            etcd.pause()
            try:
                time.sleep(figures.frozen_for)  # the fault itself: etcd hangs this long
            finally:
                etcd.resume()
            figures.back_after_freeze = wait_until(lambda: worker_keys(etcd.endpoint) == pids, 30)
            etcd.wipe()
            figures.back_after_wipe = wait_until(lambda: worker_keys(etcd.endpoint) == pids, 30)
        workers = control.workers("api")
        figures.workers_untouched = {w.pid for w in workers} == pids and all(
            w.restarts == 0 for w in workers
        )
    finally:
        control.close()
    figures.sent, figures.failed = load.sent, len(load.failures)
    return figures


# ---------------------------------------------------------------- the agent killed


@dataclass
class AgentKillFigures:
    ttl: int
    orphans: int = -1
    workers_gone: float | None = None  # SIGKILL -> no worker process left
    keys_gone: float | None = None  # SIGKILL -> no key of the agent in etcd
    keys_back: float | None = None  # restart -> every worker key there again

    def row(self) -> dict[str, str]:
        return {
            "scenario": f"svcd SIGKILLed, then restarted (TTL {self.ttl} s)",
            "figures": f"orphans: {self.orphans}; workers gone after {_s(self.workers_gone)}; "
            f"keys gone after {_s(self.keys_gone)}; keys back {_s(self.keys_back)} "
            "after the restart",
        }


def kill_agent(agent: AgentProcess, etcd: Any, *, ttl: int) -> AgentKillFigures:
    figures = AgentKillFigures(ttl)
    control = Control(agent.socket)
    try:
        pids = {w.pid for w in control.workers("api")}
    finally:
        control.close()
    wait_until(lambda: worker_keys(etcd.endpoint) == pids, 30)
    began = time.monotonic()
    agent.stop(signal.SIGKILL)
    figures.workers_gone = wait_until(lambda: not any(alive(p) for p in pids), 10)
    figures.orphans = sum(alive(p) for p in pids)
    if wait_until(lambda: not etcd_keys(etcd.endpoint, "/chaos/"), ttl + 10) is not None:
        figures.keys_gone = time.monotonic() - began
    restarted = time.monotonic()
    agent.start()  # returns once the agent answers "ready"
    control = Control(agent.socket)
    try:
        new = {w.pid for w in control.workers("api")}
        took = wait_until(lambda: worker_keys(etcd.endpoint) == new and new, ttl + 10)
        figures.keys_back = None if took is None else time.monotonic() - restarted
    finally:
        control.close()
    return figures


# ---------------------------------------------------------------- the log dir full


@dataclass
class LogFullFigures:
    size: str
    lines: int = 0
    dropped: int = 0
    replaced: float | None = None  # SIGKILL -> a new worker running, disk full
    ring_after: bool = False  # lines still reach `svctl logs` (the ring) once full

    def row(self) -> dict[str, str]:
        return {
            "scenario": f"log dir on a full {self.size} tmpfs, a worker flooding stdout",
            "figures": f"{self.lines} lines captured, {self.dropped} dropped from the file; "
            f"SIGKILL → replacement running after {_s(self.replaced)}; ring still fed: "
            f"{'yes' if self.ring_after else 'NO'}",
        }


FLOOD = (
    "import sys, time\n"
    "i = 0\n"
    "while True:\n"
    "    for _ in range(200):\n"
    "        i += 1\n"
    "        sys.stdout.write(f'line {i} ' + 'x' * 100 + '\\n')\n"
    "    sys.stdout.flush()\n"
    "    time.sleep(0.005)\n"
)


@contextlib.contextmanager
def tmpfs(size: str = "1m") -> Iterator[Path]:
    """A fresh tmpfs of `size`; raises PermissionError/OSError when it cannot mount."""
    where = Path(tempfile.mkdtemp(prefix="svcd-chaos-logs-"))
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if mounted.returncode != 0:
            raise PermissionError(f"mount tmpfs: {mounted.stderr.strip()}")
        try:
            yield where
        finally:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)
    finally:
        with contextlib.suppress(OSError):
            where.rmdir()


async def log_dir_full(log_dir: Path, size: str = "1m") -> LogFullFigures:
    """A real Supervisor (in this process) logging to `log_dir` (a small tmpfs)."""
    from supervisor.events import EventBus
    from supervisor.spec import LogSpec, ServiceSpec
    from supervisor.supervisor import Supervisor

    figures = LogFullFigures(size)
    supervisor = Supervisor(events=EventBus(), log_dir=log_dir)
    await supervisor.start()
    try:
        spec = ServiceSpec(
            name="noisy",
            command=(sys.executable, "-u", "-c", FLOOD),
            ready="started",
            graceful_timeout=2.0,
            # no rotation: the file must hit the end of the disk
            logs=LogSpec(max_bytes=1 << 40, backups=0, ring_lines=100),
        )
        svc = await supervisor.add_service(spec)
        await svc.wait_ready(10)
        await wait_for(lambda: svc.logs.dropped > 0, 30)
        (victim,) = [w.pid for w in svc.status().workers]
        os.kill(victim, signal.SIGKILL)
        began = time.monotonic()
        await wait_for(
            lambda: any(w.pid not in (0, victim) and w.ready for w in svc.status().workers), 10
        )
        figures.replaced = time.monotonic() - began
        lines = svc.logs.lines
        await wait_for(lambda: svc.logs.lines > lines + 1000, 10)
        figures.ring_after = any(line.pid != victim for line in svc.logs.tail(10))
        figures.lines, figures.dropped = svc.logs.lines, svc.logs.dropped
    finally:
        await supervisor.close()
        await supervisor.close_reaper()
    return figures
