"""The Supervisor: every service of the agent, their listeners, and the one reaper.

This is the object the agent talks to (see docs/architecture.md, "Supervisor API").
It owns the `Reaper` (the only waitpid in the process), the `ListenerSet` (every bound
socket) and the directory of the workers' notify sockets; each `Service` owns its
workers.

Invariants:
- A worker that misbehaves never takes the agent down: worker supervision contains its
  own errors (see worker.py), and the actions here only raise SupervisorError
  subclasses on purpose (ListenerError, ReloadFailed, UnknownService).
- Each Supervisor keeps its workers' notify sockets in a directory of its own,
  `notify_dir/<pid>` (one Supervisor per notify_dir in a process): several agents may
  share one state dir (root's default is the same for all of them) and socket names
  restart in every agent. Directories of agents no longer running are removed at start.
- `close()` stops every service in parallel, each worker bounded by its
  graceful_timeout, and closes every listener; the reaper stays until `close_reaper()`
  because other parts of the agent (an embedded etcd, exec health checks) still wait
  for children through it during shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from supervisor.errors import UnknownService
from supervisor.events import EventBus
from supervisor.health import CheckFn, default_checks
from supervisor.listeners import ListenerSet
from supervisor.reaper import Reaper, process_alive
from supervisor.service import Progress, Service, ServiceDeps
from supervisor.spec import ServiceSpec
from supervisor.status import ServiceStatus

log = logging.getLogger(__name__)

#: Mode of the notify directory: workers running as other users traverse it to reach
#: their own socket (each socket file is 0600 and owned by that worker's user).
NOTIFY_DIR_MODE = 0o711


class Supervisor:
    """All services of one agent. Use from one event loop: `start()` first."""

    def __init__(
        self,
        events: EventBus,
        log_dir: Path | None,
        checks: Mapping[str, CheckFn] | None = None,
        notify_dir: Path | None = None,
        subreaper: bool = False,
    ) -> None:
        self.events = events
        self.log_dir = log_dir
        self.reaper = Reaper(subreaper=subreaper)
        self.listeners = ListenerSet()
        self._extra_checks = dict(checks or {})
        self._notify_dir = notify_dir
        self._own_notify_dir = False
        self._services: dict[str, Service] = {}
        self._deps: ServiceDeps | None = None

    async def start(self) -> None:
        """Start the reaper and prepare the notify directory. Raises OSError."""
        self.reaper.start()
        if self._notify_dir is None:
            self._notify_dir = Path(tempfile.mkdtemp(prefix="svcd-notify-"))
        else:
            parent = self._notify_dir
            parent.mkdir(parents=True, exist_ok=True)
            os.chmod(parent, NOTIFY_DIR_MODE)
            _remove_stale_run_dirs(parent)
            # the pid alone: a socket path has at most 107 bytes to live in. A directory
            # of this pid left by an earlier life (pid 1 in a container) is reused: the
            # endpoints replace a leftover socket of the same name.
            self._notify_dir = parent / str(os.getpid())
            self._notify_dir.mkdir(exist_ok=True)
        self._own_notify_dir = True
        os.chmod(self._notify_dir, NOTIFY_DIR_MODE)
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        checks: dict[str, CheckFn] = default_checks(self.reaper)
        checks.update(self._extra_checks)
        self._deps = ServiceDeps(
            events=self.events,
            reaper=self.reaper,
            listeners=self.listeners,
            log_dir=self.log_dir,
            notify_dir=self._notify_dir,
            checks=checks,
            base_env=dict(os.environ),
        )

    @property
    def services(self) -> Mapping[str, Service]:
        return MappingProxyType(self._services)

    def service(self, name: str) -> Service:
        """The service called `name`; raises UnknownService."""
        try:
            return self._services[name]
        except KeyError:
            raise UnknownService(name) from None

    def status(self) -> list[ServiceStatus]:
        return [svc.status() for svc in self._services.values()]

    async def add_service(self, spec: ServiceSpec, *, start: bool = True) -> Service:
        """Bind the service's listeners (ListenerError) and start its workers.

        Returns without waiting for readiness (`Service.wait_ready`).
        """
        if self._deps is None:
            raise RuntimeError("Supervisor.start() first")
        if spec.name in self._services:
            raise ValueError(f"service {spec.name!r} exists already")
        svc = Service(spec, self._deps)
        self._services[spec.name] = svc
        if start:
            await svc.start()
        return svc

    async def update_service(self, spec: ServiceSpec, progress: Progress | None = None) -> None:
        """Apply a changed spec: live when no process must change, else a rolling
        reload (raises ReloadFailed after rolling back). Raises UnknownService."""
        svc = self.service(spec.name)
        if svc.spec.needs_rollout(spec):
            await svc.reload(spec, progress)
        else:
            await svc.apply_live(spec)

    async def remove_service(self, name: str) -> None:
        """Drain and stop the service's workers, close its listeners. Raises UnknownService."""
        svc = self.service(name)
        try:
            await svc.close()
        finally:
            self._services.pop(name, None)

    async def close(self) -> None:
        """Stop every service in parallel (gracefully), close every listener.

        The reaper keeps running: `close_reaper()` at the very end.
        """
        services = list(self._services.values())
        results = await asyncio.gather(*(svc.close() for svc in services), return_exceptions=True)
        for svc, result in zip(services, results, strict=True):
            if isinstance(result, BaseException):
                log.error("closing service %s failed: %r", svc.name, result)
        self._services.clear()
        self.listeners.close_all()
        if self._own_notify_dir and self._notify_dir is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._notify_dir)

    async def close_reaper(self) -> None:
        """Stop reaping (after `close()` and after anything else that spawns)."""
        self.reaper.close()


def _remove_stale_run_dirs(parent: Path) -> None:
    """Remove what agents no longer running left in `parent`: their `<pid>` directories,
    and socket files of the layout before per-agent directories."""
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            pid = entry.name
            if entry.is_dir() and pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.suffix == ".notify" and not entry.is_dir():
                entry.unlink(missing_ok=True)

