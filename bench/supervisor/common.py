"""What the supervisor benchmarks share: svcd under test, HTTP probes, statistics, results.

The plumbing every benchmark under bench/ shares (Procs, wait_until, free_port, peers,
machine, run_dir, BenchError) lives in bench/benchlib.py; this module re-exports it so
the scripts here import everything from one place.

Invariants every benchmark here keeps:
- Every process a benchmark starts goes through `Procs.spawn` (its own session, hence
  its own process group) and is ended by `Procs.close`, which runs from a `finally`:
  SIGTERM to the group, a bounded wait, SIGKILL to the group and to every descendant
  seen before (workers that made their own process group, like svcd's, included).
  Daemons that escape the tree (PM2's God daemon) are ended by their own `kill`
  command and then by the pid they wrote.
- Loopback only: every port is a free port on 127.0.0.1, every peer's control channel
  is a unix socket (or a loopback port) in the run's temp dir.
- Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for benchlib

from benchlib import (
    PEERS_ENV,
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
    percentile,
    run_dir,
    svcd_agent_table,
    wait_until,
)

# the supervisor benchmarks import the shared plumbing from here, next to their own
__all__ = [
    "HELLO", "MIB", "PEERS_ENV", "PYTHON", "REPO", "STDLIB_WORKER", "SVCD", "SVCD_VENV",
    "SVCTL", "TINY_HTTP", "BenchError", "Probe", "Procs", "Svcd", "first_answer",
    "free_port", "hello_command", "http_get", "install_svcd", "machine", "peers",
    "probe_new_answer", "run_dir", "stdlib_command", "summary", "svcd_service",
    "wait_until", "write_result",
]

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
SVCD = str(VENV_BIN / "svcd")
SVCTL = str(VENV_BIN / "svctl")
HELLO = REPO / "examples" / "hello.py"  # server_core's HTTP hello
STDLIB_WORKER = REPO / "tests" / "programs" / "http_worker.py"
TINY_HTTP = HERE / "tiny_http.py"  # the same kind of stdlib worker, for the peers

POLL = 0.002  # seconds between polls where latency is measured
MIB = 1024 * 1024
METRICS_TIMEOUT = 60.0  # seconds for one /metrics answer


# --- statistics --------------------------------------------------------------------


def summary(values: Sequence[float], digits: int = 1) -> dict[str, Any]:
    """Median, p90, min, max and n of a sample (an empty sample gives n=0 only)."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p90 = percentile(ordered, 0.9)
    return {
        "n": len(ordered),
        "median": round(statistics.median(ordered), digits),
        "p90": round(p90, digits),
        "min": round(ordered[0], digits),
        "max": round(ordered[-1], digits),
    }


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


# --- waiting and HTTP --------------------------------------------------------------


