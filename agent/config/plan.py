"""Reload plans: what applying a new config on top of the running one does.

`plan(old, new)` sorts services into added, removed, rolled (new processes: a field of
`supervisor.spec.ROLLOUT_FIELDS` changed), changed live and unchanged, and lists the
`[agent]`/`[registry]` settings that only an agent restart applies.

Invariants: a plan is a pure function of the two configs; it never prints a secret
(the registry password, env values): a changed secret shows only as "changed", with
the names of the env variables that changed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from agent.config.model import Config, RegistrySettings
from agent.config.wording import show
from supervisor.spec import ROLLOUT_FIELDS, ListenSpec

#: keys whose values are never printed (plans go to logs and terminals)
SECRET_KEYS = frozenset({"registry.password", "env"})
#: settings whose values are too long for a plan line: only "changed" is shown
LONG_VALUES = ("command", "cwd", "env_file", "rlimits")


@dataclass(frozen=True)
class Change:
    """One changed setting: dotted `key`, old and new values as text, and a summary."""

    key: str
    old: str
    new: str
    summary: str

    def as_dict(self) -> dict[str, str]:
        return {"key": self.key, "old": self.old, "new": self.new, "summary": self.summary}


@dataclass(frozen=True)
class ServicePlan:
    """What changes in one service."""

    name: str
    changes: tuple[Change, ...]

    @property
    def summary(self) -> str:
        return ", ".join(c.summary for c in self.changes)

    def as_dict(self) -> dict[str, Any]:
        return {"service": self.name, "changes": [c.as_dict() for c in self.changes]}


@dataclass(frozen=True)
class ReloadPlan:
    """What applying `config` on top of the running config does.

    `rollout`: new processes (ServiceSpec.needs_rollout); `live`: applied to running
    workers; `agent_changes`: [agent]/[registry] settings that only an agent restart
    applies (a reload leaves them as they were).
    """

    config: Config
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    rollout: tuple[ServicePlan, ...] = ()
    live: tuple[ServicePlan, ...] = ()
    unchanged: tuple[str, ...] = ()
    agent_changes: tuple[Change, ...] = ()

    @property
    def empty(self) -> bool:
        """Nothing to do for the services (agent changes do not count: a reload skips them)."""
        return not (self.added or self.removed or self.rollout or self.live)

    def lines(self) -> list[str]:
        out: list[str] = []
        for name in self.added:
            count = self.config.services[name].count
            out.append(f"+ {name} (new, {count} worker{'s' if count != 1 else ''})")
        out.extend(f"- {name}" for name in self.removed)
        out.extend(f"~ {p.name}: rolling reload ({p.summary})" for p in self.rollout)
        out.extend(f"~ {p.name}: live ({p.summary})" for p in self.live)
        out.extend(f"= {name} unchanged" for name in self.unchanged)
        out.extend(f"! {c.summary} (needs an agent restart)" for c in self.agent_changes)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "added": [{"service": n, "count": self.config.services[n].count} for n in self.added],
            "removed": list(self.removed),
            "rollout": [p.as_dict() for p in self.rollout],
            "live": [p.as_dict() for p in self.live],
            "unchanged": list(self.unchanged),
            "agent_changes": [c.as_dict() for c in self.agent_changes],
        }


def plan(old: Config | None, new: Config) -> ReloadPlan:
    """What a reload from `old` (None: nothing running yet) to `new` does."""
    if old is None:
        return ReloadPlan(config=new, added=tuple(new.services))
    added = tuple(n for n in new.services if n not in old.services)
    removed = tuple(n for n in old.services if n not in new.services)
    rollout: list[ServicePlan] = []
    live: list[ServicePlan] = []
    unchanged: list[str] = []
    for name, spec in new.services.items():
        before = old.services.get(name)
        if before is None:
            continue
        if before == spec:
            unchanged.append(name)
            continue
        changes = tuple(_diff("", before, spec, rollout_fields=ROLLOUT_FIELDS))
        (rollout if before.needs_rollout(spec) else live).append(ServicePlan(name, changes))
    agent = _diff("agent.", old.agent, new.agent)
    if old.registry is None or new.registry is None:
        if old.registry != new.registry:
            before_text, after_text = _registry_text(old.registry), _registry_text(new.registry)
            agent.append(
                Change(
                    "registry", before_text, after_text, f"registry {before_text} -> {after_text}"
                )
            )
    else:
        # deregister_delay is only the default of each service's own: it shows there, live
        agent.extend(
            c
            for c in _diff("registry.", old.registry, new.registry)
            if c.key != "registry.deregister_delay"
        )
    return ReloadPlan(
        config=new,
        added=added,
        removed=removed,
        rollout=tuple(rollout),
        live=tuple(live),
        unchanged=tuple(unchanged),
        agent_changes=tuple(agent),
    )


def _diff(
    prefix: str, old: object, new: object, *, rollout_fields: Iterable[str] = ()
) -> list[Change]:
    """The changed fields of two dataclasses of one type, nested ones key by key."""
    rolled = set(rollout_fields)
    out: list[Change] = []
    for f in fields(old):  # type: ignore[arg-type]
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        key = f"{prefix}{f.name}"
        if is_dataclass(a) and is_dataclass(b) and not isinstance(a, type):
            out.extend(_diff(f"{key}.", a, b))
        else:
            out.append(_change(key, a, b, rollout=f.name in rolled))
    return out


def _change(key: str, old: object, new: object, *, rollout: bool) -> Change:
    name = key.rsplit(".", 1)[-1]
    if key in SECRET_KEYS or name in SECRET_KEYS:
        detail = ""
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            names = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
            detail = f" ({', '.join(names)})"
        return Change(key, "", "", f"{key} changed{detail}")
    if key.endswith("listen") and isinstance(old, tuple) and isinstance(new, tuple):
        old_urls, new_urls = [s.url for s in old], [s.url for s in new]
        moved = [f"+{u}" for u in new_urls if u not in old_urls]
        moved += [f"-{u}" for u in old_urls if u not in new_urls]
        detail = ", ".join(moved) or "backlog or order"
        return Change(key, _text(old), _text(new), f"{key} changed ({detail})")
    if name == "umask" or name.endswith("_mode"):
        old_mode, new_mode = (_mode_text(v) for v in (old, new))
        return Change(key, old_mode, new_mode, f"{key} {old_mode} -> {new_mode}")
    if rollout and name in LONG_VALUES:
        return Change(key, _text(old), _text(new), f"{key} changed")
    return Change(key, _text(old), _text(new), f"{key} {_text(old)} -> {_text(new)}")


def _text(value: object) -> str:
    """A setting's value for a plan line."""
    if value is None:
        return "unset"
    if isinstance(value, ListenSpec):
        return value.url
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_text(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return show(value) if isinstance(value, (bool, float)) else str(value)


def _mode_text(value: object) -> str:
    return f"{value:#05o}" if isinstance(value, int) else _text(value)


def _registry_text(registry: RegistrySettings | None) -> str:
    if registry is None:
        return "none"
    if registry.embedded:
        return '"embedded"'
    return _text(registry.endpoints)
