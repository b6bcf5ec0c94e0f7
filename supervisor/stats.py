"""Resource and traffic statistics of one worker: psutil samples plus what it reports.

Two sources feed `WorkerStats`:
- `TreeSampler` samples the worker's whole process tree with psutil (a gunicorn-style
  worker forks children that do the real work): RSS summed over the tree, CPU seconds
  (alive processes plus what they reaped from exited children), fds and threads. CPU
  percent is derived from CPU-seconds deltas between samples, so a child that appears or
  goes away between two samples never produces a spike above the truth.
- `apply_report` folds an `X_SVCD_STATS=<json>` report in (connections, requests,
  send_fail, timers, bytes, user metrics); qps comes from request deltas over
  monotonic time.

Summing RSS over forked children counts shared copy-on-write pages more than once,
like `ps` and most supervisors do; it errs on the side of a too-high figure.
Nothing here blocks for long: a sample reads /proc a few times per process.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil

#: At most this many user metrics are kept per worker (a report is untrusted input).
MAX_METRICS = 1000
#: CPU counts as a percentage of one core (like `top`), so 2 busy cores read 200 %.
PERCENT = 100.0


@dataclass(frozen=True)
class TreeSample:
    """One psutil sample of a worker's process tree."""

    rss_bytes: int
    cpu_seconds: float
    cpu_percent: float
    num_fds: int
    num_threads: int
    processes: int


#: Bound on a process tree's size (a fork bomb must not make sampling unbounded).
MAX_TREE = 4096


def _descendants(root: int) -> list[int] | None:
    """Pids below `root` from /proc/PID/task/TID/children; None when the kernel lacks them."""
    out: list[int] = []
    todo = [root]
    seen_file = False
    while todo and len(out) < MAX_TREE:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # gone meanwhile
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                if not seen_file and pid == root and os.path.exists(f"/proc/{pid}/task/{tid}"):
                    return None  # the task exists but the kernel has no children file
                continue
            except OSError:
                continue
            seen_file = True
            for word in data.split():
                child = int(word)
                out.append(child)
                todo.append(child)
    return out


class TreeSampler:
    """Samples the process tree rooted at one pid; keeps psutil handles between samples."""

    def __init__(self, pid: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.pid = pid
        self._clock = clock
        self._root: psutil.Process | None = None
        self._last: tuple[float, float] | None = None  # (monotonic, cpu_seconds)
        self._handles: dict[int, psutil.Process] = {}  # descendants seen last time
        with contextlib.suppress(psutil.Error):
            self._root = psutil.Process(pid)

    def _children(self) -> list[psutil.Process]:
        """Every descendant of the root, with psutil handles reused between samples.

        psutil's children() reads the stat file of every process on the host to find
        them; with 200 workers sampled each second that kept the agent's loop busy. The
        kernel's own child lists (/proc/PID/task/TID/children) cost one read per
        process of the tree instead.
        """
        pids = _descendants(self.pid)
        if pids is None:  # a kernel without CONFIG_PROC_CHILDREN
            with contextlib.suppress(psutil.Error):
                return self._root.children(recursive=True) if self._root else []
            return []
        known = self._handles
        self._handles = {}
        for pid in pids:
            handle = known.get(pid)
            if handle is None:
                try:
                    handle = psutil.Process(pid)
                except psutil.Error:
                    continue
            self._handles[pid] = handle
        return list(self._handles.values())

    def sample(self) -> TreeSample | None:
        """A fresh sample, or None when the root process is gone."""
        if self._root is None:
            return None
        if not self._root.is_running():
            return None
        procs = [self._root, *self._children()]
        rss = fds = threads = alive = 0
        cpu = 0.0
        for proc in procs:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    rss += proc.memory_info().rss
                    fds += proc.num_fds()
                    threads += proc.num_threads()
            except psutil.Error:
                continue  # exited between listing and reading: its time moved to its parent
            cpu += times.user + times.system + times.children_user + times.children_system
            alive += 1
        now = self._clock()
        percent = 0.0
        if self._last is not None:
            then, cpu_then = self._last
            if now > then:
                percent = max(0.0, (cpu - cpu_then) / (now - then) * PERCENT)
        self._last = (now, cpu)
        return TreeSample(rss, cpu, percent, fds, threads, alive)


#: Counts are int64 in the control API: a worker reporting more is lying (and would
#: break `svctl status` for every service), so such a value counts as malformed.
INT64_MAX = 2**63 - 1


def _int(value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's Infinity
        return 0
    return number if -INT64_MAX <= number <= INT64_MAX else 0


def _metric(entry: Any) -> dict[str, Any] | None:
    """A user metric from an untrusted report, or None: a named, finite, double value."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        return None
    value = entry.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond a double
        return None
    return entry if math.isfinite(number) else None


@dataclass
class WorkerStats:
    """Latest figures of one worker process (reset when a new process starts)."""

    rss_bytes: int = 0
    cpu_seconds: float = 0.0
    cpu_percent: float = 0.0
    num_fds: int = 0
    num_threads: int = 0
    connections: int = 0
    requests: int = 0
    qps: float = 0.0
    send_fail: int = 0
    timers: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    _qps_base: tuple[float, int] | None = None

    def apply_sample(self, sample: TreeSample) -> None:
        self.rss_bytes = sample.rss_bytes
        self.cpu_seconds = sample.cpu_seconds
        self.cpu_percent = sample.cpu_percent
        self.num_fds = sample.num_fds
        self.num_threads = sample.num_threads

    def apply_report(self, report: Mapping[str, Any], now: float) -> None:
        """Fold one X_SVCD_STATS report in; never raises: the report is untrusted input.

        Malformed or out-of-range counts read as 0; metrics without a string name and
        a finite numeric value (one a double holds) are dropped.
        """
        if "connections" in report:
            self.connections = _int(report["connections"])
        if "requests" in report:
            requests = _int(report["requests"])
            self._update_qps(requests, now)
            self.requests = requests
        if "send_fail" in report:
            self.send_fail = _int(report["send_fail"])
        if "timers" in report:
            self.timers = _int(report["timers"])
        raw_bytes = report.get("bytes")
        if isinstance(raw_bytes, Mapping):
            self.bytes_in = _int(raw_bytes.get("in", self.bytes_in))
            self.bytes_out = _int(raw_bytes.get("out", self.bytes_out))
        if "bytes_in" in report:
            self.bytes_in = _int(report["bytes_in"])
        if "bytes_out" in report:
            self.bytes_out = _int(report["bytes_out"])
        metrics = report.get("metrics")
        if isinstance(metrics, Mapping):
            metrics = [{"name": str(k), "value": v} for k, v in metrics.items()]
        if isinstance(metrics, list):
            kept = (_metric(m) for m in metrics[:MAX_METRICS])
            self.metrics = [m for m in kept if m is not None]

    #: qps is averaged over at least this many seconds of reports.
    QPS_WINDOW = 1.0

    def _update_qps(self, requests: int, now: float) -> None:
        if self._qps_base is None or requests < self._qps_base[1]:
            self._qps_base = (now, requests)  # first report, or the counter restarted
            return
        then, base = self._qps_base
        if now - then >= self.QPS_WINDOW:
            self.qps = (requests - base) / (now - then)
            self._qps_base = (now, requests)
