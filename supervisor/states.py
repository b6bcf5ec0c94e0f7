"""Worker and service states, and the only transitions a worker may take.

Stdlib only. Every state change of a worker goes through `check_transition`, so an
impossible edge (say EXITED -> RUNNING without a new process) is a bug that fails
loudly instead of a status that lies.

    STARTING --ready--> RUNNING --stop/drain--> STOPPING --reaped--> EXITED
    STARTING/RUNNING --died--> EXITED --restart policy--> BACKOFF --timer--> STARTING
    EXITED --start limit / exit 78--> FATAL --slow retry / start--> STARTING
"""

from __future__ import annotations

import enum


class WorkerState(enum.StrEnum):
    """Lifecycle of one supervised worker slot (`service:index`)."""

    STARTING = "starting"  # spawned, not ready yet
    RUNNING = "running"  # ready (READY=1, first passing check, or started)
    STOPPING = "stopping"  # asked to stop (drain), not reaped yet
    EXITED = "exited"  # no process; stopped on purpose or died
    BACKOFF = "backoff"  # waiting before the next start
    FATAL = "fatal"  # gave up for now (start limit, EX_CONFIG); retried slowly


class ServiceState(enum.StrEnum):
    """Summary of a service, derived from its workers (never stored on its own)."""

    RUNNING = "running"
    STARTING = "starting"
    RELOADING = "reloading"
    STOPPED = "stopped"
    BACKOFF = "backoff"
    FATAL = "fatal"


_ALLOWED: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.EXITED: frozenset({WorkerState.STARTING, WorkerState.BACKOFF, WorkerState.FATAL}),
    WorkerState.STARTING: frozenset(
        {WorkerState.RUNNING, WorkerState.STOPPING, WorkerState.EXITED}
    ),
    WorkerState.RUNNING: frozenset({WorkerState.STOPPING, WorkerState.EXITED}),
    WorkerState.STOPPING: frozenset({WorkerState.EXITED}),
    WorkerState.BACKOFF: frozenset({WorkerState.STARTING, WorkerState.EXITED}),
    WorkerState.FATAL: frozenset({WorkerState.STARTING, WorkerState.EXITED}),
}


class InvalidTransition(RuntimeError):
    """A worker was asked to take an edge the state machine does not have."""


def check_transition(old: WorkerState, new: WorkerState) -> None:
    """Raise InvalidTransition unless old -> new is an edge of the state machine."""
    if new not in _ALLOWED[old]:
        raise InvalidTransition(f"{old} -> {new} is not a worker state transition")


def is_alive(state: WorkerState) -> bool:
    """True while a process exists for the slot."""
    return state in (WorkerState.STARTING, WorkerState.RUNNING, WorkerState.STOPPING)
