"""What a service should be: the validated, immutable description the supervisor runs.

`agent.config` parses TOML into these; the supervisor never sees raw config. Every
value here has already been checked (types, ranges, duplicate ports), so code that
consumes a spec trusts it. Specs are frozen so that a reload can compare the old and
the new one field by field (`ServiceSpec.rollout_fields`).

Durations are seconds (float); sizes are bytes (int).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

RestartPolicy = Literal["always", "on-failure", "never"]
ReadyMode = Literal["notify", "health", "started"]
HealthKind = Literal["http", "tcp", "grpc", "exec", "none"]
OnFailure = Literal["restart", "unready"]

EMPTY_ENV: Mapping[str, str] = MappingProxyType({})
_EMPTY_LIMITS: Mapping[str, int] = MappingProxyType({})


def _empty_env() -> Mapping[str, str]:
    # a factory: dataclasses refuse an unhashable default such as a mappingproxy
    return EMPTY_ENV


def _empty_limits() -> Mapping[str, int]:
    return _EMPTY_LIMITS


@dataclass(frozen=True)
class ListenSpec:
    """One address the agent binds once and hands to every worker of a service.

    `url` is what the user wrote (`tcp://0.0.0.0:8080`, `unix:///run/app.sock`).
    """

    url: str
    scheme: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""
    backlog: int = 2048

    @property
    def display(self) -> str:
        return f"{self.host}:{self.port}" if self.scheme == "tcp" else self.path


@dataclass(frozen=True)
class HealthSpec:
    """How the agent checks one worker (through that worker's private listener)."""

    kind: HealthKind = "none"
    path: str = "/healthz"
    expect_status: tuple[int, int] = (200, 399)
    command: tuple[str, ...] = ()
    grpc_service: str = ""
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    start_period: float = 0.0
    on_failure: OnFailure = "restart"

    @property
    def needs_private_listener(self) -> bool:
        """http, tcp and grpc checks dial the worker's own `svcd-health` socket."""
        return self.kind in ("http", "tcp", "grpc")


@dataclass(frozen=True)
class BackoffSpec:
    """Restart pacing: exponential with jitter, reset after a stable run.

    The first restart after a stable run is immediate (`initial` = 0 allowed) so that a
    single crash costs only the spawn time; each further quick failure doubles the delay
    up to `max`. `start_limit` quick failures in a row move the worker to fatal, from
    which it is retried every `fatal_retry` seconds.
    """

    initial: float = 0.0
    first_delay: float = 0.1
    factor: float = 2.0
    max: float = 30.0
    jitter: float = 0.1
    stable_after: float = 10.0
    start_limit: int = 5
    fatal_retry: float = 60.0


@dataclass(frozen=True)
class LogSpec:
    """Where a service's stdout/stderr go and how they rotate."""

    max_bytes: int = 10 * 1024 * 1024
    backups: int = 5
    ring_lines: int = 1000
    max_line: int = 16 * 1024
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True)
class ServiceSpec:
    """One `[services.NAME]` table, validated."""

    name: str
    command: tuple[str, ...]
    count: int = 1
    cwd: str | None = None
    user: str | None = None
    group: str | None = None
    env: Mapping[str, str] = field(default_factory=_empty_env)
    env_file: str | None = None
    stop_signal: str = "SIGTERM"
    listen: tuple[ListenSpec, ...] = ()
    restart: RestartPolicy = "always"
    ready: ReadyMode = "notify"
    ready_timeout: float = 60.0
    graceful_timeout: float = 30.0
    max_memory: int | None = None
    watchdog: float | None = None
    health: HealthSpec = field(default_factory=HealthSpec)
    backoff: BackoffSpec = field(default_factory=BackoffSpec)
    logs: LogSpec = field(default_factory=LogSpec)
    max_surge: int = 1
    max_unavailable: int = 0
    min_ready: int | None = None
    umask: int | None = None
    rlimits: Mapping[str, int] = field(default_factory=_empty_limits)
    preload: bool = False  # fork workers from a template that imported the program once
    # registry settings of this service ([services.X.registry])
    advertise: str | None = None
    deregister_delay: float = 0.0
    meta: Mapping[str, str] = field(default_factory=_empty_env)

    @property
    def required_ready(self) -> int:
        """Ready workers needed for the service to count as ready."""
        return self.count if self.min_ready is None else min(self.min_ready, self.count)

    def needs_rollout(self, other: ServiceSpec) -> bool:
        """True when going from self to `other` needs new processes.

        Health, backoff, log rotation, count and registry settings apply live; anything
        that changes how a worker process is started needs a rolling reload. That
        includes `graceful_timeout`: a worker gets its drain bound from it at spawn
        (SVCD_DRAIN_TIMEOUT), and the agent's SIGKILL must not come before that bound.
        """
        if self.health.needs_private_listener != other.health.needs_private_listener:
            return True  # the private `svcd-health` fd is part of how a worker starts
        return any(getattr(self, f) != getattr(other, f) for f in ROLLOUT_FIELDS)


#: Fields whose change means the workers must be replaced (rolling reload).
ROLLOUT_FIELDS: tuple[str, ...] = (
    "command",
    "cwd",
    "user",
    "group",
    "env",
    "env_file",
    "stop_signal",
    "listen",
    "watchdog",
    "graceful_timeout",
    "umask",
    "rlimits",
    "preload",
)
