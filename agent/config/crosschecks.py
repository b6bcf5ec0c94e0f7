"""Checks across tables and files: no two listeners may take one address.

The agent's own listeners (control socket, control/probe/metrics addresses) and every
service's `listen` entries are collected as `Bound`s, agent first, then services in
file order; each one that collides with an earlier one of another owner is reported
once, at the later key, naming where the earlier one is. A service listing one
address twice is caught while reading its table (`services.read_listen`).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.config.addresses import collide, host_port
from agent.config.model import AgentSettings
from agent.config.table import Problems
from agent.config.values import Invalid
from agent.config.wording import show

AGENT_ADDRESSES = ("control_address", "probe_address", "metrics_address")


@dataclass(frozen=True)
class Bound:
    """Something that takes an address: a service listener or an agent listener."""

    file: str
    key: str
    owner: str  #: "service api" / "agent"
    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""


def agent_listeners(agent: AgentSettings, file: str) -> list[Bound]:
    """What the agent itself binds, as configured in `file` (the main file)."""
    bound = [Bound(file, "agent.control_socket", "agent", "unix", path=agent.control_socket)]
    for key in AGENT_ADDRESSES:
        address: str | None = getattr(agent, key)
        if address is not None:
            parsed = host_port(address)
            assert not isinstance(parsed, Invalid) and parsed[1] is not None
            bound.append(Bound(file, f"agent.{key}", f"agent {key}", "tcp", parsed[0], parsed[1]))
    return bound


def check_collisions(bound: list[Bound], problems: Problems) -> None:
    """Two listeners on one port (overlapping hosts) or one unix path: reported once."""
    for i, later in enumerate(bound):
        for earlier in bound[:i]:
            if later.owner == earlier.owner or not collide(later, earlier):
                continue
            what = show(later.path) if later.scheme == "unix" else f"port {later.port}"
            where = (
                earlier.key if earlier.file == later.file else f"{earlier.key} in {earlier.file}"
            )
            problems.add(
                later.file, later.key, f"{what} is already used by {earlier.owner} ({where})"
            )
            break