def http_get(port: int, path: str = "/", timeout: float = 10.0) -> str:
    """One HTTP/1.0 GET on a fresh connection; the body. OSError on any failure."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0]:
        raise ConnectionError(f"bad response: {raw[:80]!r}")
    return body.decode(errors="replace").strip()


@dataclass
class Probe:
    """What happened to the connections opened while waiting for a new answer."""

    answered_at: float | None = None  # monotonic time of the first new answer
    body: str = ""
    attempts: int = 0
    refused: int = 0  # connect refused: a clean, visible failure a client retries
    broken: int = 0  # reset, closed or a non-200 answer: the request was lost
    hung: int = 0  # still unanswered LINGER s after the first new answer
    old: int = 0  # answered by the victim (only before it died)


LINGER = 3.0  # seconds pending connections get after the first new answer
PROBE_EVERY = 0.005  # seconds between two new connections while waiting
MAX_PENDING = 200  # connections waiting at once (a shared socket queues them all)
REQUEST = b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"


class _Conn:
    __slots__ = ("buf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()


def probe_new_answer(port: int, within: float, exclude: str | None = None) -> Probe:
    """Open a connection every PROBE_EVERY s until one gets a 200 not answered by `exclude`.

    Connections run concurrently, so one that a peer accepts and then never serves
    (it hangs) does not hide the moment a fresh connection is answered; it is counted
    as hung instead. BenchError when nothing new answers within `within` s.
    """
    result = Probe()
    sel = selectors.DefaultSelector()
    pending: set[_Conn] = set()
    start = time.monotonic()
    next_open = start
    deadline = start + within
    linger_until: float | None = None

    def finish(conn: _Conn) -> None:
        sel.unregister(conn.sock)
        conn.sock.close()
        pending.discard(conn)

    try:
        while True:
            now = time.monotonic()
            if linger_until is not None and (now >= linger_until or not pending):
                break
            if linger_until is None and now >= deadline:
                raise BenchError(f"port {port}: no new answer within {within:g} s")
            if linger_until is None and now >= next_open and len(pending) < MAX_PENDING:
                sock = socket.socket()
                sock.setblocking(False)
                err = sock.connect_ex(("127.0.0.1", port))
                result.attempts += 1
                if err in (0, errno.EINPROGRESS):
                    conn = _Conn(sock)
                    pending.add(conn)
                    sel.register(sock, selectors.EVENT_WRITE, conn)
                else:
                    sock.close()
                    result.refused += err == errno.ECONNREFUSED
                    result.broken += err != errno.ECONNREFUSED
                next_open = now + PROBE_EVERY
            if linger_until is not None:
                limit = linger_until
            elif len(pending) < MAX_PENDING:
                limit = min(deadline, next_open)
            else:
                limit = deadline
            for key, events in sel.select(max(0.0, limit - time.monotonic())):
                conn = key.data
                if events & selectors.EVENT_WRITE:
                    err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        result.refused += err == errno.ECONNREFUSED
                        result.broken += err != errno.ECONNREFUSED
                        finish(conn)
                        continue
                    try:
                        conn.sock.send(REQUEST)
                    except OSError:
                        result.broken += 1
                        finish(conn)
                        continue
                    sel.modify(conn.sock, selectors.EVENT_READ, conn)
                    continue
                try:
                    data = conn.sock.recv(65536)
                except OSError:
                    result.broken += 1
                    finish(conn)
                    continue
                if data:
                    conn.buf += data
                    continue
                at = time.monotonic()
                finish(conn)
                head, sep, body_b = bytes(conn.buf).partition(b"\r\n\r\n")
                status = head.split(b"\r\n")[0]
                if not sep or b" 200 " not in status:
                    result.broken += 1
                    continue
                body = body_b.decode(errors="replace").strip()
                if exclude is not None and body == exclude:
                    result.old += 1
                    continue
                if result.answered_at is None:
                    result.answered_at = at
                    result.body = body
                    linger_until = at + LINGER
        result.hung = len(pending)
        return result
    finally:
        for conn in list(pending):
            conn.sock.close()
        sel.close()


def first_answer(port: int, deadline_s: float, exclude: str | None = None) -> tuple[float, str]:
    """Poll GET / until a 200 comes back whose body is not `exclude`: (time, body)."""
    deadline = time.monotonic() + deadline_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"port {port}: no new answer within {deadline_s:g} s")
        try:
            body = http_get(port, "/", timeout=min(remaining, 2.0))
        except OSError:
            time.sleep(POLL)
            continue
        if exclude is None or body != exclude:
            return time.monotonic(), body
        time.sleep(POLL)


# --- svcd --------------------------------------------------------------------------


def svcd_service(name: str, command: Sequence[str], port: int, count: int,
                 extra: str = "") -> str:
    """One [services.NAME] table. stable_after = 1: see bench_kill.py for why."""
    return textwrap.dedent(
        f"""
        [services.{name}]
        command = {json.dumps(list(command))}
        count = {count}
        listen = ["tcp://127.0.0.1:{port}"]
        graceful_timeout = 5
        ready_timeout = 300
        {extra}
        [services.{name}.backoff]
        stable_after = 1
        """
    )


def hello_command(port: int) -> list[str]:
    return [PYTHON, str(HELLO), "--listen", f"http://127.0.0.1:{port}"]


def stdlib_command() -> list[str]:
    return [PYTHON, str(STDLIB_WORKER)]


class Svcd:
    """A real `svcd --config FILE` with its own control socket, logs and state dir."""

    def __init__(self, procs: Procs, tmp: Path, services: str, agent_extra: str = "") -> None:
        self.procs = procs
        self.tmp = tmp
        self.socket, agent_table = svcd_agent_table(tmp, agent_extra)
        self.config = tmp / "svcd.toml"
        self.config.write_text(agent_table + services)
        self.proc: subprocess.Popen[bytes] | None = None
        self.unanswered = 0  # status calls that timed out while waiting for readiness

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready_within: float = 120.0, metrics_port: int | None = None) -> Svcd:
        """Start the agent; return once every worker is ready (asked over /metrics when
        `metrics_port` is given: it waits as long as it takes, where svctl gives up after
        its own deadline)."""
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self.proc = self.procs.spawn("svcd", [SVCD, "--config", str(self.config)], env=env,
                                     cwd=REPO, log=self.tmp / "svcd.log")
        wait_until(lambda: self._alive() and os.path.exists(self.socket), 60, "svcd socket")
        ready = self.all_ready if metrics_port is None else lambda: self.metrics_ready(metrics_port)
        wait_until(lambda: self._alive() and ready(), ready_within, "svcd workers ready",
                   interval=0.25)
        return self

    def metrics_ready(self, port: int) -> bool:
        """Every service has its desired count ready, according to /metrics."""
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT) as resp:
            text = resp.read().decode()
        ready = desired = 0.0
        for line in text.splitlines():
            if line.startswith("svcd_service_ready_workers"):
                ready += float(line.split()[-1])
            elif line.startswith("svcd_service_desired_workers"):
                desired += float(line.split()[-1])
        return desired > 0 and ready == desired

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = (self.tmp / "svcd.log").read_text(errors="replace")[-3000:]
            raise BenchError(f"svcd exited {self.proc.returncode}:\n{log}")
        return True

    def svctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SVCTL, "--socket", self.socket, *args], capture_output=True,
                              text=True, timeout=timeout, cwd=REPO)

    def status(self) -> dict[str, Any]:
        out = self.svctl("status", "--json")
        if out.returncode != 0:
            raise BenchError(f"svctl status: {out.returncode} {out.stderr.strip()}")
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def all_ready(self) -> bool:
        try:
            services = self.status()["services"]
        except BenchError:
            # svctl exit 3: no answer within svctl's deadline; seen while 200 workers
            # start at once on 2 cores. Counted, and the wait goes on.
            self.unanswered += 1
            return False
        return bool(services) and all(bool(s["ready"] == s["desired"]) for s in services)

    def worker_pid(self, service: str, index: int = 0) -> int:
        for svc in self.status()["services"]:
            if svc["name"] == service:
                for w in svc["workers"]:
                    if w["index"] == index and w["pid"]:
                        return int(w["pid"])
        raise BenchError(f"no pid for {service}:{index}")

    def events(self) -> list[dict[str, Any]]:
        out = self.svctl("events", "--json")
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
