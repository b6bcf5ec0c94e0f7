"""Plumbing every benchmark under bench/ shares: processes, waits, ports, peers, machine.

Scripts import it as a top-level module after putting bench/ on sys.path (they run as
`python bench/X/script.py`, so only their own folder is there):

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchlib import ...  # noqa: E402

Invariants:
- Every process a benchmark starts goes through `Procs.spawn` (its own session, hence
  its own process group) and is ended by `Procs.close`, which runs from a `finally`:
  closers first (daemons outside our tree, like PM2's), then SIGTERM to each group, a
  bounded wait, SIGKILL to each group and to every descendant seen before (workers
  that made their own process group, like svcd's, included).
- Loopback only: every port comes from `free_port` (bound on 127.0.0.1).
- Every wait has a deadline (`wait_until` raises BenchError past it).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PEERS_ENV = BENCH / ".work" / "peers.env"  # written by bench/peers/install.sh
PYTHON = sys.executable
VENV_BIN = Path(sys.executable).parent
#: The bench-only venv holding a regular (non-editable) install of svcd, as users have it.
SVCD_VENV = BENCH / ".work" / "venv-svcd"
PIP_TIMEOUT = 900.0  # seconds: the first install downloads grpcio and friends

TERM_GRACE = 10.0  # seconds a process group gets between SIGTERM and SIGKILL
KILL_WAIT = 5.0  # seconds to reap a process group after its SIGKILL
WAIT_INTERVAL = 0.05  # seconds between two polls of `wait_until` unless told otherwise


class BenchError(RuntimeError):
    """A benchmark could not run as planned (a system failed to start, a wait timed out)."""


# --- machine and peers ---------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" when it does not say)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def machine(*, load_and_memory: bool = False) -> dict[str, Any]:
    """What the figures were measured on: recorded next to every result.

    `load_and_memory` adds the load average and the total memory (the supervisor
    benchmarks record them; the reload benchmark records the load per run instead)."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    if load_and_memory:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
        info["mem_total_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    return info


def peers() -> dict[str, str]:
    """PEER_* paths from bench/.work/peers.env that exist, keyed by lower-case name."""
    found: dict[str, str] = {}
    if PEERS_ENV.exists():
        for line in PEERS_ENV.read_text().splitlines():
            line = line.strip()
            if line.startswith("export ") and "=" in line:
                key, value = line[len("export ") :].split("=", 1)
                if key.startswith("PEER_") and os.path.exists(value):
                    found[key[len("PEER_") :].lower()] = value
    return found


def svcd_agent_table(tmp: Path, extra: str = "") -> tuple[str, str]:
    """The control socket path and the `[agent]` TOML of a bench svcd living in `tmp`."""
    socket_path = str(tmp / "run" / "svcd.sock")
    table = f"""
[agent]
name = "bench"
control_socket = "{socket_path}"
log_dir = "{tmp / 'logs'}"
state_dir = "{tmp / 'state'}"
{extra}
"""
    return socket_path, table


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def install_svcd(venv: Path = SVCD_VENV, reinstall: bool = True) -> dict[str, Any]:
    """`pip install REPO` (non-editable) into `venv`; returns what was installed.

    The dependencies are installed the first time only; svcd itself is rebuilt from the
    working tree every time (`--force-reinstall --no-deps`), so the figures belong to
    the code in the tree (its commit and whether svcd's packages had local changes are
    recorded). The dev venv's editable install costs every svcd process (agent, svctl,
    a server_core worker) its site hook at start-up, which users do not pay.
    """
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]

    def run(argv: list[str]) -> None:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=PIP_TIMEOUT)
        if proc.returncode != 0:
            raise BenchError(f"{shlex.join(argv)} failed: {proc.stderr[-2000:]}")

    fresh = not python.exists()
    if fresh:
        run([sys.executable, "-m", "venv", str(venv)])
        run([*pip, str(REPO)])
    elif reinstall:
        run([*pip, "--force-reinstall", "--no-deps", str(REPO)])
    check = subprocess.run(  # the installed package, not the tree, answers the import
        [str(python), "-c", "import agent, sys; sys.stdout.write(agent.__file__)"],
        capture_output=True, text=True, timeout=60, cwd=venv)
    if check.returncode != 0 or not check.stdout.startswith(str(venv)):
        raise BenchError(f"svcd is not installed in {venv}: {check.stdout}{check.stderr}")

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO,
                              timeout=60).stdout.strip()

    packages = ("agent", "supervisor", "server_core")
    return {"venv": str(venv.relative_to(REPO)), "installed_from": "working tree",
            "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--", *packages)),
            "fresh_venv": fresh}


# --- statistics and waiting ----------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The value at rank int(q * n) of the sorted sample (the last one for q near 1)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_until(predicate: Callable[[], Any], within: float, what: str,
               interval: float = WAIT_INTERVAL) -> Any:
    """Poll `predicate` until it returns something truthy and return that.

    OSError, ValueError, KeyError and psutil errors count as "not yet"; BenchError
    after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(OSError, ValueError, KeyError, psutil.Error):
            value = predicate()
            if value:
                return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {within:g} s waiting for {what}")
        time.sleep(interval)


# --- processes -----------------------------------------------------------------------


class Procs:
    """Every process of one benchmark run; `close()` ends them all (from a finally)."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._seen: dict[int, psutil.Process] = {}
        self._closers: list[Callable[[], None]] = []

    def spawn(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
              cwd: Path | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
        """Start `argv` in a session of its own; stdout and stderr go to `log` (appended)
        or nowhere."""
        out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        finally:
            if log is not None:
                out.close()  # type: ignore[union-attr]
        self._procs.append((name, proc))
        return proc

    def on_close(self, closer: Callable[[], None]) -> None:
        """Run `closer` first in close() (e.g. `pm2 kill` for a daemon outside our tree)."""
        self._closers.append(closer)

    def remember_tree(self) -> None:
        """Note every descendant now, so close() can kill ones that left our groups."""
        for _, proc in self._procs:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    self._seen.setdefault(child.pid, child)

    def close(self) -> None:
        """End everything; afterwards this object holds nothing (a second call is a no-op)."""
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                closer()
        self._closers.clear()
        self.remember_tree()
        for _, proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE
        for _, proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for _, proc in self._procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(KILL_WAIT)
        for child in self._seen.values():
            with contextlib.suppress(psutil.Error):
                if child.is_running():
                    child.kill()
        self._procs.clear()
        self._seen.clear()


@contextlib.contextmanager
def run_dir(prefix: str) -> Iterator[Path]:
    """A temp dir under /tmp named `prefix`XXXX for one run (configs, sockets, logs);
    short, for unix socket paths. Removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
