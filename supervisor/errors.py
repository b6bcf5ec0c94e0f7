"""Errors the supervisor raises to its callers (the agent maps them to API statuses)."""

from __future__ import annotations


class SupervisorError(Exception):
    """Base of every error the supervisor raises on purpose."""


class UnknownService(SupervisorError):
    """No service of that name is configured."""


class ListenerError(SupervisorError):
    """A listen address could not be bound (in use, permission, bad path)."""


class ReloadFailed(SupervisorError):
    """A rolling reload was rolled back; the old generation keeps serving.

    `reason` says which worker failed and how (exited with code 1, not ready in 60 s).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
