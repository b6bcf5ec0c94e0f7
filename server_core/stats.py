"""Per-process counters of a worker and the user's own metrics.

`Stats` holds the built-in numbers the agent shows in `svctl status` (connections,
requests, send failures, timers, bytes); connections bump them directly, so they are
plain attributes, not methods, to keep the hot path cheap. `MetricRegistry` holds the
counters and gauges user code creates with `worker.counter()` / `worker.gauge()`.
`snapshot()` renders both as the JSON object of the `X_SVCD_STATS` notify message:

    {"connections", "requests", "send_fail", "timers", "bytes_in", "bytes_out",
     "metrics": [{"name", "type": "counter"|"gauge", "labels": {}, "value"}]}

What counts: every connection adds to the `Stats` it was given when accepted, the
worker's, except those of a health-probe listener (svcd's `svcd-health`), which count
in a `Stats` of their own that is never reported: the supervisor's checks are not
traffic, and an idle worker checked every second must not show 1 request per second.
`send_fail` counts data the application sent or returned that never went out (after
close, beyond the hard send-buffer cap, or a return value the protocol cannot encode).

Invariants: one metric object per (name, labels); a name has one type; counters only
go up; names and label names are valid Prometheus identifiers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class Stats:
    """The built-in numbers of one worker process (mutated in place by connections)."""

    __slots__ = ("bytes_in", "bytes_out", "connections", "requests", "send_fail", "timers")

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.send_fail = 0
        self.timers = 0
        self.bytes_in = 0
        self.bytes_out = 0


class Counter:
    """A monotonically increasing number (Prometheus counter)."""

    __slots__ = ("labels", "name", "value")
    kind = "counter"

    def __init__(self, name: str, labels: dict[str, str]) -> None:
        self.name = name
        self.labels = labels
        self.value: float = 0

    def inc(self, amount: float = 1) -> None:
        """Add `amount` (>= 0; a counter never goes down)."""
        if amount < 0:
            raise ValueError(f"counter {self.name}: cannot decrease by {amount}")
        self.value += amount


class Gauge:
    """A number that goes up and down (Prometheus gauge)."""

    __slots__ = ("labels", "name", "value")
    kind = "gauge"

    def __init__(self, name: str, labels: dict[str, str]) -> None:
        self.name = name
        self.labels = labels
        self.value: float = 0

    def set(self, value: float) -> None:
        self.value = value

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount


Metric = Counter | Gauge


class MetricRegistry:
    """User metrics keyed by (name, sorted labels); asking twice returns the same object."""

    def __init__(self) -> None:
        self._metrics: dict[tuple[str, tuple[tuple[str, str], ...]], Metric] = {}
        self._kinds: dict[str, str] = {}

    def counter(self, name: str, labels: Mapping[str, str] | None = None) -> Counter:
        metric = self._get(Counter, name, labels)
        assert isinstance(metric, Counter)
        return metric

    def gauge(self, name: str, labels: Mapping[str, str] | None = None) -> Gauge:
        metric = self._get(Gauge, name, labels)
        assert isinstance(metric, Gauge)
        return metric

    def _get(
        self, cls: type[Counter] | type[Gauge], name: str, labels: Mapping[str, str] | None
    ) -> Metric:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"metric name {name!r}: not a valid Prometheus name")
        clean = {str(k): str(v) for k, v in (labels or {}).items()}
        for label in clean:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"metric {name}: label name {label!r} is not valid")
        known = self._kinds.setdefault(name, cls.kind)
        if known != cls.kind:
            raise ValueError(f"metric {name}: already registered as a {known}")
        key = (name, tuple(sorted(clean.items())))
        metric = self._metrics.get(key)
        if metric is None:
            metric = self._metrics[key] = cls(name, clean)
        return metric

    def render(self) -> list[dict[str, Any]]:
        return [
            {"name": m.name, "type": m.kind, "labels": m.labels, "value": m.value}
            for m in self._metrics.values()
        ]


def snapshot(stats: Stats, metrics: MetricRegistry) -> dict[str, Any]:
    """The X_SVCD_STATS object for this moment."""
    return {
        "connections": stats.connections,
        "requests": stats.requests,
        "send_fail": stats.send_fail,
        "timers": stats.timers,
        "bytes_in": stats.bytes_in,
        "bytes_out": stats.bytes_out,
        "metrics": metrics.render(),
    }
