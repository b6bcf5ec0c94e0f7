"""N workers of one service, their generations, rolling reload with rollback, scaling.

A `Service` holds one `Worker` per slot (`self._slots`: index -> the worker that serves
that slot now) plus the workers in transition (`self._transit`: new workers of a
reload still starting, old ones still draining); status shows both.

Invariants:
- Actions (start, stop, restart, reload, scale, live update) are serialized by one
  asyncio.Lock; `stop()` (and `close()`) does not queue behind a reload: it interrupts
  it (the new workers are stopped, nothing is rolled back, then everything stops).
- The service holds exactly one `ListenerSet.acquire` per listen address of its current
  spec. A reload acquires the new spec's addresses before starting any new worker and
  releases the old spec's only after it succeeded (or the new spec's after a rollback),
  so a socket never closes while a worker could still be handed it, and a client that
  connects between two workers is queued in the backlog, not refused.
- The service state is derived from the workers, never stored.

Rolling reload (generation N -> N+1), per batch of `max_surge + max_unavailable` slots:
an old worker that is not ready (crash loop, backoff, starting) is stopped first (it
serves nobody, so replacing it costs no capacity); up to `max_unavailable` ready ones
are stopped first as well; the others get their new worker next to them (surge). When
every new worker of the batch is ready (READY=1, first passing check, or started)
within `ready_timeout`, the old ones of the batch start draining and the next batch
begins; the reload returns once every old worker is gone.

If a new worker exits or is not ready in time, the new workers of the batch are
stopped, a slot whose old worker was already stopped gets an old-generation worker
again, slots rolled by earlier batches are rolled back the same way (old worker ready
first, then the new one drains), and `ReloadFailed(reason)` is raised after
publishing `reload_failed`. The spec and generation stay the old ones.

A reload during a crash loop is allowed (it is usually the fix): the crash-looping old
workers are replaced without waiting; if the new generation fails too, the old spec
stays and its workers go on with their restart policy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.errors import ListenerError, ReloadFailed
from supervisor.events import EventBus
from supervisor.health import CheckFn
from supervisor.listeners import ListenerSet
from supervisor.logs import LogStore
from supervisor.preload import Preloader
from supervisor.reaper import Reaper
from supervisor.spec import ListenSpec, ServiceSpec
from supervisor.states import ServiceState, WorkerState
from supervisor.status import ServiceStatus, WorkerStatus
from supervisor.worker import Changed, Worker, WorkerDeps, WorkerFailed

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass
class ServiceDeps:
    """What every service of a supervisor shares."""

    events: EventBus
    reaper: Reaper
    listeners: ListenerSet
    log_dir: Path | None
    notify_dir: Path
    checks: Mapping[str, CheckFn]
    base_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


class Service:
    """One configured service; see the module docstring.

    The constructor binds (acquires) the service's listeners and raises ListenerError
    when one cannot be bound; no worker runs until `start()`.
    """

    def __init__(self, spec: ServiceSpec, deps: ServiceDeps) -> None:
        self.spec = spec
        self.name = spec.name
        self.generation = 1
        self.reloads = 0
        self._deps = deps
        self._sockets = self._acquire(spec.listen)
        self.logs = LogStore(spec.name, deps.log_dir, spec.logs)
        self._wdeps = WorkerDeps(
            events=deps.events,
            reaper=deps.reaper,
            logs=self.logs,
            notify_dir=deps.notify_dir,
            checks=deps.checks,
            base_env=deps.base_env,
        )
        self._slots: dict[int, Worker] = {}
        self._transit: set[Worker] = set()
        self._preloaders: dict[int, Preloader] = {}  # generation -> its template
        self._lock = asyncio.Lock()
        self._desired = False
        self._reloads: set[asyncio.Task[None]] = set()  # running or queued on the lock
        self._closed = False
        self.changed = Changed()

    # ----------------------------------------------------------------- actions

    async def start(self) -> None:
        """Start every slot that has no supervised worker; retry FATAL/BACKOFF ones now.

        Returns once the workers are spawned (see `wait_ready`).
        """
        async with self._lock:
            self._desired = True
            self._start_slots(range(self.spec.count))
        self._publish_changed()

    async def stop(self) -> None:
        """Drain and stop every worker (in parallel, each bounded by graceful_timeout).

        Interrupts a running reload (it raises ReloadFailed to its caller).
        """
        self._desired = False
        for task in self._reloads:
            task.cancel()  # running or queued: none of them may start anything now
        async with self._lock:
            await self._stop_workers([*self._slots.values(), *self._transit], "service stopped")
            self._slots.clear()
            self._transit.clear()
            await self._retire_preloaders()
        self._publish_changed()

    async def restart(self) -> None:
        """Stop every worker, then start them again (a capacity gap, by definition)."""
        async with self._lock:
            await self._stop_workers([*self._slots.values(), *self._transit], "restart")
            self._slots.clear()
            self._desired = True
            self._start_slots(range(self.spec.count))

    async def reload(
        self, spec: ServiceSpec | None = None, progress: Progress | None = None
    ) -> None:
        """Rolling reload to `spec` (default: the same spec, new processes).

        Returns when every slot runs a ready worker of the new generation and every old
        worker is gone. Raises ReloadFailed(reason) after rolling back (the old
        generation keeps serving) or when `stop()` interrupted it. Cancelling the
        caller does not cancel the reload (a half-rolled service helps nobody).
        """
        if spec is not None and spec.name != self.name:
            raise ValueError(f"spec of {spec.name!r} given to service {self.name!r}")
        task = asyncio.create_task(self._reload(spec, progress), name=f"reload {self.name}")
        self._reloads.add(task)  # before any await: stop() must find it
        task.add_done_callback(self._reload_done)
        await asyncio.shield(task)

    def _reload_done(self, task: asyncio.Task[None]) -> None:
        self._reloads.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: its caller may have gone (shield), not an error

    async def scale(self, count: int) -> None:
        """Run `count` workers: new slots start, the highest slots drain and stop."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        async with self._lock:
            await self._scale(count)

    async def apply_live(self, spec: ServiceSpec) -> None:
        """Apply a spec that needs no new processes (`not self.spec.needs_rollout(spec)`):
        health, backoff, logs, registry settings, count (scales)."""
        if self.spec.needs_rollout(spec):
            raise ValueError(f"{self.name}: this change needs a rolling reload")
        async with self._lock:
            count = spec.count
            self.spec = dataclasses.replace(spec, count=self.spec.count)
            self.logs.update_spec(spec.logs)
            for worker in self._workers():
                if worker.generation == self.generation:
                    worker.update_live(self.spec)
            await self._scale(count)
        self._publish_changed()

    async def wait_ready(self, timeout: float) -> None:  # noqa: ASYNC109 - the API's contract
        """Wait until every desired worker is ready. Raises TimeoutError."""
        async with asyncio.timeout(timeout):
            while not self._all_ready():
                await self.changed.wait()

    async def close(self) -> None:
        """Stop every worker, release the listeners, close the log files. Idempotent."""
        await self.stop()
        if self._closed:
            return
        self._closed = True
        self._release(self.spec.listen)
        self.logs.close()

    # ----------------------------------------------------------------- status

    def status(self) -> ServiceStatus:
        workers = sorted(self._workers(), key=lambda w: (w.index, w.generation))
        rows = tuple(w.status() for w in workers)
        if not rows and not self._desired:
            rows = tuple(
                WorkerStatus.stopped_slot(self.name, i, self.generation)
                for i in range(self.spec.count)
            )
        ready = sum(1 for w in self._slots.values() if w.ready)
        return ServiceStatus(
            name=self.name,
            state=self.state.value,
            desired=self.spec.count if self._desired else 0,
            ready=ready,
            generation=self.generation,
            workers=rows,
            listen=tuple(spec.display for spec in self.spec.listen),
            required_ready=self.spec.required_ready,
            reloads=self.reloads,
            advertise=self.spec.advertise or "",
            meta=dict(self.spec.meta),
            log_lines_dropped=self.logs.dropped,
            log_lines_cut=self.logs.cut,
            templates=tuple(
                t for g in sorted(self._preloaders)
                if (t := self._preloaders[g].status()) is not None
            ),
        )

    @property
    def state(self) -> ServiceState:
        """Derived from the workers (see ServiceState)."""
        if self._reloads:
            return ServiceState.RELOADING
        if not self._desired:
            return ServiceState.STOPPED
        workers = list(self._slots.values())
        states = {w.state for w in workers}
        if WorkerState.FATAL in states:
            return ServiceState.FATAL
        if WorkerState.BACKOFF in states:
            return ServiceState.BACKOFF
        ready = sum(1 for w in workers if w.ready)
        if ready >= self.spec.required_ready:
            return ServiceState.RUNNING
        if workers and not any(w.supervising for w in workers):
            return ServiceState.STOPPED  # every worker exited under its restart policy
        if not workers or any(w.state is WorkerState.STARTING for w in workers):
            return ServiceState.STARTING
        # every process is up, too few ready (failing checks, STOPPING=1, a replacement
        # draining): running short, not starting; `ready` and the probes tell the rest
        return ServiceState.RUNNING

    @property
    def workers(self) -> list[Worker]:
        """Every worker object: the slots' and those in transition."""
        return self._workers()

    def _workers(self) -> list[Worker]:
        return [*self._slots.values(), *self._transit]

    def _all_ready(self) -> bool:
        count = self.spec.count
        return all(
            (w := self._slots.get(i)) is not None and w.ready for i in range(count)
        )

    # ----------------------------------------------------------------- internals

    def _new_worker(
        self, index: int, spec: ServiceSpec, generation: int, sockets: Sequence[socket.socket]
    ) -> Worker:
        return Worker(
            spec, index, generation, sockets, self._wdeps, self._publish_changed,
            preloader=self._preloader(spec, generation),
        )

    def _preloader(self, spec: ServiceSpec, generation: int) -> Preloader | None:
        """The generation's preload template (started by its first fork), if preloaded."""
        if not spec.preload:
            return None
        preloader = self._preloaders.get(generation)
        if preloader is None:
            preloader = self._preloaders[generation] = Preloader(
                spec, generation, reaper=self._deps.reaper, logs=self.logs,
                base_env=self._deps.base_env,
            )
        return preloader

    async def _retire_preloaders(self) -> None:
        """End the templates of generations no supervised worker belongs to any more."""
        live = {w.generation for w in self._workers() if w.supervising}
        retired = [g for g in self._preloaders if g not in live]
        await asyncio.gather(*(self._preloaders.pop(g).close() for g in retired))

    def _start_slots(self, indexes: Iterable[int]) -> list[Worker]:
        started = []
        for index in indexes:
            worker = self._slots.get(index)
            if worker is None or (not worker.supervising and worker.generation != self.generation):
                worker = self._slots[index] = self._new_worker(
                    index, self.spec, self.generation, self._sockets
                )
            worker.start()  # no-op for a running one; retries BACKOFF/FATAL at once
            started.append(worker)
        return started

    async def _stop_workers(self, workers: Iterable[Worker], reason: str) -> None:
        workers = list(workers)
        self._transit.update(workers)
        # not in a finally: when a reload is interrupted here, the workers stay in
        # `_transit` and the interrupting stop() waits for them
        await asyncio.gather(*(w.stop(reason) for w in workers))
        self._transit.difference_update(workers)
        self._publish_changed()

    async def _scale(self, count: int) -> None:
        old = self.spec.count
        self.spec = dataclasses.replace(self.spec, count=count)
        if count == old:
            return
        if self._desired:
            if count > old:
                self._start_slots(range(old, count))
            else:
                doomed = [self._slots.pop(i) for i in range(count, old) if i in self._slots]
                await self._stop_workers(doomed, f"scaled down to {count}")
                await self._retire_preloaders()
        self._deps.events.emit(
            "scaled", service=self.name, generation=self.generation,
            message=f"{old} -> {count} workers", fields={"from": old, "to": count},
        )

    def _acquire(self, listen: Sequence[ListenSpec]) -> list[socket.socket]:
        """One acquire per address; on error, nothing stays acquired (ListenerError)."""
        got: list[ListenSpec] = []
        sockets = []
        try:
            for spec in listen:
                sockets.append(self._deps.listeners.acquire(spec))
                got.append(spec)
        except BaseException:
            self._release(got)
            raise
        return sockets

    def _release(self, listen: Sequence[ListenSpec]) -> None:
        for spec in listen:
            self._deps.listeners.release(spec)

    def _publish_changed(self) -> None:
        self.changed.fire()

    # ----------------------------------------------------------------- reload

    async def _reload(self, spec: ServiceSpec | None, progress: Progress | None) -> None:
        say = progress or (lambda _line: None)
        events = self._deps.events
        try:
            async with self._lock:
                # the spec of now, not of when the reload was asked for (a scale may
                # have run in between)
                target = spec if spec is not None else self.spec
                if not self._desired:
                    # stopped (or being stopped): adopt the spec, start nothing
                    self._adopt(target)
                    events.emit("reloaded", service=self.name, generation=self.generation,
                                message="service is stopped: new spec adopted, nothing started")
                    return
                try:
                    await self._rolling(target, say)
                finally:
                    await self._retire_preloaders()  # the old generation's, or the failed one's
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            reason = "interrupted: the service was stopped"
            events.emit("reload_failed", service=self.name, generation=self.generation,
                        message=reason)
            raise ReloadFailed(reason) from None
        finally:
            self._publish_changed()

    def _adopt(self, target: ServiceSpec) -> None:
        new_sockets = self._acquire(target.listen)
        self._release(self.spec.listen)
        self._sockets = new_sockets
        self.spec = target
        self.generation += 1
        self.logs.update_spec(target.logs)

    async def _rolling(self, target: ServiceSpec, say: Progress) -> None:
        events = self._deps.events
        old_spec, old_gen, old_sockets = self.spec, self.generation, self._sockets
        new_gen = old_gen + 1
        started = time.monotonic()
        try:
            new_sockets = self._acquire(target.listen)
        except ListenerError as exc:
            events.emit("reload_failed", service=self.name, generation=old_gen,
                        message=str(exc))
            raise ReloadFailed(str(exc)) from exc
        events.emit("reload_started", service=self.name, generation=new_gen,
                    message=f"generation {old_gen} -> {new_gen}")
        say(f"{self.name}: rolling generation {old_gen} -> {new_gen}")
        drains: list[asyncio.Task[None]] = []
        rolled: list[int] = []  # slots that run a new worker
        try:
            try:
                await self._roll_slots(
                    range(min(old_spec.count, target.count)), target, new_gen, new_sockets,
                    drains, rolled, say,
                )
                if target.count > old_spec.count:
                    await self._grow(target, new_gen, new_sockets, old_spec.count, rolled, say)
            except WorkerFailed as exc:
                reason = str(exc)
                say(f"{self.name}: rolling back: {reason}")
                await self._rollback(rolled, old_spec, old_gen, old_sockets, drains, say)
                self._release(target.listen)
                events.emit("reload_failed", service=self.name, generation=old_gen,
                            message=reason, fields={"to_generation": new_gen})
                raise ReloadFailed(reason) from None
        except asyncio.CancelledError:
            # stop() interrupted us: stop what we started, leave the rest to stop()
            newer = [w for w in self._workers() if w.generation == new_gen]
            await self._stop_workers(newer, "reload interrupted")
            for index in rolled:
                if (w := self._slots.get(index)) is not None and w.generation == new_gen:
                    del self._slots[index]
            await asyncio.gather(*drains, return_exceptions=True)
            self._release(target.listen)
            raise
        # success: the slots beyond the new count drain, the old spec's listeners go
        doomed = [self._slots.pop(i) for i in range(target.count, old_spec.count)
                  if i in self._slots]
        self.spec = dataclasses.replace(target)
        self.generation = new_gen
        self._sockets = new_sockets
        self.logs.update_spec(target.logs)
        self.reloads += 1
        try:
            await asyncio.gather(
                *drains, self._stop_workers(doomed, "scaled down by reload"),
                return_exceptions=True,
            )
        finally:
            # even when stop() interrupts the drain: the old spec's hold must go
            self._release(old_spec.listen)
        took = time.monotonic() - started
        events.emit("reloaded", service=self.name, generation=new_gen,
                    message=f"generation {new_gen} ready in {took:.2f}s",
                    fields={"from_generation": old_gen, "seconds": round(took, 3)})
        say(f"{self.name}: generation {new_gen} ready in {took:.2f}s")

    async def _roll_slots(
        self,
        indexes: Iterable[int],
        spec: ServiceSpec,
        generation: int,
        sockets: Sequence[socket.socket],
        drains: list[asyncio.Task[None]],
        rolled: list[int],
        say: Progress,
    ) -> None:
        """Replace the workers of `indexes` batch by batch; raises WorkerFailed.

        On failure, the failed batch is already undone (new workers stopped, a slot
        whose old worker had been stopped gets an old-generation worker again); `rolled`
        lists the slots of earlier, successful batches.
        """
        surge = max(spec.max_surge, 0)
        unavailable = max(spec.max_unavailable, 0)
        if surge + unavailable == 0:
            surge = 1  # nothing could ever move otherwise
        batch_size = surge + unavailable
        indexes = list(indexes)
        for at in range(0, len(indexes), batch_size):
            batch = indexes[at : at + batch_size]
            await self._roll_batch(batch, spec, generation, sockets, unavailable, drains, say)
            rolled.extend(batch)

    async def _roll_batch(
        self,
        batch: list[int],
        spec: ServiceSpec,
        generation: int,
        sockets: Sequence[socket.socket],
        unavailable: int,
        drains: list[asyncio.Task[None]],
        say: Progress,
    ) -> None:
        olds = {i: self._slots.get(i) for i in batch}
        first_down: list[int] = []
        for index, old in olds.items():
            if old is None or not old.ready:
                first_down.append(index)  # serves nobody: replacing it costs nothing
            elif unavailable > 0:
                first_down.append(index)
                unavailable -= 1
        down = [old for i in first_down if (old := olds[i]) is not None]
        previous = {w.index: (w.spec, w.generation, w.sockets) for w in down}
        for index in first_down:
            self._slots.pop(index, None)
        if down:
            await self._stop_workers(down, f"replaced by generation {generation}")
        news = [self._new_worker(i, spec, generation, sockets) for i in batch]
        self._transit.update(news)
        for worker in news:
            worker.start()
            say(f"{worker.name}: starting generation {generation}")
        try:
            await self._wait_all_ready(news, spec.ready_timeout)
        except WorkerFailed:
            await self._stop_workers(news, "reload failed")
            self._transit.difference_update(news)
            for index, (old_spec, old_gen, old_sockets) in previous.items():
                # its old worker was stopped: the old generation takes the slot again
                self._slots[index] = self._new_worker(index, old_spec, old_gen, old_sockets)
                self._slots[index].start()
            raise
        for worker in news:
            self._transit.discard(worker)
            self._slots[worker.index] = worker
            say(f"{worker.name}: generation {generation} ready (pid {worker.pid})")
        for index, old in olds.items():
            if old is not None and index not in first_down:
                drains.append(asyncio.create_task(
                    self._stop_workers([old], f"replaced by generation {generation}")
                ))

    async def _grow(
        self,
        spec: ServiceSpec,
        generation: int,
        sockets: Sequence[socket.socket],
        first: int,
        rolled: list[int],
        say: Progress,
    ) -> None:
        news = [self._new_worker(i, spec, generation, sockets) for i in range(first, spec.count)]
        for worker in news:
            self._slots[worker.index] = worker
            worker.start()
        rolled.extend(w.index for w in news)
        say(f"{self.name}: {len(news)} more workers of generation {generation}")
        await self._wait_all_ready(news, spec.ready_timeout)

    async def _rollback(
        self,
        rolled: list[int],
        old_spec: ServiceSpec,
        old_gen: int,
        old_sockets: Sequence[socket.socket],
        drains: list[asyncio.Task[None]],
        say: Progress,
    ) -> None:
        """Give every rolled slot an old-generation worker again (best effort)."""
        await asyncio.gather(*drains, return_exceptions=True)
        drains.clear()
        back = [i for i in rolled if i < old_spec.count]
        extra = [self._slots.pop(i) for i in rolled if i >= old_spec.count and i in self._slots]
        await self._stop_workers(extra, "reload rolled back")
        if back:
            say(f"{self.name}: rolling slots {back} back to generation {old_gen}")
            try:
                await self._roll_slots(back, old_spec, old_gen, old_sockets, drains, [], say)
            except WorkerFailed as exc:
                # keep whatever serves now; the slots stay under their restart policy
                log.error("%s: rollback to generation %d failed: %s", self.name, old_gen, exc)
            await asyncio.gather(*drains, return_exceptions=True)

    async def _wait_all_ready(self, workers: list[Worker], within: float) -> None:
        """Raise WorkerFailed when one exits/stops first or is not ready `within` s."""
        exits = {w: w.exits for w in workers}
        try:
            async with asyncio.timeout(within):
                while True:
                    for worker in workers:
                        if worker.exits > exits[worker]:
                            raise WorkerFailed(
                                f"{worker.name} (generation {worker.generation}): "
                                f"{worker.end_reason} before it was ready"
                            )
                        if not worker.supervising:
                            raise WorkerFailed(f"{worker.name} stopped before it was ready")
                    if all(w.ready for w in workers):
                        return
                    await self.changed.wait()
        except TimeoutError:
            slow = ", ".join(w.name for w in workers if not w.ready)
            raise WorkerFailed(f"{slow} not ready within {within:g}s") from None

