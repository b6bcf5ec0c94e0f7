"""The `[services.NAME]` tables, from the main file and every include -> ServiceSpecs.

Invariants:
- A service name is unique across all files, fits etcd keys, fd names and metric
  labels, and is not a name the agent answers health checks for itself.
- A service with any problem yields no spec, but all of its problems are reported, and
  its valid listeners still take part in the collision check (crosschecks), so one run
  of check-config shows everything.
- Checks between keys of one service run only when the keys involved were fine.
"""

from __future__ import annotations

import re
from types import MappingProxyType

from agent.config import addresses, values
from agent.config.crosschecks import Bound
from agent.config.service_parts import (
    read_backoff,
    read_health,
    read_logs,
    read_service_registry,
)
from agent.config.table import MISSING, Table
from agent.config.values import RLIMITS, Invalid
from agent.config.wording import got, key_part, show
from supervisor.spec import HealthSpec, ListenSpec, ReadyMode, RestartPolicy, ServiceSpec

MAX_WORKERS = 1024  #: per service; a typo such as count = 10000 must not fork-bomb the host
MAX_NAME = 63  #: service name length (it appears in etcd keys, fd names, metrics labels)
MIN_MAX_MEMORY = 1024 * 1024  #: below 1 MiB no process runs: "512" surely meant "512MiB"
MAX_BACKLOG = 65535
SERVICE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
#: grpc.health.v1 service names the agent answers itself, and the private fd name
RESERVED_SERVICE_NAMES = frozenset({"liveness", "readiness", "svcd-health"})

RESTART: dict[str, RestartPolicy] = {
    "always": "always",
    "on-failure": "on-failure",
    "never": "never",
}
READY: dict[str, ReadyMode] = {"notify": "notify", "health": "health", "started": "started"}


def read_services(
    tables: list[Table], default_deregister_delay: float
) -> tuple[dict[str, ServiceSpec], list[Bound]]:
    """Every service of the `[services]` tables (main file first), and their listeners."""
    services: dict[str, ServiceSpec] = {}
    defined_in: dict[str, str] = {}
    bound: list[Bound] = []
    for table in tables:
        for name in list(table.data):
            table.seen.add(name)
            if len(name) > MAX_NAME or not SERVICE_NAME_RE.fullmatch(name):
                table.problem(
                    name,
                    "a service name is lowercase letters, digits, '_' and '-', "
                    f"starting with a letter or digit, at most {MAX_NAME} long",
                )
                continue
            if name in RESERVED_SERVICE_NAMES:
                table.problem(name, f"{show(name)} is reserved by svcd (a health service name)")
                continue
            if name in defined_in:
                table.problem(
                    name, f"service {show(name)} is already defined in {defined_in[name]}"
                )
                continue
            defined_in[name] = table.file
            service_table = table.sub(name)
            if service_table is None:
                continue
            spec, listeners = read_service(service_table, name, default_deregister_delay)
            if spec is not None:
                services[name] = spec
            bound.extend(
                Bound(
                    table.file,
                    f"{table.key(name)}.listen[{i}]",
                    f"service {name}",
                    listener.scheme,
                    listener.host,
                    listener.port,
                    listener.path,
                )
                for i, listener in listeners
            )
    return services, bound


def read_service(
    t: Table, name: str, default_deregister_delay: float
) -> tuple[ServiceSpec | None, list[tuple[int, ListenSpec]]]:
    """One `[services.NAME]` table: its spec, or None when it had problems (all reported),
    and its valid listeners with their index in `listen` (checked for collisions even
    when the service has other problems, so that every problem is reported at once)."""
    problems_before = len(t.problems.items)
    command = t.argv("command")
    if command is None and not t.has("command"):
        t.problem("command", 'is required (an array like ["python", "-m", "app"])')
    count = t.integer("count", 1, minimum=1, maximum=MAX_WORKERS)
    cwd = t.directory("cwd")
    user = _user_or_group(t, "user", user=True)
    group = _user_or_group(t, "group", user=False)
    env = t.string_table("env", env=True)
    env_file = t.readable_file("env_file")
    stop_signal = t.get("stop_signal", "SIGTERM", values.signal_name)
    indexed_listen = read_listen(t)
    listen = tuple(spec for _, spec in indexed_listen)
    restart: RestartPolicy = t.choice("restart", RESTART, "always")
    ready: ReadyMode = t.choice("ready", READY, "notify")
    ready_timeout = t.duration("ready_timeout", ServiceSpec.ready_timeout)
    graceful_timeout = t.duration("graceful_timeout", ServiceSpec.graceful_timeout)
    max_memory = t.size("max_memory", None, minimum=MIN_MAX_MEMORY)
    watchdog = t.duration("watchdog", None)
    max_surge = t.integer("max_surge", ServiceSpec.max_surge, minimum=0, maximum=MAX_WORKERS)
    max_unavailable = t.integer(
        "max_unavailable", ServiceSpec.max_unavailable, minimum=0, maximum=MAX_WORKERS
    )
    min_ready = t.integer("min_ready", None, minimum=0, maximum=MAX_WORKERS)
    umask = t.mode("umask", None)
    rlimits = t.open_table("rlimits", values.rlimit, vocabulary=RLIMITS)
    preload = t.boolean("preload", ServiceSpec.preload)
    health = read_health(t.sub("health"))
    backoff = read_backoff(t.sub("backoff"))
    logs = read_logs(t.sub("logs"))
    advertise, deregister_delay, meta = read_service_registry(
        t.sub("registry"), default_deregister_delay, listen
    )
    t.finish()
    _check_between_keys(
        t,
        name,
        ready=ready,
        ready_timeout=ready_timeout,
        health=health,
        count=count,
        min_ready=min_ready,
        max_surge=max_surge,
        max_unavailable=max_unavailable,
    )
    if len(t.problems.items) > problems_before or command is None or health is None:
        return None, indexed_listen
    spec = ServiceSpec(
        name=name,
        command=command,
        count=count,
        cwd=cwd,
        user=user,
        group=group,
        env=env if env is not None else MappingProxyType({}),
        env_file=env_file,
        stop_signal=stop_signal,
        listen=listen,
        restart=restart,
        ready=ready,
        ready_timeout=ready_timeout,
        graceful_timeout=graceful_timeout,
        max_memory=max_memory,
        watchdog=watchdog,
        health=health,
        backoff=backoff,
        logs=logs,
        max_surge=max_surge,
        max_unavailable=max_unavailable,
        min_ready=min_ready,
        umask=umask,
        rlimits=rlimits,
        preload=preload,
        advertise=advertise,
        deregister_delay=deregister_delay,
        meta=meta,
    )
    return spec, indexed_listen


