"""Point-in-time views of services and workers, for status, metrics and the registry.

Plain frozen dataclasses built by `Service.status()`; nothing here refers back to live
objects, so a view can be handed to another task (the registry, the gRPC servicer)
without races.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class WorkerStatus:
    """One worker slot as `svctl status --json` shows it (plus extras)."""

    worker: str  # "service:index"
    index: int
    pid: int  # 0 when no process
    generation: int
    state: str  # supervisor.states.WorkerState value
    ready: bool
    health: str  # passing | failing | unknown
    restarts: int
    uptime_s: float
    rss_bytes: float
    cpu_percent: float
    cpu_seconds: float
    connections: int
    requests: int
    qps: float
    send_fail: int = 0
    timers: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    started_at: float = 0.0  # wall clock, 0 when no process
    health_reason: str = ""
    status_text: str = ""  # last STATUS= from sd_notify
    last_exit: str = ""  # "code 1" / "signal SIGKILL" / ""
    last_exit_reason: str = ""  # how the last process ended, in words, with why it was replaced
    exit_counts: dict[str, int] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)  # user counters/gauges
    num_fds: int = 0
    num_threads: int = 0
    #: True once the slot is stopping or stopped for good (a stop request: svctl stop,
    #: scale down, service removed, an old generation retired, agent shutdown; or its
    #: restart policy let it stay exited). False while a process is replaced in place
    #: (crash, health failure, max_memory, watchdog, ready timeout) or in backoff: the
    #: registry keeps a non-leaving slot's key and drops a leaving one's before it stops.
    #: Internal (not in the gRPC status).
    leaving: bool = False

    @classmethod
    def stopped_slot(cls, service: str, index: int, generation: int) -> WorkerStatus:
        """Slot `index` of a stopped service: no process, but a row, as supervisorctl
        shows a stopped program (and metrics keep the series: up 0, not gone)."""
        return cls(
            worker=f"{service}:{index}", index=index, pid=0, generation=generation,
            state="exited", ready=False, health="unknown", restarts=0, uptime_s=0.0,
            rss_bytes=0.0, cpu_percent=0.0, cpu_seconds=0.0, connections=0, requests=0,
            qps=0.0, leaving=True,
        )


@dataclass(frozen=True)
class TemplateStatus:
    """The running preload template of one generation (`preload = true`): not a worker,
    but a process of the service that holds memory, so status shows it."""

    pid: int
    generation: int
    rss_bytes: float
    uptime_s: float
    forks: int  # workers forked from it so far


@dataclass(frozen=True)
class ServiceStatus:
    """One service and all its current workers (old and new generation during a reload)."""

    name: str
    state: str  # supervisor.states.ServiceState value
    desired: int
    ready: int
    generation: int
    workers: tuple[WorkerStatus, ...]
    listen: tuple[str, ...] = ()
    required_ready: int = 0
    reloads: int = 0
    advertise: str = ""
    meta: dict[str, str] = field(default_factory=dict)
    log_lines_dropped: int = 0  # lines the log file could not take (LogStore.dropped)
    log_lines_cut: int = 0  # lines cut at LogSpec.max_line (LogStore.cut)
    templates: tuple[TemplateStatus, ...] = ()  # running preload templates, oldest first


@dataclass(frozen=True)
class LogLine:
    """One captured line of a worker's stdout or stderr."""

    time: float  # wall clock
    service: str
    worker: int  # index
    pid: int
    stream: str  # "stdout" | "stderr"
    line: str  # without the trailing newline; cut at LogSpec.max_line
