"""The svcd daemon: wires the core, the control and probe servers, the registry and the
metrics into one event loop, and turns signals into actions.

Order matters and is the point of this module:
- start-up: the control server first (it takes the single-instance lock, so a second
  agent fails before it touches any port), then the embedded etcd if any, then the
  services, then READY=1 to systemd once every service is ready (or the start timeout
  passed: a crash-looping service must not keep the agent from serving its API);
- shutdown (SIGTERM/SIGINT): readiness turns off first (probes and the registry see
  it), the agent keeps serving `drain_delay` seconds so load balancers catch up, then
  every service drains in parallel, then the registry revokes its lease, then the
  servers stop.

Signal handlers only set flags or queue work; the loop does the work (gunicorn's rule).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from agent.config import Config, ConfigError, load_config
from agent.core import AgentCore
from supervisor.events import Event, EventBus

log = logging.getLogger("svcd")

#: How long start-up waits for every service to be ready before saying READY=1 anyway.
START_READY_TIMEOUT = 60.0
#: Bound on the whole shutdown after the services have drained (registry, servers).
SHUTDOWN_TAIL_TIMEOUT = 10.0


def run(config_path: str) -> int:
    """Run the agent until SIGTERM/SIGINT; returns the process exit code."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    setup_logging(config.agent.log_format)
    # 0711: workers running as other users must reach their notify socket inside it;
    # everything else below it is created private.
    Path(config.agent.state_dir).mkdir(parents=True, exist_ok=True, mode=0o711)
    # The stock asyncio loop, not uvloop: the supervisor's reaper owns SIGCHLD, which
    # uvloop reserves for itself; the agent's loop is not on any request path.
    from agent.control import ControlSocketError
    from agent.embedded_etcd import EmbeddedEtcdError

    try:
        return asyncio.run(Daemon(config).run())
    except (ControlSocketError, EmbeddedEtcdError) as exc:
        # start-up refusals the operator must act on: one clear line, no traceback
        print(f"svcd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover - signals are handled in the loop
        return 130


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": record.created,
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if isinstance(event, dict):
            out.update(event)
        return json.dumps(out, default=str)


def setup_logging(fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def describe_event(event: Event) -> str:
    """One log line for an event: `api:0[1234] exited: exited with code 1`."""
    who = event.worker or event.service or "agent"
    if event.pid:
        who += f"[{event.pid}]"
    text = f"{who} {event.type}"
    if event.generation:
        text += f" gen={event.generation}"
    if event.message:
        text += f": {event.message}"
    return text


class Daemon:
    """One agent process: owns every long-lived task in a single TaskGroup."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.events = EventBus()
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()

    async def run(self) -> int:
        from agent.control import ControlServer
        from agent.grpc_check import GrpcChecker
        from agent.sdnotify import SystemdNotifier
        from supervisor.supervisor import Supervisor

        cfg = self.config
        notifier = SystemdNotifier.from_environ()
        grpc_checker = GrpcChecker()
        state_dir = Path(cfg.agent.state_dir)
        supervisor = Supervisor(
            events=self.events,
            log_dir=Path(cfg.agent.log_dir),
            checks={"grpc": grpc_checker},
            notify_dir=state_dir / "notify",
            subreaper=True,
        )
        core = AgentCore(cfg, supervisor, self.events)
        core.load_previous_from_history()
        core.on_reloading = lambda active: self._announce_reload(notifier, active)
        control = ControlServer(
            core,
            cfg.agent.control_socket,
            mode=cfg.agent.control_socket_mode,
            allow_uids=cfg.agent.control_allow_uids,
            allow_gids=cfg.agent.control_allow_gids,
            socket_group=cfg.agent.control_group,
            probe_address=cfg.agent.probe_address,
            tcp_address=cfg.agent.control_address,
            tls_cert=cfg.agent.tls_cert,
            tls_key=cfg.agent.tls_key,
            tls_ca=cfg.agent.tls_ca,
            roles=cfg.agent.roles,
        )
        await control.start()  # takes the single-instance lock: fail before touching ports
        self._install_signals()
        embedded = None
        metrics = None
        try:
            await supervisor.start()
            registry = await self._start_registry(core, supervisor, state_dir)
            if registry is not None:
                embedded, core.registry = registry
            if cfg.agent.metrics_address:
                # imported only when asked for: prometheus_client is ~3.4 MiB of the agent
                from agent.metrics import MetricsCollector, MetricsServer

                collector = MetricsCollector(
                    statuses=supervisor.status,
                    reloads=lambda: core.reloads,
                    registry_connected=lambda: (
                        None if core.registry is None else core.registry.state == "connected"
                    ),
                    reload_failures=lambda: core.reload_failures,
                )
                metrics = MetricsServer(cfg.agent.metrics_address, collector)
                await metrics.start()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._log_events())
                tasks.create_task(core.run_lag_monitor())
                if core.registry is not None:
                    tasks.create_task(core.registry.run())  # type: ignore[attr-defined]
                    tasks.create_task(core.run_registry_feed())
                if notifier.watchdog_interval:
                    tasks.create_task(
                        notifier.run_watchdog(lambda: core.loop_lag < notifier_lag_limit(notifier))
                    )
                tasks.create_task(self._serve_reloads(core, notifier))
                log.info(
                    "svcd %s (%s) pid %d: control socket %s",
                    core.version,
                    core.name,
                    os.getpid(),
                    cfg.agent.control_socket,
                )
                await core.start_services()
                ready = await self._wait_ready_or_stop(core)
                notifier.ready(
                    status="all services ready" if ready else "started; some services not ready"
                )
                await self._stop.wait()
                log.info("shutting down: readiness off, draining in %.1fs", cfg.agent.drain_delay)
                core.shutting_down = True
                notifier.stopping()
                if core.registry is not None:
                    core.registry.publish([])
                if cfg.agent.drain_delay > 0:
                    await asyncio.sleep(cfg.agent.drain_delay)
                await supervisor.close()
                raise _Shutdown
        except* _Shutdown:
            pass
        finally:
            await self._close_all(core, control, metrics, embedded, grpc_checker, supervisor)
        log.info("svcd stopped")
        return 0

    async def _start_registry(
        self, core: AgentCore, supervisor: Any, state_dir: Path
    ) -> tuple[Any, Any] | None:
        reg_cfg = self.config.registry
        if reg_cfg is None:
            return None
        from agent.registry import Registry

        embedded = None
        settings = reg_cfg
        if reg_cfg.embedded:
            from agent.embedded_etcd import EmbeddedEtcd

            embedded = EmbeddedEtcd(state_dir / "etcd")
            endpoints = await embedded.start(supervisor.reaper)
            import dataclasses

            settings = dataclasses.replace(reg_cfg, endpoints=tuple(endpoints))
            core._registry_endpoints = list(endpoints)
        registry = Registry(
            settings,
            agent_name=core.name,
            control=self.config.agent.control_socket,
            events=self.events,
            version=core.version,
        )
        return embedded, registry

    @staticmethod
    def _announce_reload(notifier: Any, active: bool) -> None:
        if active:
            notifier.reloading()
        else:
            notifier.ready(status="reloaded")

    async def _wait_ready_or_stop(self, core: AgentCore) -> bool:
        """True once every service is ready; False at the start timeout or on a stop."""
        ready = asyncio.ensure_future(core.wait_ready())
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait(
            {ready, stop}, timeout=START_READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        stop.cancel()
        ready.cancel()
        return ready.done() and not ready.cancelled() and ready.exception() is None

    async def _serve_reloads(self, core: AgentCore, notifier: Any) -> None:
        """SIGHUP: re-read the config and apply it (RELOADING=1 ... READY=1 around it)."""
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            try:
                outcome = await core.reload()  # RELOADING=1 ... READY=1 via core.on_reloading
                log.info("reload (SIGHUP): %s", outcome.message)
            except Exception as exc:
                log.error("reload (SIGHUP) failed: %s", exc)

    async def _log_events(self) -> None:
        sub = self.events.subscribe()
        async for event in sub:
            level = logging.INFO
            if event.type in _WARN_EVENTS and not event.fields.get("expected"):
                level = logging.WARNING  # an exit we asked for (stop, reload) is news, not trouble
            log.log(level, describe_event(event), extra={"event": event.as_dict()})

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)

    async def _close_all(self, core: AgentCore, *closables: Any) -> None:
        control, metrics, embedded, grpc_checker, supervisor = closables
        deadline = time.monotonic() + SHUTDOWN_TAIL_TIMEOUT
        with contextlib.suppress(Exception):
            await supervisor.close()
        if core.registry is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    core.registry.close(),  # type: ignore[attr-defined]
                    max(0.1, deadline - time.monotonic()),
                )
        # `events -f` followers get the last `stopped` events, then a clean end of
        # stream (as `logs -f` does when the log store closes), not a cancelled call
        self.events.close()
        for closer in (
            metrics.stop if metrics else None,
            embedded.stop if embedded else None,
            grpc_checker.close,
            control.stop,
        ):
            if closer is None:
                continue
            try:
                await asyncio.wait_for(closer(), max(0.1, deadline - time.monotonic()))
            except Exception as exc:
                log.warning("shutdown step failed: %s", exc)
        with contextlib.suppress(Exception):
            await supervisor.close_reaper()


_WARN_EVENTS = frozenset(
    {
        "exited",
        "fatal",
        "unhealthy",
        "reload_failed",
        "config_rejected",
        "registry_disconnected",
        "oom",
    }
)


class _Shutdown(Exception):
    """Raised inside the TaskGroup to cancel every long-lived task at shutdown."""


def notifier_lag_limit(notifier: Any) -> float:
    """Loop lag above which the agent stops feeding systemd's watchdog."""
    interval = notifier.watchdog_interval or 1.0
    return float(interval)