def _check_between_keys(
    t: Table,
    name: str,
    *,
    ready: ReadyMode,
    ready_timeout: float,
    health: HealthSpec | None,
    count: int,
    min_ready: int | None,
    max_surge: int,
    max_unavailable: int,
) -> None:
    """Settings of one service that are fine alone but not together (each check only
    when the keys involved were themselves fine)."""
    if ready == "health" and health is not None and health.kind == "none" and t.ok("ready"):
        t.problem(
            "ready", f'"health" needs a health check: set [services.{key_part(name)}.health] kind'
        )
    if (
        ready == "health"
        and health is not None
        and health.kind != "none"
        and ready_timeout <= health.interval
        and t.ok("ready_timeout")
    ):
        t.problem(
            "ready_timeout",
            f"must be longer than health.interval ({health.interval:g} s), got {ready_timeout:g}",
        )
    if max_surge == 0 and max_unavailable == 0 and t.ok("max_surge", "max_unavailable"):
        t.problem(
            "max_surge",
            "max_surge and max_unavailable cannot both be 0: a rolling "
            "reload could never replace a worker",
        )
    if min_ready is not None and min_ready > count and t.ok("count", "min_ready"):
        t.problem("min_ready", f"must be <= count ({count}), got {min_ready}")


def _user_or_group(t: Table, name: str, *, user: bool) -> str | None:
    """The name as written (or the numeric id as text), once it is known to resolve."""
    value = t.raw(name)
    if value is MISSING:
        return None
    checked = t.user_id(name, value) if user else t.group_id(name, value)
    if checked is None:
        return None
    return value if isinstance(value, str) else str(checked)


def read_listen(t: Table) -> list[tuple[int, ListenSpec]]:
    """The valid entries of `listen` with their index: URLs, or tables with a backlog."""
    value = t.raw("listen")
    if value is MISSING:
        return []
    entries = [value] if isinstance(value, (str, dict)) else value
    if not isinstance(entries, list):
        t.problem("listen", f'must be an array of URLs like "tcp://0.0.0.0:8080", got {got(value)}')
        return []
    specs: list[tuple[int, ListenSpec]] = []
    for i, entry in enumerate(entries):
        key = f"listen[{i}]"
        backlog = ListenSpec.backlog
        if isinstance(entry, dict):
            # the table form: { url = "tcp://...", backlog = 4096 }
            sub = Table(t.problems, t.file, t.key(key), entry, t.base_dir)
            url = sub.string("url", None)
            backlog = sub.integer("backlog", backlog, minimum=1, maximum=MAX_BACKLOG)
            if url is None and not sub.has("url"):
                sub.problem("url", 'is required (like "tcp://0.0.0.0:8080")')
            sub.finish()
            if sub.bad or url is None:
                t.bad.add("listen")
                continue
        else:
            checked = t.accept(key, values.text(entry, 'a URL like "tcp://0.0.0.0:8080"'), None)
            if checked is None:
                t.bad.add("listen")
                continue
            url = checked
        parsed = addresses.listen_url(url, t.base_dir, backlog)
        if isinstance(parsed, Invalid):
            t.problem(key, parsed.reason)
            t.bad.add("listen")
            continue
        if any(addresses.collide(parsed, other) for _, other in specs):
            t.problem(key, f"{show(url)} is listed twice")
            continue
        specs.append((i, parsed))
    return specs
