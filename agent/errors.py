"""Errors the agent core raises to the control API (mapped to gRPC codes in agent/api.py)."""

from __future__ import annotations

from supervisor.errors import UnknownService

__all__ = ["ActionFailed", "AgentError", "ConfigRejected", "InvalidRequest", "UnknownService"]


class AgentError(Exception):
    """Base of the errors the core raises on purpose."""


class ConfigRejected(AgentError):
    """The config file is broken; nothing was changed. `problems` names every one."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("config rejected: " + "; ".join(problems))
        self.problems = problems


class ActionFailed(AgentError):
    """The action ran and failed (and was rolled back where that applies)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidRequest(AgentError):
    """The request itself makes no sense (e.g. scale to -1)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
