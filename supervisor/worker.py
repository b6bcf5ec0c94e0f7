"""One supervised worker slot (`service:index`) of one generation: spawn, ready, stop.

A `Worker` runs one process at a time and keeps a replacement running according to
the restart policy, until `stop()`. Everything that happens to it happens inside its
one supervision task (`_supervise`): notify messages, health changes, `stop()` and
`replace()` only record a wish and wake the task, so the state machine has exactly one
writer and no two coroutines ever signal or reap the same process.

Invariants:
- Every state change goes through `_set_state`, which checks the edge
  (`states.check_transition`) and publishes one Event; call sites name the edge.
- A process that was spawned is always reaped (through the Reaper) before the slot
  leaves STOPPING/STARTING/RUNNING, and whatever is left of its process group is
  SIGKILLed the moment the main process is gone (forked helpers never outlive it).
- Stopping is bounded: (deregister_delay while STOPPING) + stop_signal to the group +
  graceful_timeout + SIGKILL + reap.
- A failure inside the supervision task (a bug) is logged, the process group is killed,
  and the slot restarts after a pause: a misbehaving worker never takes the agent down.
- The child's environment holds only: the agent's environment minus its own
  service-manager variables, env_file, spec.env, SVCD_SERVICE, SVCD_WORKER, its own
  NOTIFY_SOCKET (one endpoint per process, so no worker can speak for another), and
  WATCHDOG_USEC when the service has a watchdog.

Restart decisions: exit code 78 (EX_CONFIG) -> FATAL at once; `restart = never` -> stays
EXITED; `on-failure` -> stays EXITED after a clean end (exit code 0, or SIGHUP, SIGINT,
SIGTERM, SIGPIPE as with systemd); otherwise `Backoff` decides
(BACKOFF, or FATAL with a slow retry). A replacement the agent asked for (health
failure with on_failure=restart, missed watchdog, max_memory, not ready within
ready_timeout) restarts whatever the policy, paced by the same Backoff; only the last
(a start that failed) can make the slot FATAL: a worker that was ready had started fine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pwd
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.backoff import Backoff, RestartDecision
from supervisor.environment import service_env
from supervisor.errors import SupervisorError
from supervisor.events import EventBus
from supervisor.health import CheckFn, CheckResult, CheckTarget, HealthMonitor
from supervisor.listeners import HEALTH_FD_NAME, bind_private_health
from supervisor.logs import LogStore
from supervisor.notify import NotifyEndpoint, NotifyMessage
from supervisor.preload import Preloader, PreloadFailed
from supervisor.reaper import ExitStatus, Reaper, signal_group
from supervisor.spawn import SpawnError, SpawnRequest, spawn
from supervisor.spec import ServiceSpec
from supervisor.states import WorkerState, check_transition, is_alive
from supervisor.stats import TreeSampler, WorkerStats
from supervisor.status import WorkerStatus

log = logging.getLogger(__name__)

_ENDPOINT_SERIAL = itertools.count(1)

#: sysexits.h EX_CONFIG: the program says its configuration is broken; do not spin.
EX_CONFIG = 78
#: Notify messages kept from a process whose pid is not known yet (preload fork).
MAX_EARLY_MESSAGES = 16
#: psutil sampling period of a worker's process tree.
SAMPLE_INTERVAL = 1.0
#: Consecutive samples over max_memory before the worker is replaced (one spike is not
#: a leak).
MEMORY_STRIKES = 3
#: After SIGKILL, how long to wait for the reaper before declaring the process stuck
#: (uninterruptible sleep); the reaper still collects it whenever it goes.
KILL_REAP_TIMEOUT = 10.0
#: After the main process is gone, how long to wait for the rest of its (SIGKILLed)
#: process group to vanish, and how often to look.
GROUP_EXIT_WAIT = 1.0
GROUP_EXIT_POLL = 0.01
#: How long a dead process's pipes may stay open before its exit is reported anyway.
LOG_EOF_GRACE = 0.2
#: Pause before retrying a slot whose supervision task hit an unexpected error.
ERROR_RETRY = 1.0


class WorkerFailed(SupervisorError):
    """A worker's process ended, or the worker was stopped, before it became ready."""


class StoppedWhileStarting(SupervisorError):
    """stop() came while the process was still being made (a preload template loading)."""


