"""Timers, like Workerman's `Timer::add`: run a function every N seconds or once after N.

`TimerSet` owns every timer of a worker. Timers created before the event loop runs are
armed when it starts; `stop()` cancels them all (a stopping worker runs no more timer
code). A callback may be a plain function or a coroutine function; a coroutine runs as
a task that the set tracks and cancels at stop. A repeating timer keeps a fixed rate
(the next run is planned from the previous plan, not from when the callback finished)
and skips runs it missed instead of bursting. An exception in a callback is logged and
does not stop a repeating timer.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("server_core.timers")


class Timer:
    """One scheduled callback; `cancel()` stops it (idempotent)."""

    __slots__ = ("_args", "_callback", "_deadline", "_handle", "_owner", "interval", "repeat")

    def __init__(
        self,
        owner: TimerSet,
        interval: float,
        callback: Callable[..., Any],
        args: tuple[Any, ...],
        repeat: bool,
    ) -> None:
        self._owner = owner
        self.interval = interval
        self._callback = callback
        self._args = args
        self.repeat = repeat
        self._handle: asyncio.TimerHandle | None = None
        self._deadline = 0.0

    @property
    def active(self) -> bool:
        return self in self._owner._timers

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._owner._discard(self)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self._deadline = loop.time() + self.interval
        self._handle = loop.call_at(self._deadline, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.repeat:
            now = loop.time()
            self._deadline += self.interval
            if self._deadline <= now:  # we fell behind: skip the missed runs
                self._deadline = now + self.interval
            self._handle = loop.call_at(self._deadline, self._fire, loop)
        else:
            self._handle = None
            self._owner._discard(self)
        try:
            result = self._callback(*self._args)
            if inspect.isawaitable(result):
                self._owner._spawn(result)
        except Exception:
            log.exception("timer callback %r failed", self._callback)


class TimerSet:
    """Every timer of one worker process."""

    def __init__(self) -> None:
        self._timers: set[Timer] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._timers)

    def add(
        self, interval: float, callback: Callable[..., Any], args: tuple[Any, ...], repeat: bool
    ) -> Timer:
        if not interval > 0 and repeat:
            raise ValueError(f"timer interval must be > 0, got {interval}")
        if interval < 0:
            raise ValueError(f"timer delay must be >= 0, got {interval}")
        timer = Timer(self, interval, callback, args, repeat)
        self._timers.add(timer)
        if self._loop is not None:
            timer._arm(self._loop)
        return timer

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Arm the timers created before the loop ran."""
        self._loop = loop
        for timer in list(self._timers):
            timer._arm(loop)

    def stop(self) -> None:
        """Cancel every timer and every task a timer started."""
        for timer in list(self._timers):
            timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        self._loop = None

    def _discard(self, timer: Timer) -> None:
        self._timers.discard(timer)

    def _spawn(self, awaitable: Any) -> None:
        async def run() -> None:
            try:
                await awaitable
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("timer coroutine failed")

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
