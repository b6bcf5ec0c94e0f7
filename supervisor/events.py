"""Lifecycle events and their fan-out to subscribers.

Events are facts in the past tense. The supervisor publishes; the agent's log, the
`svctl events` stream, the registry and the metrics subscribe. Publishing never blocks
and never fails: a subscriber that cannot keep up loses its oldest events (and is told
how many through `EventBus.dropped`), it never slows supervision.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

#: Event types (the `type` field). Workers: started (every spawn; `restart` true after
#: the slot's first process), ready, unready, exited, backoff, fatal, unhealthy,
#: healthy, stopping, stopped, oom (max_memory). Services and agent: reload_started,
#: reloaded, reload_failed (rolled back), scaled, config_applied, config_rejected,
#: registry_connected, registry_disconnected.
EVENT_TYPES: frozenset[str] = frozenset(
    {
        "started",
        "ready",
        "unready",
        "exited",
        "backoff",
        "fatal",
        "unhealthy",
        "healthy",
        "stopping",
        "stopped",
        "oom",
        "reload_started",
        "reloaded",
        "reload_failed",
        "scaled",
        "config_applied",
        "config_rejected",
        "registry_connected",
        "registry_disconnected",
    }
)

HISTORY_SIZE = 1000
SUBSCRIBER_QUEUE = 10000


@dataclass(frozen=True)
class Event:
    """One thing that happened. `time` is wall-clock (display only)."""

    type: str
    service: str = ""
    worker: str = ""
    pid: int = 0
    generation: int = 0
    message: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "time": self.time,
            "type": self.type,
            "service": self.service,
            "worker": self.worker,
            "pid": self.pid,
            "generation": self.generation,
            "message": self.message,
        }
        out.update(self.fields)
        return out


class Subscription:
    """A bounded queue of events for one consumer; iterate it with `async for`."""

    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self._bus = bus
        self._queue: collections.deque[Event] = collections.deque(maxlen=maxsize)
        self._wakeup = asyncio.Event()
        self._ended = False
        self.dropped = 0

    def _push(self, event: Event) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(event)
        self._wakeup.set()

    async def get(self) -> Event:
        """Wait for the next event. Cancellation leaves the queue intact."""
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._queue.popleft()

    def close(self) -> None:
        self._bus._subscribers.discard(self)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        """Every queued event, then the ones that follow; ends after the bus is closed
        and the queue is empty."""
        try:
            while True:
                while not self._queue:
                    if self._ended:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                yield self._queue.popleft()
        finally:
            self.close()

    def _end(self) -> None:
        self._ended = True
        self._wakeup.set()


class EventBus:
    """Publish events to every subscriber and keep a bounded history."""

    def __init__(self, history: int = HISTORY_SIZE) -> None:
        self._history: collections.deque[Event] = collections.deque(maxlen=history)
        self._subscribers: set[Subscription] = set()
        self._closed = False

    def publish(self, event: Event) -> None:
        """Record and fan out `event`; never blocks, never raises."""
        self._history.append(event)
        for sub in list(self._subscribers):
            sub._push(event)

    def emit(self, type: str, **kwargs: Any) -> Event:
        """Build and publish an Event; returns it."""
        event = Event(type=type, **kwargs)
        self.publish(event)
        return event

    def history(self) -> list[Event]:
        return list(self._history)

    def subscribe(
        self, *, replay: Iterable[Event] = (), maxsize: int = SUBSCRIBER_QUEUE
    ) -> Subscription:
        """Start receiving events; `replay` is pushed first (e.g. `history()`)."""
        sub = Subscription(self, maxsize)
        for event in replay:
            sub._push(event)
        if self._closed:
            sub._end()
        else:
            self._subscribers.add(sub)
        return sub

    def close(self) -> None:
        """End every subscription (its iterator finishes after what is queued), so a
        follower sees the end of the stream rather than a broken one; later events are
        still recorded. Idempotent."""
        self._closed = True
        for sub in list(self._subscribers):
            sub._end()
        self._subscribers.clear()