class Changed:
    """A broadcast "something changed" signal: `wait()` returns at the next `fire()`."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()


@dataclass
class WorkerDeps:
    """What every worker of a service shares (owned by the Service/Supervisor)."""

    events: EventBus
    reaper: Reaper
    logs: LogStore
    notify_dir: Path
    checks: Mapping[str, CheckFn]
    base_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass
class _Process:
    """One spawned process of the slot and the resources that live exactly as long."""

    pid: int
    exited: asyncio.Future[ExitStatus]
    notify: NotifyEndpoint
    env: dict[str, str]
    started: float  # monotonic
    health_sock: socket.socket | None = None
    monitor: HealthMonitor | None = None
    monitor_task: asyncio.Task[None] | None = None
    sampler: TreeSampler | None = None
    notified_ready: bool = False
    health_passed: bool = False
    was_ready: bool = False  # it reached RUNNING: whatever ends it, it had started fine
    stopping: bool = False  # the worker sent STOPPING=1 on its own
    last_ping: float = 0.0
    next_sample: float = 0.0
    memory_strikes: int = 0


@dataclass(frozen=True)
class _Ended:
    """How a process run ended, as the restart decision needs it."""

    status: ExitStatus | None  # None: it never started (spawn failed) or is stuck
    requested_stop: bool = False
    replaced: str = ""  # the agent replaced it, and why
    was_ready: bool = False  # it had become ready before it ended
    spawn_error: str = ""  # it cannot be started at all: FATAL at once
    start_failed: str = ""  # this start failed (preload template): backoff


class Worker:
    """One slot `service:index` of one generation; see the module docstring."""

    def __init__(
        self,
        spec: ServiceSpec,
        index: int,
        generation: int,
        sockets: Sequence[socket.socket],
        deps: WorkerDeps,
        on_change: Callable[[], None] | None = None,
        preloader: Preloader | None = None,
    ) -> None:
        self.spec = spec
        self.index = index
        self.generation = generation
        self.name = f"{spec.name}:{index}"
        self._sockets = list(sockets)
        self._deps = deps
        self._on_change = on_change
        self._preloader = preloader  # preload = true: fork from the generation's template
        self._early: list[NotifyMessage] = []  # notify messages before the pid was known
        self._state = WorkerState.EXITED
        self._proc: _Process | None = None
        self._backoff = Backoff(spec.backoff)
        self._task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._stop_requested = False
        self._stop_reason = ""
        self._kick = False  # start now: skip a BACKOFF/FATAL wait
        self._replace_reason = ""
        self._unready_reason = ""  # health failing with on_failure = "unready"
        self.changed = Changed()
        self.health = "unknown"
        self.health_reason = ""
        self.restarts = 0
        self.started_at = 0.0  # wall clock of the current process
        self.stats = WorkerStats()
        self.status_text = ""
        self.last_exit = ""
        self.exit_counts: dict[str, int] = {}
        self.exits = 0  # processes that ended, for wait_ready
        self.end_reason = ""  # how the last process ended, in words (exit or replacement)
        self.retry_at = 0.0  # monotonic time of the next start in BACKOFF/FATAL

    # ----------------------------------------------------------------- public API

    @property
    def state(self) -> WorkerState:
        return self._state

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None else 0

    @property
    def ready(self) -> bool:
        """Running, said so, and not taken out of rotation by health or STOPPING=1."""
        proc = self._proc
        return (
            self._state is WorkerState.RUNNING
            and proc is not None
            and not proc.stopping
            and not self._unready_reason
        )

    @property
    def sockets(self) -> list[socket.socket]:
        """The service listeners this worker is handed (fds 3..)."""
        return list(self._sockets)

    @property
    def supervising(self) -> bool:
        """True until the slot is stopped for good (or gave up under its policy)."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Begin supervising (spawns at once); on a slot in BACKOFF/FATAL, retry now.

        Also resets the backoff: an operator's start is a fresh start.
        """
        self._backoff.reset()
        if self.supervising:
            self._kick = True
            self._wakeup.set()
            return
        self._stop_requested = False
        self._kick = False
        self._task = asyncio.create_task(self._supervise(), name=f"worker {self.name}")

    async def stop(self, reason: str = "stop requested") -> None:
        """Stop for good: drain and stop the process (bounded), cancel any restart.

        Returns when the process is reaped and the slot is EXITED. Idempotent.
        Cancelling the caller does not cancel the stop (it is shielded).
        """
        self._stop_requested = True
        self._stop_reason = reason
        self._wakeup.set()
        task = self._task
        if task is not None and not task.done():
            await asyncio.shield(task)

    def replace(self, reason: str) -> None:
        """Gracefully stop the current process and start a new one (health, memory...)."""
        if self._proc is not None and not self._replace_reason:
            self._replace_reason = reason
            self._wakeup.set()

    async def wait_ready(self, timeout: float) -> None:  # noqa: ASYNC109 - like Service's
        """Wait until the worker is ready.

        Raises WorkerFailed when a process of the slot ends (or the slot stops) first,
        TimeoutError after `timeout` seconds. Cancellation just stops waiting.
        """
        exits = self.exits
        async with asyncio.timeout(timeout):
            while True:
                if self.ready:
                    return
                if self.exits > exits:
                    raise WorkerFailed(f"{self.name}: {self.end_reason} before it was ready")
                if not self.supervising:
                    raise WorkerFailed(f"{self.name} stopped before it was ready")
                await self.changed.wait()

    def update_live(self, spec: ServiceSpec) -> None:
        """Apply a spec that needs no new process (health, backoff, limits, registry)."""
        old = self.spec
        self.spec = spec
        self._backoff.spec = spec.backoff
        proc = self._proc
        if old.health != spec.health and proc is not None and not proc.exited.done():
            self._stop_monitor(proc)
            self._unready_reason = ""
            self.health, self.health_reason = "unknown", ""
            if self._judged_by_health():
                self._start_monitor(proc)
        self._changed()

    def status(self) -> WorkerStatus:
        proc = self._proc
        now = time.monotonic()
        alive = proc is not None and is_alive(self._state)
        stats = self.stats
        return WorkerStatus(
            worker=self.name,
            index=self.index,
            pid=self.pid if alive else 0,
            generation=self.generation,
            state=self._state.value,
            ready=self.ready,
            health=self.health,
            restarts=self.restarts,
            uptime_s=(now - proc.started) if alive and proc is not None else 0.0,
            rss_bytes=float(stats.rss_bytes) if alive else 0.0,
            cpu_percent=stats.cpu_percent if alive else 0.0,
            cpu_seconds=stats.cpu_seconds,
            connections=stats.connections if alive else 0,
            requests=stats.requests,
            qps=stats.qps if alive else 0.0,
            send_fail=stats.send_fail,
            timers=stats.timers,
            bytes_in=stats.bytes_in,
            bytes_out=stats.bytes_out,
            started_at=self.started_at if alive else 0.0,
            health_reason=self.health_reason or self._unready_reason,
            status_text=self.status_text,
            last_exit=self.last_exit,
            last_exit_reason=self.end_reason,
            exit_counts=dict(self.exit_counts),
            metrics=list(stats.metrics),
            num_fds=stats.num_fds if alive else 0,
            num_threads=stats.num_threads if alive else 0,
            leaving=self.leaving,
        )

    @property
    def leaving(self) -> bool:
        """True once the slot stops for good: a stop was requested (stop(): svctl stop,
        scale down, removal, an old generation retired, shutdown), or supervision ended
        (the restart policy let it stay exited). A process being replaced (crash,
        health, memory, watchdog, ready timeout) or a slot in BACKOFF/FATAL is not leaving.
        """
        return self._stop_requested or not self.supervising

    # ------------------------------------------------------------ state machine

    def _set_state(self, new: WorkerState, event: str, message: str = "", **fields: Any) -> None:
        """The only place the state changes: checks the edge and publishes `event`."""
        check_transition(self._state, new)
        self._state = new
        self._publish(event, message, state=new.value, **fields)
        self._changed()

    def _publish(self, event: str, message: str = "", **fields: Any) -> None:
        self._deps.events.emit(
            event,
            service=self.spec.name,
            worker=self.name,
            pid=self.pid,
            generation=self.generation,
            message=message,
            fields=fields,
        )

    def _changed(self) -> None:
        self.changed.fire()
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("change callback of %s raised", self.name)

    # ------------------------------------------------------------ supervision

    async def _supervise(self) -> None:
        try:
            while not self._stop_requested:
                try:
                    ended = await self._run_process()
                    if self._stop_requested:
                        break
                    decision = self._decide(ended)
                    if decision is None:
                        return  # policy: stay EXITED
                    await self._pause(decision)
                except Exception:
                    log.exception("supervision of %s failed; killing and retrying", self.name)
                    await self._recover()
        finally:
            self._finish()

    async def _run_process(self) -> _Ended:
        """Spawn one process and supervise it until it is gone (reaped)."""
        try:
            proc = await self._launch()
        except StoppedWhileStarting as exc:
            self._never_started("stopped while starting", exc)
            return _Ended(None, requested_stop=True)
        except PreloadFailed as exc:
            # like a process that died at start: backoff and start limit apply
            self._never_started("preload failed", exc)
            return _Ended(None, start_failed=str(exc))
        except (SpawnError, OSError, ValueError) as exc:
            self._never_started("spawn failed", exc)
            return _Ended(None, spawn_error=str(exc))
        deadline_ready = proc.started + self.spec.ready_timeout
        while True:
            now = time.monotonic()
            if proc.exited.done():
                await self._drain_output(proc)
                return self._reaped(proc, _status(proc.exited))
            if self._stop_requested:
                return await self._terminate(proc, self._stop_reason, requested_stop=True)
            if self._replace_reason:
                reason, self._replace_reason = self._replace_reason, ""
                return await self._terminate(proc, reason, replaced=reason)
            if self._state is WorkerState.STARTING:
                if self._ready_condition(proc):
                    # STARTING -> RUNNING: READY=1 / first passing check / started.
                    # Sampled first, so status never shows a ready worker at 0 bytes.
                    self._sample(proc)
                    proc.next_sample = now + SAMPLE_INTERVAL
                    self._set_state(WorkerState.RUNNING, "ready", message=self._ready_how())
                    proc.was_ready = True
                    proc.last_ping = now
                    if proc.monitor is None:
                        self._start_monitor(proc)  # checks judge a worker once it is ready
                    elif self.health == "failing":
                        self._health_failed()  # it failed while starting: no news will come
                    continue
                if now >= deadline_ready:
                    self._replace_reason = f"not ready within {self.spec.ready_timeout:g}s"
                    continue
            watchdog = self.spec.watchdog
            if (
                watchdog
                and self._state is WorkerState.RUNNING
                and now - proc.last_ping > watchdog
            ):
                self._publish("unhealthy", f"no WATCHDOG=1 for {watchdog:g}s")
                self._replace_reason = f"watchdog timeout ({watchdog:g}s)"
                continue
            if now >= proc.next_sample:
                self._sample(proc)
                proc.next_sample = now + SAMPLE_INTERVAL
                continue
            wake_at = proc.next_sample
            if self._state is WorkerState.STARTING:
                wake_at = min(wake_at, deadline_ready)
            elif watchdog and self._state is WorkerState.RUNNING:
                wake_at = min(wake_at, proc.last_ping + watchdog + 0.001)
            await self._sleep_until(wake_at)

    async def _fork(self, preloader: Preloader, request: SpawnRequest) -> int:
        """Fork from the template; a stop requested meanwhile (the template may still be
        importing the app) abandons the start instead of waiting for it."""
        forking = asyncio.ensure_future(preloader.spawn(request))
        while True:
            woken = asyncio.ensure_future(self._wakeup.wait())
            await asyncio.wait([forking, woken], return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
            if forking.done():
                return forking.result()
            if self._stop_requested:
                forking.cancel()  # safe: Preloader.spawn cleans up after itself
                with contextlib.suppress(asyncio.CancelledError, SpawnError):
                    await forking
                raise StoppedWhileStarting(self._stop_reason)
            self._wakeup.clear()

    def _never_started(self, what: str, why: BaseException) -> None:
        """EXITED/BACKOFF/FATAL -> STARTING -> EXITED: the process never existed."""
        self._set_state(WorkerState.STARTING, "started", message=what)
        reason = f"{what}: {why}"
        self.last_exit = self.end_reason = reason
        self.exits += 1
        self._set_state(WorkerState.EXITED, "exited", message=reason)

    async def _launch(self) -> _Process:
        """Start a process (spawn it, or fork it from the generation's preload
        template); the state goes to STARTING (raises before that on failure)."""
        spec = self.spec
        self._proc = None
        self._early = []
        env = service_env(spec, self.generation, self._deps.base_env)
        endpoint = NotifyEndpoint(
            self._deps.notify_dir,
            # unique per process: an endpoint takes over a file of the same name
            f"{spec.name}-{self.index}-{next(_ENDPOINT_SERIAL)}",
            self._on_notify,
            uid=_uid_of(spec.user),
        )
        env.update(self._own_env(endpoint.path))
        try:
            health_sock = bind_private_health() if spec.health.needs_private_listener else None
        except BaseException:
            endpoint.close()
            raise
        fds = [s.fileno() for s in self._sockets]
        names = [spec.name] * len(fds)
        if health_sock is not None:
            fds.append(health_sock.fileno())
            names.append(HEALTH_FD_NAME)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        before = time.monotonic()
        request = SpawnRequest(
            argv=spec.command, env=env, cwd=spec.cwd, fds=fds, fd_names=names,
            stdout=out_w, stderr=err_w,
            user=spec.user, group=spec.group, umask=spec.umask, rlimits=spec.rlimits,
        )
        try:
            if self._preloader is None:
                pid = spawn(request)
            else:
                pid = await self._fork(self._preloader, request)
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            endpoint.close()
            if health_sock is not None:
                health_sock.close()
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        # no await between spawn and watch (a forked worker's early exit waits, unclaimed,
        # in the reaper: `since` tells it from an older process of the same pid)
        exited = self._deps.reaper.watch(pid, since=before)
        exited.add_done_callback(lambda _: self._group_gone(pid))
        now = time.monotonic()
        proc = _Process(
            pid=pid, exited=exited, notify=endpoint, env=env, started=now,
            health_sock=health_sock, last_ping=now, next_sample=now + SAMPLE_INTERVAL,
        )
        self._proc = proc  # from here on, _recover can find (and kill) it
        early, self._early = self._early, []
        for message in early:
            self._on_notify(message)
        self._deps.logs.attach(self.index, pid, "stdout", out_r)
        self._deps.logs.attach(self.index, pid, "stderr", err_r)
        proc.sampler = TreeSampler(pid)
        self.stats = WorkerStats()
        self.status_text = ""
        self.started_at = time.time()
        self._backoff.started()
        self._unready_reason = ""
        self.health, self.health_reason = "unknown", ""
        first = self.exits == 0
        if not first:
            self.restarts += 1
        # EXITED/BACKOFF/FATAL -> STARTING: spawned. Every spawn is a `started` event
        # (SPEC's lifecycle events); `restart` tells a slot's later processes apart.
        self._set_state(
            WorkerState.STARTING,
            "started",
            message=f"spawned {' '.join(spec.command)}" + ("" if first else " (restart)"),
            restarts=self.restarts,
            restart=not first,
        )
        if self._judged_by_health():
            self._start_monitor(proc)
        return proc

    def _judged_by_health(self) -> bool:
        """Whether the health monitor runs now.

        With ready = "health" the checks decide readiness, so they run from the spawn.
        Otherwise they start at READY=1 (or "started"): a worker that is still loading
        is the ready timeout's business, and failures counted before it could answer
        would replace a slow starter the moment it became ready, in a loop to fatal.
        """
        return self.spec.ready == "health" or self._state is WorkerState.RUNNING

    def _own_env(self, notify_path: str) -> dict[str, str]:
        """What this slot's process adds to the service's environment."""
        env = {"SVCD_WORKER": str(self.index), "NOTIFY_SOCKET": notify_path}
        if self.spec.watchdog:
            env["WATCHDOG_USEC"] = str(int(self.spec.watchdog * 1_000_000))
        return env

    def _ready_condition(self, proc: _Process) -> bool:
        mode = self.spec.ready
        if mode == "started":
            return True
        if mode == "health" and self.spec.health.kind != "none":
            return proc.health_passed
        return proc.notified_ready

    def _ready_how(self) -> str:
        mode = self.spec.ready
        if mode == "health" and self.spec.health.kind != "none":
            return "first passing health check"
        return "started" if mode == "started" else "READY=1"

    async def _terminate(
        self, proc: _Process, reason: str, *, requested_stop: bool = False, replaced: str = ""
    ) -> _Ended:
        """Drain and stop the process: signal, bounded wait, SIGKILL, always reap."""
        was_ready = self.ready
        # STARTING/RUNNING -> STOPPING: stop requested / replaced
        self._set_state(WorkerState.STOPPING, "stopping", message=reason)
        self._stop_monitor(proc)
        spec = self.spec
        if was_ready and spec.deregister_delay > 0:
            # on STOPPING the registry shows the worker not ready (drops its key when it
            # is leaving for good); let clients notice before it goes
            await asyncio.wait([proc.exited], timeout=spec.deregister_delay)
        if not proc.exited.done():
            signal_group(proc.pid, _signal_number(spec.stop_signal))
            # like systemd: a SIGSTOPped worker must wake up to act on the stop signal,
            # or it would cost the whole graceful_timeout before the SIGKILL
            signal_group(proc.pid, signal.SIGCONT)
            await asyncio.wait([proc.exited], timeout=spec.graceful_timeout)
        if not proc.exited.done():
            log.warning(
                "%s (pid %d) still running %gs after %s: SIGKILL",
                self.name, proc.pid, spec.graceful_timeout, spec.stop_signal,
            )
            self._publish("stopping", f"killed: not gone {spec.graceful_timeout:g}s after "
                          f"{spec.stop_signal}", kill=True)
            signal_group(proc.pid, signal.SIGKILL)
            await asyncio.wait([proc.exited], timeout=KILL_REAP_TIMEOUT)
        if not proc.exited.done():
            log.error("%s (pid %d) survived SIGKILL for %gs", self.name, proc.pid,
                      KILL_REAP_TIMEOUT)
            return self._reaped(proc, None, requested_stop=requested_stop, replaced=replaced)
        await self._drain_output(proc)
        return self._reaped(
            proc, _status(proc.exited), requested_stop=requested_stop, replaced=replaced
        )

    def _reaped(
        self,
        proc: _Process,
        status: ExitStatus | None,
        *,
        requested_stop: bool = False,
        replaced: str = "",
    ) -> _Ended:
        self._release(proc)
        self.exits += 1
        self.last_exit = status.short() if status is not None else "stuck after SIGKILL"
        self.exit_counts[self.last_exit] = self.exit_counts.get(self.last_exit, 0) + 1
        message = status.describe() if status is not None else self.last_exit
        self.end_reason = f"{message} ({replaced})" if replaced else message
        fields: dict[str, Any] = {"expected": requested_stop or bool(replaced)}
        if status is not None:
            fields["code"] = status.code  # None when killed by a signal
            fields["signal"] = status.signal_name or None  # None when it exited
        # STARTING/RUNNING/STOPPING -> EXITED: reaped
        self._set_state(WorkerState.EXITED, "exited", message=message, **fields)
        return _Ended(
            status, requested_stop=requested_stop, replaced=replaced, was_ready=proc.was_ready
        )

    async def _drain_output(self, proc: _Process) -> None:
        """Before the exit is told: wait (bounded) until nothing of the process group is
        left, so a stopped worker's helpers are gone when stop() returns; let the last
        lines reach the log; drop pipes still held open (by a descendant that left the
        group)."""
        # Nothing signals "group empty", so this polls, a bounded number of times.
        for _ in range(int(GROUP_EXIT_WAIT / GROUP_EXIT_POLL)):
            if not _group_alive(proc.pid):
                break
            await asyncio.sleep(GROUP_EXIT_POLL)
        logs = self._deps.logs
        await logs.wait_eof(self.index, proc.pid, grace=LOG_EOF_GRACE)
        logs.detach(self.index, proc.pid)

    def _decide(self, ended: _Ended) -> RestartDecision | None:
        """After a process ended by itself or was replaced: wait and restart, or not."""
        if ended.replaced:
            # a ready worker the agent replaced is not a failed start: never fatal
            return self._backoff.after_exit(may_give_up=not ended.was_ready)
        if ended.spawn_error:
            return self._backoff.give_up(f"cannot start: {ended.spawn_error}")
        if ended.start_failed:
            return self._backoff.after_exit()
        status = ended.status
        if status is not None and status.code == EX_CONFIG:
            return self._backoff.give_up(f"exit code {EX_CONFIG} (EX_CONFIG): configuration error")
        policy = self.spec.restart
        if policy == "never" or (policy == "on-failure" and status is not None and status.clean):
            return None
        return self._backoff.after_exit()

    async def _pause(self, decision: RestartDecision) -> None:
        if decision.fatal:
            # EXITED -> FATAL: start limit / EX_CONFIG
            self._set_state(
                WorkerState.FATAL, "fatal", message=decision.reason,
                retry_in=decision.delay, failures=decision.failures,
            )
        elif decision.delay > 0:
            # EXITED -> BACKOFF: quick failure
            self._set_state(
                WorkerState.BACKOFF, "backoff",
                message=f"restarting in {decision.delay:.2f}s",
                delay=decision.delay, failures=decision.failures,
            )
        else:
            return  # restart at once (EXITED -> STARTING in _launch)
        self.retry_at = time.monotonic() + decision.delay
        self._kick = False
        while not self._stop_requested and not self._kick:
            if time.monotonic() >= self.retry_at:
                break
            await self._sleep_until(self.retry_at)
        self.retry_at = 0.0

    async def _sleep_until(self, deadline: float) -> None:
        timeout = max(0.0, deadline - time.monotonic())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wakeup.wait()
        self._wakeup.clear()

    async def _recover(self) -> None:
        """After an internal error: kill the process group, get to EXITED, pause."""
        proc = self._proc
        if proc is not None and not proc.exited.done():
            signal_group(proc.pid, signal.SIGKILL)
            await asyncio.wait([proc.exited], timeout=KILL_REAP_TIMEOUT)
        if proc is not None:
            with contextlib.suppress(Exception):
                self._release(proc)
        self.exits += 1  # whoever waits for this process to get ready must not wait on
        self.end_reason = self.last_exit = "supervision error"
        if self._state is not WorkerState.EXITED:
            # any -> EXITED: supervision error
            self._set_state(WorkerState.EXITED, "exited", message="supervision error")
        await self._sleep_until(time.monotonic() + ERROR_RETRY)

    def _finish(self) -> None:
        """The supervision task ends: no process may be left, the slot ends EXITED."""
        proc = self._proc
        if proc is not None and not proc.exited.done():
            # only reachable through cancellation or a bug: never leave a worker behind
            signal_group(proc.pid, signal.SIGKILL)
            self._release(proc)
        if self._state is not WorkerState.EXITED:
            # BACKOFF/FATAL (or any, when cancelled) -> EXITED: stopped
            self._state_forced_exit()
        if self._stop_requested:
            self._publish("stopped", self._stop_reason, state=self._state.value)
        self._changed()

    def _state_forced_exit(self) -> None:
        with contextlib.suppress(Exception):
            if self._state in (WorkerState.BACKOFF, WorkerState.FATAL):
                # no process: its `exited` was told when it ended; `stopped` tells the rest
                check_transition(self._state, WorkerState.EXITED)
                self._state = WorkerState.EXITED
                return
            self._set_state(WorkerState.EXITED, "exited", message="stopped")

    # ------------------------------------------------------------ per process

    def _release(self, proc: _Process) -> None:
        """Close what belonged to the process (idempotent)."""
        self._stop_monitor(proc)
        proc.notify.close()
        if proc.health_sock is not None:
            proc.health_sock.close()
            proc.health_sock = None

    def _group_gone(self, pid: int) -> None:
        # the main process is reaped: whatever it forked into its group goes too
        signal_group(pid, signal.SIGKILL)
        self._wakeup.set()

    def _start_monitor(self, proc: _Process) -> None:
        spec = self.spec.health
        if spec.kind == "none":
            return
        check = self._deps.checks.get(spec.kind)
        if check is None:
            log.error("%s: no health check of kind %r", self.name, spec.kind)
            return
        if proc.health_sock is not None:
            host, port = proc.health_sock.getsockname()[:2]
        else:
            host, port = "127.0.0.1", 0  # exec checks dial nothing
        target = CheckTarget(
            host, port, self.name, proc.pid, proc.env, listener=proc.health_sock
        )
        monitor = HealthMonitor(
            spec, target, self._observed(proc, check),
            lambda health, reason: self._on_health(proc, health, reason),
        )
        proc.monitor = monitor
        proc.monitor_task = asyncio.create_task(monitor.run(), name=f"health {self.name}")

    def _stop_monitor(self, proc: _Process) -> None:
        if proc.monitor_task is not None:
            proc.monitor_task.cancel()
            proc.monitor_task = None
            proc.monitor = None

    def _observed(self, proc: _Process, check: CheckFn) -> CheckFn:
        """Wrap a check so that its first pass is seen at once (ready = "health")."""

        async def observed(spec: Any, target: CheckTarget) -> CheckResult:
            result = await check(spec, target)
            if result.ok and not proc.health_passed:
                proc.health_passed = True
                self._wakeup.set()
            return result

        return observed

    def _on_health(self, proc: _Process, health: str, reason: str) -> None:
        if proc is not self._proc or proc.exited.done():
            return
        self.health, self.health_reason = health, reason
        if health == "passing":
            self._publish("healthy")
            if self._unready_reason:
                self._unready_reason = ""
                self._publish("ready", "health check passing again")
        elif health == "failing":
            self._publish("unhealthy", reason)
            if self._state is WorkerState.RUNNING:
                self._health_failed()
            # while STARTING, ready_timeout rules; the failure is applied once RUNNING
        self._wakeup.set()
        self._changed()

    def _health_failed(self) -> None:
        """Apply on_failure to a RUNNING worker whose health is failing."""
        reason = f"health check failing: {self.health_reason}"
        if self.spec.health.on_failure == "restart":
            self.replace(reason)
        elif not self._unready_reason:
            self._unready_reason = reason
            self._publish("unready", reason)

    def _on_notify(self, message: NotifyMessage) -> None:
        proc = self._proc
        if proc is None:
            # a forked worker can say READY=1 before its pid reaches us: keep it for
            # the replay in _launch (the endpoint belongs to this one launch)
            if len(self._early) < MAX_EARLY_MESSAGES:
                self._early.append(message)
            return
        if proc.exited.done():
            return
        if not _in_group(message.sender_pid, proc.pid):
            log.warning("%s: ignoring a notify message from pid %s, outside its process group",
                        self.name, message.sender_pid)
            return
        now = time.monotonic()
        if message.ready and not proc.notified_ready:
            proc.notified_ready = True
            self._wakeup.set()
        if message.stopping and not proc.stopping:
            proc.stopping = True  # it is leaving on its own: out of rotation now
            if self._state is WorkerState.RUNNING:
                self._publish("unready", "STOPPING=1")
            self._changed()
        if message.watchdog:
            proc.last_ping = now
        if message.status is not None:
            self.status_text = message.status
        if message.stats:
            self.stats.apply_report(message.stats, now)

    def _sample(self, proc: _Process) -> None:
        if proc.sampler is None:
            return
        sample = proc.sampler.sample()
        if sample is None:
            return
        self.stats.apply_sample(sample)
        limit = self.spec.max_memory
        if limit is None or self._state is not WorkerState.RUNNING:
            proc.memory_strikes = 0
            return
        if sample.rss_bytes > limit:
            proc.memory_strikes += 1
            if proc.memory_strikes >= MEMORY_STRIKES:
                proc.memory_strikes = 0
                reason = (
                    f"rss {sample.rss_bytes} bytes above max_memory {limit} "
                    f"for {MEMORY_STRIKES} samples"
                )
                self._publish("oom", reason, rss_bytes=sample.rss_bytes, max_memory=limit)
                self.replace(reason)
        else:
            proc.memory_strikes = 0


def _group_alive(pgid: int) -> bool:
    """SIGKILL process group `pgid`; True while a member of it is still running.

    killpg also succeeds on a group of zombies that their new parent (init, unless the
    agent is a subreaper) has not reaped yet; those count as gone, which takes a scan
    of /proc (cheap: one getpgid per process, one read per member).
    """
    if not signal_group(pgid, signal.SIGKILL):
        return False
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.getpgid(int(name)) != pgid:
                continue
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):
            continue  # gone meanwhile
        if state not in (b"Z", b"X"):
            return True
    return False


def _status(exited: asyncio.Future[ExitStatus]) -> ExitStatus | None:
    """The exit status, or None when the reaper was closed before the process ended."""
    return None if exited.cancelled() else exited.result()


def _signal_number(name: str) -> signal.Signals:
    key = name.upper()
    if not key.startswith("SIG"):
        key = "SIG" + key
    return signal.Signals[key]


def _in_group(sender: int | None, pgid: int) -> bool:
    """Whether `sender` belongs to the worker's process group (unknown: trust the socket)."""
    if sender is None or sender == pgid:
        return True
    try:
        return os.getpgid(sender) == pgid
    except OSError:
        return True  # already gone (a child that exited): only its socket vouches for it


def _uid_of(user: str | None) -> int | None:
    if user is None:
        return None
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None  # spawn reports the unknown user
