"""AgentCore: the one object behind the control API.

Everything `svctl` can do is a method here; the gRPC servicer (agent/api.py) only
converts messages and maps the errors of agent/errors.py to status codes, so tests can
drive the agent through this object directly.

Invariants:
- `self._applied` is the config that is actually running: after a partly failed reload
  it holds the new spec only for the services whose change succeeded, so the next plan
  is computed against reality, not against the file.
- A broken config file changes nothing (ConfigRejected is raised before any action).
- Actions on one service are serialized by the supervisor's per-service lock; config
  reloads are serialized here by `_reload_lock`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from agent import __version__
from agent.config import (
    MAX_WORKERS,
    Config,
    ConfigError,
    ReloadPlan,
    config_from_data,
    config_to_data,
    load_config,
    plan,
)
from agent.errors import ActionFailed, ConfigRejected, InvalidRequest, UnknownService
from supervisor.errors import ReloadFailed
from supervisor.events import Event, EventBus, Subscription
from supervisor.spec import ServiceSpec
from supervisor.states import ServiceState
from supervisor.status import LogLine, ServiceStatus

if TYPE_CHECKING:
    from supervisor.service import Service
    from supervisor.supervisor import Supervisor

log = logging.getLogger("svcd")

#: How many applied configs the agent keeps for `svctl reload --previous`.
HISTORY_KEEP = 10
#: `svctl start/restart` wait up to a service's ready_timeout plus this: a worker that
#: crashes at once goes through its backoff to fatal in a few seconds.
START_WAIT_MARGIN = 10.0
#: The loop counts as unresponsive (liveness fails) when a tick is this late.
LIVENESS_MAX_LAG = 5.0
#: How often the loop-lag monitor ticks.
LAG_TICK = 0.5


@dataclass(frozen=True)
class AgentInfo:
    name: str
    version: str
    pid: int
    uptime_s: float
    registry: str  # connected | disconnected | disabled


@dataclass(frozen=True)
class AgentStatus:
    agent: AgentInfo
    services: list[ServiceStatus]


@dataclass(frozen=True)
class ReloadOutcome:
    ok: bool
    message: str
    plan: list[str]


@dataclass(frozen=True)
class RegistryInfo:
    endpoints: list[str]
    prefix: str
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    username: str | None = None
    password: str | None = None


class RegistryLike:
    """What the core needs of agent.registry.Registry (kept tiny for tests)."""

    state: str

    def publish(self, services: list[ServiceStatus]) -> None: ...


class AgentCore:
    """Owns the running config and the supervisor; answers every control request."""

    def __init__(
        self,
        config: Config,
        supervisor: Supervisor,
        events: EventBus,
        *,
        registry: RegistryLike | None = None,
        registry_endpoints: list[str] | None = None,
    ) -> None:
        self.config = config
        self.supervisor = supervisor
        self.events = events
        self.registry = registry
        self._registry_endpoints = registry_endpoints or (
            list(config.registry.endpoints) if config.registry else []
        )
        self._applied: Config = config
        self._previous: Config | None = None
        self._reload_lock = asyncio.Lock()
        self._reloads: dict[str, int] = {}
        self._reload_failures: dict[str, int] = {}
        self._started = time.monotonic()
        self._last_tick = time.monotonic()
        self.loop_lag = 0.0
        self.shutting_down = False
        #: Called with True before and False after every reload that changes something
        #: (the daemon tells systemd RELOADING=1 ... READY=1 through it).
        self.on_reloading: Callable[[bool], None] = lambda _active: None
        self.name = config.agent.name
        self.version = __version__
        self.pid = os.getpid()

    # ----------------------------------------------------------------- lifecycle

    async def start_services(self) -> None:
        """Start every configured service (listeners bound, workers spawned).

        A service whose listeners cannot be bound is reported and skipped; the others
        run. Raises nothing for worker trouble: that is what supervision is for.
        """
        for spec in self.config.services.values():
            try:
                await self.supervisor.add_service(spec)
            except Exception as exc:
                log.error("service %s could not start: %s", spec.name, exc)
                self.events.emit("fatal", service=spec.name, message=str(exc))
        self._record_history("started")

    async def wait_ready(self) -> None:
        """Return once every service is ready; bound it with `asyncio.timeout`.

        Readiness only changes with an event (ready, exited, ...), so it is re-checked
        after each one instead of polling.
        """
        sub = self.events.subscribe()
        try:
            while not self.all_ready():
                await sub.get()
        finally:
            sub.close()

    async def run_lag_monitor(self) -> None:
        """Tick forever, recording how late each tick was (the liveness signal)."""
        while True:
            before = time.monotonic()
            await asyncio.sleep(LAG_TICK)
            now = time.monotonic()
            self.loop_lag = max(0.0, now - before - LAG_TICK)
            self._last_tick = now

    async def run_registry_feed(self) -> None:
        """Publish the desired registry state after every event (the registry coalesces)."""
        if self.registry is None:
            return
        sub = self.events.subscribe()
        self.registry.publish(self.supervisor.status())
        try:
            async for _event in sub:
                self.registry.publish(self.supervisor.status())
        finally:
            sub.close()

    # ----------------------------------------------------------------- queries

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self._started

    @property
    def registry_state(self) -> str:
        return "disabled" if self.registry is None else self.registry.state

    @property
    def reloads(self) -> Mapping[str, int]:
        return self._reloads

    @property
    def reload_failures(self) -> Mapping[str, int]:
        return self._reload_failures

    def _service(self, name: str) -> Service:
        try:
            return self.supervisor.services[name]
        except KeyError:
            raise UnknownService(f"no service named {name!r}") from None

    def status(self, service: str | None = None) -> AgentStatus:
        """The agent and its services (one service when named). Raises UnknownService."""
        services = self.supervisor.status()
        if service is not None:
            self._service(service)
            services = [s for s in services if s.name == service]
        info = AgentInfo(
            name=self.name,
            version=self.version,
            pid=self.pid,
            uptime_s=round(self.uptime_s, 3),
            registry=self.registry_state,
        )
        return AgentStatus(agent=info, services=services)

    def is_live(self) -> bool:
        """The agent's loop is responsive: never "all workers healthy" (see docs/health.md)."""
        return time.monotonic() - self._last_tick < LIVENESS_MAX_LAG + LAG_TICK

    def service_ready(self, status: ServiceStatus) -> bool:
        return status.state != ServiceState.STOPPED and status.ready >= max(
            status.required_ready, 1 if status.desired else 0
        )

    def all_ready(self) -> bool:
        return not self.shutting_down and all(
            self.service_ready(s) for s in self.supervisor.status()
        )

    def probe(self, kind: Literal["live", "ready"], service: str | None = None) -> tuple[bool, str]:
        """Answer `svctl probe`: (ok, reason). Raises UnknownService for a SERVICE not
        configured, live or ready: `live SERVICE` is the agent's liveness, and no for
        a service that has given up (fatal)."""
        if kind == "live":
            if not self.is_live():
                return False, "loop stalled"
            if service is not None:
                (svc,) = self.status(service).services
                if svc.state == ServiceState.FATAL:
                    return False, f"{service}: fatal (gave up restarting)"
            return True, "loop responsive"
        if self.shutting_down:
            return False, "agent is shutting down"
        statuses = self.status(service).services
        not_ready = [s for s in statuses if not self.service_ready(s)]
        if not not_ready:
            return True, "ready"
        return False, "; ".join(
            f"{s.name}: {s.ready}/{s.required_ready} ready ({s.state})" for s in not_ready
        )

    def health_targets(self) -> dict[str, bool]:
        """grpc.health.v1 service name -> serving."""
        live = self.is_live()
        statuses = self.supervisor.status()
        targets = {"": live, "liveness": live}
        ready_all = not self.shutting_down
        for s in statuses:
            ok = not self.shutting_down and self.service_ready(s)
            targets[s.name] = ok
            ready_all = ready_all and ok
        targets["readiness"] = ready_all
        return targets

    def registry_info(self) -> RegistryInfo | None:
        reg = self.config.registry
        if reg is None:
            return None
        return RegistryInfo(
            endpoints=list(self._registry_endpoints),
            prefix=reg.prefix,
            ca_cert=reg.ca_cert,
            cert=reg.cert,
            key=reg.key,
            username=reg.username,
            password=reg.password,
        )

    # ----------------------------------------------------------------- logs/events

    def logs_tail(self, service: str, n: int, worker: int | None = None) -> list[LogLine]:
        return list(self._service(service).logs.tail(n, worker=worker))

    def logs_follow(self, service: str, worker: int | None = None) -> AsyncIterator[LogLine]:
        it: AsyncIterator[LogLine] = self._service(service).logs.follow(worker=worker)
        return it

    def events_history(self) -> list[Event]:
        return self.events.history()

    def events_subscribe(self, replay: bool = False) -> Subscription:
        return self.events.subscribe(replay=self.events.history() if replay else ())

    # ----------------------------------------------------------------- actions

    async def start(self, service: str, *, wait: bool = True) -> str:
        """Start a stopped service; with `wait`, until it is ready (see `_until_ready`)."""
        await self._service(service).start()
        return await self._until_ready(service, "started") if wait else f"{service}: starting"

    async def stop(self, service: str) -> None:
        await self._service(service).stop()

    async def restart(self, service: str, *, wait: bool = True) -> str:
        """Stop every worker, then start them; with `wait`, until the service is ready."""
        await self._service(service).restart()
        return await self._until_ready(service, "restarted") if wait else f"{service}: starting"

    async def _until_ready(
        self, service: str, done: str, sub: Subscription | None = None
    ) -> str:
        """Wait until `service` is ready, like `systemctl start` of a notify unit.

        Raises ActionFailed when one of its workers gives up (a `fatal` event after the
        start: a slot that was FATAL before is retried, not judged by its old state),
        when it is stopped meanwhile, or when it is not ready within its ready_timeout
        plus the time a backoff takes. Readiness only changes with an event, so it is
        re-checked after each one. `sub`, taken before the action began, sees the events
        of the action itself (it is closed here).
        """
        bound = self._service(service).spec.ready_timeout + START_WAIT_MARGIN
        sub = sub or self.events.subscribe()
        try:
            async with asyncio.timeout(bound):
                status = self._service(service).status()
                while not self.service_ready(status):
                    if status.state == ServiceState.STOPPED:
                        raise ActionFailed(f"{service}: stopped while starting")
                    event = await sub.get()
                    status = self._service(service).status()
                    if event.type == "fatal" and event.service == service:
                        raise ActionFailed(
                            f"{service}: gave up (fatal), {status.ready}/{status.desired} "
                            f"ready" + _last_exit(status)
                        )
                return f"{service}: {done} ({status.ready}/{status.desired} ready)"
        except TimeoutError:
            status = self._service(service).status()
            raise ActionFailed(
                f"{service}: not ready within {bound:g}s, {status.ready}/"
                f"{status.required_ready} ready ({status.state})" + _last_exit(status)
            ) from None
        finally:
            sub.close()

    async def scale(self, service: str, count: int) -> None:
        if not 0 <= count <= MAX_WORKERS:  # the config's bound: no fork bomb by svctl
            raise InvalidRequest(f"count must be in 0..{MAX_WORKERS}, got {count}")
        svc = self._service(service)
        await svc.scale(count)
        spec = dataclasses.replace(self._applied.services[service], count=count)
        self._set_applied_service(spec)

    async def reload(
        self,
        service: str | None = None,
        *,
        dry_run: bool = False,
        previous: bool = False,
        wait: bool = True,
        progress: Callable[[str], None] | None = None,
    ) -> ReloadOutcome:
        """Rolling reload of one service, or re-read the config file and apply the plan.

        Raises ConfigRejected when the file is broken (nothing changed), UnknownService.
        A failed rollout is rolled back by the supervisor and reported as ok=False.
        With wait=False the work continues in the background and the plan is returned.
        """
        if service is not None and not previous:
            svc = self._service(service)
            if svc.status().state == ServiceState.STOPPED:
                # like `systemctl reload` of an inactive unit: nothing runs to be renewed
                raise ActionFailed(f"{service} is stopped: nothing to reload (start it)")
            if dry_run:
                return ReloadOutcome(True, "dry run", [f"~ {service}: rolling reload (requested)"])
            job = self._reload_one(svc.name, progress)
        else:
            new = self._read_previous() if previous else self._read_config_file(dry_run)
            the_plan = plan(self._applied, new)
            lines = the_plan.lines()
            if dry_run:
                return ReloadOutcome(True, "dry run: nothing changed", lines)
            job = self._apply(new, the_plan, progress)
        job = self._announced(job)
        if not wait:
            task = asyncio.ensure_future(job)
            task.add_done_callback(_log_background_failure)
            return ReloadOutcome(True, "reload started", [])
        return await job

    async def _announced(self, job: Awaitable[ReloadOutcome]) -> ReloadOutcome:
        self.on_reloading(True)
        try:
            return await job
        finally:
            self.on_reloading(False)

    async def _reload_one(
        self, name: str, progress: Callable[[str], None] | None
    ) -> ReloadOutcome:
        svc = self._service(name)
        try:
            await svc.reload(progress=progress)
        except ReloadFailed as exc:
            self._reload_failures[name] = self._reload_failures.get(name, 0) + 1
            return ReloadOutcome(False, f"{name}: rolled back: {exc.reason}", [])
        self._reloads[name] = self._reloads.get(name, 0) + 1
        return ReloadOutcome(True, f"{name}: reloaded (generation {svc.status().generation})", [])

    def _read_config_file(self, dry_run: bool = False) -> Config:
        try:
            return load_config(self.config.path)
        except ConfigError as exc:
            problems = [str(p) for p in exc.problems]
            if not dry_run:  # a dry run is a question: it leaves no trace in the events
                self.events.emit("config_rejected", message="; ".join(problems))
            raise ConfigRejected(problems) from None

    def _read_previous(self) -> Config:
        if self._previous is None:
            raise ActionFailed("no previous config to go back to")
        return self._previous

    async def _apply(
        self, new: Config, the_plan: ReloadPlan, progress: Callable[[str], None] | None
    ) -> ReloadOutcome:
        async with self._reload_lock:
            say = progress or (lambda _line: None)
            failures: list[str] = []
            before = self._applied
            # like `svctl start`, a reload is done when what it started is ready: added
            # services and live count increases (rollouts wait for readiness themselves)
            grown = [
                name for name in (p.name for p in the_plan.live)
                if new.services[name].count > before.services[name].count
                and self._service(name).status().state != ServiceState.STOPPED
            ]
            watches = {name: self.events.subscribe() for name in (*the_plan.added, *grown)}
            try:
                failures.extend(await self._apply_steps(new, the_plan, say))
                failures.extend(await self._until_all_ready(watches, say))
            finally:
                for sub in watches.values():
                    sub.close()
            self._applied = dataclasses.replace(
                new, services=dict(self._applied.services)
            )
            self.config = dataclasses.replace(self.config, services=self._applied.services)
            outcome = "ok" if not failures else "failed: " + "; ".join(failures)
            if self._applied.services != before.services:
                self._previous = before
            self._record_history(outcome)
            self.events.emit(
                "config_applied",
                message=outcome,
                fields={"plan": the_plan.lines()},
            )
            if failures:
                return ReloadOutcome(False, "; ".join(failures), the_plan.lines())
            return ReloadOutcome(True, "applied", the_plan.lines())

    async def _apply_steps(
        self, new: Config, the_plan: ReloadPlan, say: Callable[[str], None]
    ) -> list[str]:
        """Remove, add, then change services as `the_plan` says; what failed."""
        failures: list[str] = []
        for name in the_plan.removed:
            say(f"- {name}: stopping")
            await self.supervisor.remove_service(name)
            self._drop_applied_service(name)
        for name in the_plan.added:
            say(f"+ {name}: starting")
            try:
                await self.supervisor.add_service(new.services[name])
                self._set_applied_service(new.services[name])
            except Exception as exc:
                failures.append(f"{name}: {exc}")
        rollout = {p.name for p in the_plan.rollout}
        for name in [p.name for p in (*the_plan.live, *the_plan.rollout)]:
            say(f"~ {name}: applying")
            try:
                await self.supervisor.update_service(new.services[name])
            except ReloadFailed as exc:
                self._reload_failures[name] = self._reload_failures.get(name, 0) + 1
                failures.append(f"{name}: rolled back: {exc.reason}")
                continue
            except Exception as exc:
                failures.append(f"{name}: {exc}")
                continue
            if name in rollout:
                self._reloads[name] = self._reloads.get(name, 0) + 1
            self._set_applied_service(new.services[name])
        return failures

    async def _until_all_ready(
        self, watches: Mapping[str, Subscription], say: Callable[[str], None]
    ) -> list[str]:
        """Wait (in parallel) until every watched service that runs is ready; the
        reasons of those that are not. Every subscription is closed."""

        async def one(name: str, sub: Subscription) -> str:
            if name not in self.supervisor.services:
                sub.close()  # it could not be added: already a failure
                return ""
            try:
                line = await self._until_ready(name, "ready", sub)
            except ActionFailed as exc:
                return str(exc)
            say(f"  {line}")
            return ""

        reasons = await asyncio.gather(*(one(n, sub) for n, sub in watches.items()))
        return [r for r in reasons if r]

    def _set_applied_service(self, spec: ServiceSpec) -> None:
        services = dict(self._applied.services)
        services[spec.name] = spec
        self._applied = dataclasses.replace(self._applied, services=services)

    def _drop_applied_service(self, name: str) -> None:
        services = dict(self._applied.services)
        services.pop(name, None)
        self._applied = dataclasses.replace(self._applied, services=services)

    # ----------------------------------------------------------------- history

    def _history_dir(self) -> Path:
        return Path(self.config.agent.state_dir) / "configs"

    def _record_history(self, outcome: str) -> None:
        """Keep the applied config with time and outcome (bounded; never raises).

        The entry holds the config that runs (`config_to_data`), not the file's text:
        after a partly failed reload the two differ, and includes change on disk.
        """
        try:
            directory = self._history_dir()
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{time.time_ns() % 10**9:09d}"
            entry = {
                "time": time.time(),
                "path": self._applied.path,
                "outcome": outcome,
                "services": sorted(self._applied.services),
                "config": config_to_data(self._applied),
            }
            (directory / f"{stamp}.json").write_text(json.dumps(entry))
            for old in sorted(directory.glob("*.json"))[:-HISTORY_KEEP]:
                old.unlink(missing_ok=True)
                old.with_suffix(".toml").unlink(missing_ok=True)  # the layout before 0.1.0
        except OSError as exc:
            log.warning("could not record config history: %s", exc)

    def load_previous_from_history(self) -> None:
        """At start-up, remember the last config that ran before this one (for --previous):
        the newest entry whose services differ from the ones starting now.

        Only configs applied from this agent's own config file count: root's default
        state dir is shared by every agent on the host.
        """
        try:
            entries = sorted(self._history_dir().glob("*.json"))
        except OSError:
            return
        for entry in reversed(entries):
            try:
                about = json.loads(entry.read_text())
                if not isinstance(about, dict) or about.get("path") != self.config.path:
                    continue
                config = config_from_data(about.get("config"))
            except (OSError, ValueError) as exc:
                log.debug("config history: skipping %s: %s", entry.name, exc)
                continue
            if config.services != self._applied.services:
                self._previous = config
                return


def _last_exit(status: ServiceStatus) -> str:
    """`; last exit: <how>` of a worker that ended, for a failed start's message."""
    for w in status.workers:
        if w.last_exit_reason or w.last_exit:
            return f"; last exit: {w.last_exit_reason or w.last_exit}"
    return ""


def _log_background_failure(task: asyncio.Future[ReloadOutcome]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("background reload failed: %s", exc)
    elif not task.result().ok:
        log.error("background reload failed: %s", task.result().message)
