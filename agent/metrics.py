"""Prometheus metrics: a collector over the supervisor's status views, and `/metrics`.

`MetricsCollector` renders every series from a fresh snapshot at each scrape (nothing is
kept between scrapes), so:
- every configured service has all its per-service series from the start (counters at
  0, `svcd_registry_connected` 0 when there is no registry), and dashboards never see
  a gap;
- the series of a worker that is gone (scaled down, old generation after a reload)
  disappear instead of freezing at their last value.

During a rolling reload an old and a new process briefly share one worker slot
(`api:0`, generations N and N+1). A slot is one `worker` label, so only one of them is
rendered: the running one, and of two running ones the newer generation.

Workers' own counters and gauges (`WorkerStatus.metrics`, reported over sd_notify) are
exported as `svcd_app_<name>` with their labels plus `service` and `worker`; names and
labels are sanitised, counters end in `_total`, and a sample that would clash with one
already rendered (same name and labels, or a counter and a gauge on one name) is
dropped rather than making the whole scrape invalid.

`MetricsServer` answers `GET /metrics` in the Prometheus text format from an asyncio
server on the agent's loop (no threads); anything else is 404, requests are bounded in
size and time, one request per connection. A scrape runs on the loop, so it is rendered
by `render_text`, which writes exactly what `prometheus_client.generate_latest` would
(a test compares them byte for byte) in about a third of the time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import psutil
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from agent import __version__
from supervisor.states import ServiceState, WorkerState
from supervisor.status import ServiceStatus, WorkerStatus

log = logging.getLogger(__name__)

SERVICE = "service"
WORKER = "worker"
WORKER_LABELS = (SERVICE, WORKER)
SERVICE_LABELS = (SERVICE,)

HEALTH_STATES = ("passing", "failing", "unknown")
WORKER_STATES = tuple(s.value for s in WorkerState)
SERVICE_STATES = tuple(s.value for s in ServiceState)
WORKER_STATE_UP = WorkerState.RUNNING.value

APP_PREFIX = "svcd_app_"
#: A worker reporting more user series than this gets the rest dropped (cardinality).
MAX_APP_SAMPLES_PER_WORKER = 1000
MAX_LABEL_VALUE = 256

#: Worker-level gauges: metric name -> (help, WorkerStatus attribute).
_WORKER_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("svcd_worker_rss_bytes", "Resident memory of the worker's process tree.", "rss_bytes"),
    ("svcd_worker_connections", "Open connections the worker reports.", "connections"),
    ("svcd_worker_qps", "Requests per second over the last reports.", "qps"),
    ("svcd_worker_open_fds", "Open file descriptors of the worker's process tree.", "num_fds"),
    ("svcd_worker_threads", "Threads of the worker's process tree.", "num_threads"),
    ("svcd_worker_timers", "Active timers the worker reports.", "timers"),
    ("svcd_worker_generation", "Reload generation of the worker's process.", "generation"),
    ("svcd_worker_pid", "Process id of the worker (0 when it has none).", "pid"),
    ("svcd_worker_uptime_seconds", "Seconds since the worker's process started.", "uptime_s"),
    ("svcd_worker_start_time_seconds", "Unix time the worker's process started.", "started_at"),
)
#: Worker-level counters: metric name without _total -> (help, WorkerStatus attribute).
_WORKER_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("svcd_worker_restarts", "Times the worker slot was restarted.", "restarts"),
    ("svcd_worker_cpu_seconds", "CPU seconds of the worker's process tree.", "cpu_seconds"),
    ("svcd_worker_requests", "Requests the worker's process has served.", "requests"),
    ("svcd_worker_send_fail", "Sends the worker's process failed.", "send_fail"),
    ("svcd_worker_received_bytes", "Bytes the worker's process received.", "bytes_in"),
    ("svcd_worker_sent_bytes", "Bytes the worker's process sent.", "bytes_out"),
)

#: Every sample name this module can render, except the workers' own `svcd_app_*`.
#: (Alert rules and dashboards are checked against it.)
METRIC_NAMES: frozenset[str] = frozenset(
    {
        "svcd_worker_up",
        "svcd_worker_ready",
        "svcd_worker_healthy",
        "svcd_worker_health",
        "svcd_worker_state",
        "svcd_worker_exits_total",
        *(name for name, _, _ in _WORKER_GAUGES),
        *(name + "_total" for name, _, _ in _WORKER_COUNTERS),
        "svcd_service_up",
        "svcd_service_ready",
        "svcd_service_state",
        "svcd_service_ready_workers",
        "svcd_service_desired_workers",
        "svcd_service_required_ready_workers",
        "svcd_service_generation",
        "svcd_reloads_total",
        "svcd_reload_failures_total",
        "svcd_log_lines_dropped_total",
        "svcd_log_lines_cut_total",
        "svcd_registry_connected",
        "svcd_registry_enabled",
        "svcd_agent_info",
        "svcd_agent_cpu_seconds_total",
        "svcd_agent_rss_bytes",
        "svcd_agent_open_fds",
        "svcd_agent_threads",
        "svcd_agent_start_time_seconds",
    }
)

StatusesFn = Callable[[], Sequence[ServiceStatus]]
CountsFn = Callable[[], Mapping[str, int]]
ConnectedFn = Callable[[], bool | None]


def _no_counts() -> Mapping[str, int]:
    return {}


class MetricsCollector:
    """A prometheus_client custom collector; register it in a private `CollectorRegistry`.

    statuses: the current `ServiceStatus` of every configured service.
    reloads / reload_failures: per-service counts of rolling reloads done / rolled back.
    registry_connected: True/False, or None when no registry is configured.
    Each callable is called once per scrape, on the scraping thread (the event loop for
    `MetricsServer`), and must not block.
    """

    def __init__(
        self,
        statuses: StatusesFn,
        reloads: CountsFn = _no_counts,
        registry_connected: ConnectedFn = lambda: None,
        reload_failures: CountsFn = _no_counts,
    ) -> None:
        self._statuses = statuses
        self._reloads = reloads
        self._registry_connected = registry_connected
        self._reload_failures = reload_failures
        self._process = psutil.Process()

    def collect(self) -> Iterator[Metric]:
        services = list(self._statuses())
        yield from self._worker_metrics(services)
        yield from self._service_metrics(services)
        yield from self._agent_metrics()
        yield from app_metrics(services)

    # -- workers ------------------------------------------------------------------

    def _worker_metrics(self, services: Sequence[ServiceStatus]) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "svcd_worker_up", "1 when the worker is running.", labels=WORKER_LABELS
        )
        ready = GaugeMetricFamily(
            "svcd_worker_ready", "1 when the worker is ready (counts for its service).",
            labels=WORKER_LABELS,
        )
        healthy = GaugeMetricFamily(
            "svcd_worker_healthy", "1 when the worker's health check is passing.",
            labels=WORKER_LABELS,
        )
        health = GaugeMetricFamily(
            "svcd_worker_health", "1 for the worker's current health state.",
            labels=(*WORKER_LABELS, "health"),
        )
        state = GaugeMetricFamily(
            "svcd_worker_state", "1 for the worker's current state.",
            labels=(*WORKER_LABELS, "state"),
        )
        exits = CounterMetricFamily(
            "svcd_worker_exits", "Exits of the worker slot's processes, by exit status.",
            labels=(*WORKER_LABELS, "exit"),
        )
        gauges = [
            (GaugeMetricFamily(name, doc, labels=WORKER_LABELS), attr)
            for name, doc, attr in _WORKER_GAUGES
        ]
        counters = [
            (CounterMetricFamily(name, doc, labels=WORKER_LABELS), attr)
            for name, doc, attr in _WORKER_COUNTERS
        ]
        for svc in services:
            for w in current_workers(svc.workers):
                labels = [svc.name, w.worker]
                up.add_metric(labels, float(w.state == WORKER_STATE_UP))
                ready.add_metric(labels, float(w.ready))
                healthy.add_metric(labels, float(w.health == "passing"))
                for name in HEALTH_STATES:
                    health.add_metric([*labels, name], float(w.health == name))
                for name in WORKER_STATES:
                    state.add_metric([*labels, name], float(w.state == name))
                for exit_status, count in sorted(w.exit_counts.items()):
                    exits.add_metric([*labels, str(exit_status)], _number(count))
                for gauge, attr in gauges:
                    gauge.add_metric(labels, _number(getattr(w, attr)))
                for counter, attr in counters:
                    counter.add_metric(labels, _number(getattr(w, attr)))
        yield from (up, ready, healthy, health, state, exits)
        yield from (g for g, _ in gauges)
        yield from (c for c, _ in counters)

    # -- services and the agent ---------------------------------------------------------

    def _service_metrics(self, services: Sequence[ServiceStatus]) -> Iterator[Metric]:
        reloads = self._reloads()
        failures = self._reload_failures()
        families = {
            "up": GaugeMetricFamily(
                "svcd_service_up", "1 unless the service is stopped.", labels=SERVICE_LABELS
            ),
            "ready": GaugeMetricFamily(
                "svcd_service_ready",
                "1 when the service runs with at least its required ready workers.",
                labels=SERVICE_LABELS,
            ),
            "ready_workers": GaugeMetricFamily(
                "svcd_service_ready_workers", "Ready workers of the service.", labels=SERVICE_LABELS
            ),
            "desired": GaugeMetricFamily(
                "svcd_service_desired_workers",
                "Workers the service should run now (0 while stopped).",
                labels=SERVICE_LABELS,
            ),
            "required": GaugeMetricFamily(
                "svcd_service_required_ready_workers",
                "Ready workers the service needs to count as ready (min_ready).",
                labels=SERVICE_LABELS,
            ),
            "generation": GaugeMetricFamily(
                "svcd_service_generation", "Current reload generation.", labels=SERVICE_LABELS
            ),
        }
        state = GaugeMetricFamily(
            "svcd_service_state", "1 for the service's current state.",
            labels=(SERVICE, "state"),
        )
        reloads_total = CounterMetricFamily(
            "svcd_reloads", "Rolling reloads of the service.", labels=SERVICE_LABELS
        )
        failures_total = CounterMetricFamily(
            "svcd_reload_failures", "Rolling reloads that failed and were rolled back.",
            labels=SERVICE_LABELS,
        )
        # a full disk or a flood loses file lines, never supervision: count it visibly
        dropped = CounterMetricFamily(
            "svcd_log_lines_dropped",
            "Captured worker output lines the service's log file could not take.",
            labels=SERVICE_LABELS,
        )
        cut = CounterMetricFamily(
            "svcd_log_lines_cut", "Worker output lines cut at the service's max_line.",
            labels=SERVICE_LABELS,
        )
        for svc in services:
            label = [svc.name]
            required = required_ready(svc)
            running = svc.state != ServiceState.STOPPED.value
            families["up"].add_metric(label, float(running))
            families["ready"].add_metric(label, float(running and svc.ready >= required))
            families["ready_workers"].add_metric(label, float(svc.ready))
            families["desired"].add_metric(label, float(svc.desired))
            families["required"].add_metric(label, float(required))
            families["generation"].add_metric(label, float(svc.generation))
            for name in SERVICE_STATES:
                state.add_metric([svc.name, name], float(svc.state == name))
            reloads_total.add_metric(label, float(reloads.get(svc.name, svc.reloads)))
            failures_total.add_metric(label, float(failures.get(svc.name, 0)))
            dropped.add_metric(label, float(svc.log_lines_dropped))
            cut.add_metric(label, float(svc.log_lines_cut))
        yield from families.values()
        yield from (state, reloads_total, failures_total, dropped, cut)

        connected = self._registry_connected()
        registry = GaugeMetricFamily(
            "svcd_registry_connected", "1 while the agent's etcd session is up."
        )
        registry.add_metric([], float(bool(connected)))
        enabled = GaugeMetricFamily(
            "svcd_registry_enabled", "1 when a registry is configured."
        )
        enabled.add_metric([], float(connected is not None))
        yield from (registry, enabled)

    def _agent_metrics(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("svcd_agent_info", "The agent's version.", labels=("version",))
        info.add_metric([__version__], 1.0)
        yield info
        proc = self._process
        try:
            with proc.oneshot():
                cpu = proc.cpu_times()
                rss = proc.memory_info().rss
                fds = proc.num_fds()
                threads = proc.num_threads()
                started = proc.create_time()
        except psutil.Error:
            log.warning("cannot read the agent's own process figures", exc_info=True)
            return
        yield CounterMetricFamily(
            "svcd_agent_cpu_seconds", "CPU seconds of the agent process.",
            value=cpu.user + cpu.system,
        )
        yield GaugeMetricFamily("svcd_agent_rss_bytes", "Resident memory of the agent.", value=rss)
        yield GaugeMetricFamily("svcd_agent_open_fds", "Open fds of the agent.", value=fds)
        yield GaugeMetricFamily("svcd_agent_threads", "Threads of the agent.", value=threads)
        yield GaugeMetricFamily(
            "svcd_agent_start_time_seconds", "Unix time the agent started.", value=started
        )


def required_ready(svc: ServiceStatus) -> int:
    """Ready workers the service needs: min_ready, but at least one when any is desired.

    The same rule as the agent's `"<service>"` gRPC health answer (AgentCore.service_ready),
    so that `svcd_service_ready` and the probe never disagree.
    """
    return max(svc.required_ready, 1 if svc.desired else 0)


def current_workers(workers: Iterable[WorkerStatus]) -> list[WorkerStatus]:
    """One status per worker slot: a running process first, then the newer generation."""
    best: dict[str, WorkerStatus] = {}
    for w in workers:
        seen = best.get(w.worker)
        if seen is None or _rank(w) > _rank(seen):
            best[w.worker] = w
    return list(best.values())


def _rank(w: WorkerStatus) -> tuple[bool, int]:
    return (w.state == WORKER_STATE_UP, w.generation)


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# -- the workers' own metrics -----------------------------------------------------------

_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def sanitize_name(name: str) -> str:
    """A valid Prometheus name part: [a-zA-Z0-9_] only, never empty."""
    clean = _INVALID_NAME_CHARS.sub("_", name).strip("_")
    return clean or "unnamed"


def sanitize_label(name: str) -> str:
    """A valid label name that cannot clash with svcd's labels or the reserved `__`."""
    clean = _INVALID_NAME_CHARS.sub("_", name).lstrip("_") or "label"
    if clean[0].isdigit():
        clean = "_" + clean
    if clean in WORKER_LABELS:
        clean = "app_" + clean
    return clean


def app_metrics(services: Sequence[ServiceStatus]) -> list[Metric]:
    """`svcd_app_*` families from every current worker's reported metrics."""
    families: dict[str, Metric] = {}
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for svc in services:
        for w in current_workers(svc.workers):
            for entry in w.metrics[:MAX_APP_SAMPLES_PER_WORKER]:
                parsed = _parse_app_metric(entry)
                if parsed is None:
                    continue
                family_name, kind, labels, value = parsed
                family = families.get(family_name)
                if family is None:
                    family = Metric(family_name, "Reported by the workers.", kind)
                    families[family_name] = family
                elif family.type != kind:
                    continue  # one name, two types: keep the first the scrape saw
                labels[SERVICE] = svc.name
                labels[WORKER] = w.worker
                sample = family_name + ("_total" if kind == "counter" else "")
                key = (sample, tuple(sorted(labels.items())))
                if key in seen:
                    continue
                seen.add(key)
                family.add_sample(sample, labels, value)
    # A gauge `x_total` and a counter `x` would both expose `svcd_app_x_total`.
    exposed = {n + "_total" for n, f in families.items() if f.type == "counter"}
    return [f for n, f in families.items() if f.type == "counter" or n not in exposed]


def _parse_app_metric(entry: Any) -> tuple[str, str, dict[str, str], float] | None:
    """(family name, type, labels, value) of one reported metric, None when malformed."""
    if not isinstance(entry, Mapping):
        return None
    name = entry.get("name")
    value = entry.get("value")
    if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    kind = entry.get("type", "gauge")
    if kind not in ("counter", "gauge"):
        return None
    base = sanitize_name(name)
    if kind == "counter" and base.endswith("_total"):
        base = base[: -len("_total")] or "unnamed"
    raw_labels = entry.get("labels") or {}
    if not isinstance(raw_labels, Mapping):
        return None
    labels = {
        sanitize_label(str(k)): str(v)[:MAX_LABEL_VALUE] for k, v in raw_labels.items()
    }
    try:
        number = float(value)
    except OverflowError:  # an integer beyond a double: JSON puts no limit on them
        return None
    return APP_PREFIX + base, kind, labels, number


# -- the text format ------------------------------------------------------------------------

_SIMPLE_TYPES = frozenset({"counter", "gauge"})
#: Go's float formatting (+Inf, NaN, 1e+06), as the text format wants it.
_go_float: Callable[[float], str] = floatToGoString


def _escape_value(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def render_text(families: Iterable[Metric]) -> bytes:
    """The Prometheus text format (0.0.4) of `families`, byte for byte what
    `prometheus_client.generate_latest` writes, at a fraction of its cost.

    generate_latest validates and escapes every label *name* of every sample, which costs
    most of a scrape with hundreds of workers; here names are valid by construction
    (svcd's own, or sanitised app metrics), so only label values are escaped. Families
    of other types, or samples with timestamps, go through generate_latest itself.
    """
    out: list[str] = []
    for metric in families:
        if not _simple(metric):
            out.append(generate_latest(StaticCollector([metric])).decode("utf-8"))
            continue
        name = metric.name + "_total" if metric.type == "counter" else metric.name
        doc = metric.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {metric.type}\n")
        for sample in metric.samples:
            if sample.labels:
                labels = ",".join(
                    f'{k}="{_escape_value(v)}"' for k, v in sorted(sample.labels.items())
                )
                out.append(f"{sample.name}{{{labels}}} {_go_float(sample.value)}\n")
            else:
                out.append(f"{sample.name} {_go_float(sample.value)}\n")
    return "".join(out).encode("utf-8")


def _simple(metric: Metric) -> bool:
    """A counter or gauge with plain samples (no timestamps, no `_created` and the like)."""
    if metric.type not in _SIMPLE_TYPES:
        return False
    names = (metric.name, metric.name + "_total")
    return all(s.timestamp is None and s.name in names for s in metric.samples)


class StaticCollector:
    """A one-shot collector over given families (to hand them to generate_latest)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


# -- /metrics over HTTP -------------------------------------------------------------------

#: Request line plus headers; Prometheus sends a few hundred bytes.
MAX_REQUEST_BYTES = 8192
MAX_HEADER_LINES = 64
#: A client that has not sent its request by then is dropped (slowloris).
REQUEST_TIMEOUT = 10.0
#: Closing: how long open connections get to finish before they are cut.
STOP_GRACE = 2.0
METRICS_PATH = "/metrics"

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error"}


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); raises ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bad address {address!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if number > 65535:
        raise ValueError(f"bad address {address!r}: port out of range")
    return host, number


class MetricsServer:
    """`GET /metrics` on `address` from the agent's event loop.

    `start()` binds (raises OSError when it cannot); `stop()` closes the listener and
    every open connection. `port` is the bound port (useful with port 0).
    """

    def __init__(self, address: str, collector: MetricsCollector) -> None:
        self._host, self._port = parse_address(address)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._reading: set[asyncio.Task[None]] = set()  # no request yet: cut at stop

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host or "127.0.0.1"
        return f"http://{host}:{self.port}{METRICS_PATH}"

    async def start(self) -> None:
        """Bind and serve; raises OSError when the address cannot be bound."""
        self._server = await asyncio.start_server(
            self._handle, self._host or None, self._port, limit=MAX_REQUEST_BYTES
        )

    async def stop(self) -> None:
        """Stop listening; cut idle connections, give answers in flight STOP_GRACE."""
        if self._server is None:
            return
        self._server.close()
        for task in self._reading:
            task.cancel()
        handlers = list(self._handlers)
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=STOP_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    def render(self) -> bytes:
        """The current exposition (what a scrape returns)."""
        return render_text(self.registry.collect())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            self._reading.add(task)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request_line = await _read_request(reader)
                if task is not None:
                    self._reading.discard(task)
                status, body, head_only = self._respond(request_line)
                await _write_response(writer, status, body, head_only)
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            pass  # the client went away or was too slow: nothing to answer
        except (ValueError, asyncio.LimitOverrunError):
            with contextlib.suppress(OSError):
                await _write_response(writer, 400, b"request too large\n", False)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            if task is not None:
                self._handlers.discard(task)
                self._reading.discard(task)

    def _respond(self, request_line: bytes) -> tuple[int, bytes, bool]:
        parts = request_line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, b"bad request\n", False
        method, target, _ = parts
        path = target.split("?", 1)[0]
        if path != METRICS_PATH:
            return 404, b"not found; try /metrics\n", method == "HEAD"
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", False
        started = time.monotonic()
        try:
            body = self.render()
        except Exception:
            log.exception("rendering /metrics failed")
            return 500, b"metrics collection failed\n", False
        log.debug("rendered /metrics in %.3fs", time.monotonic() - started)
        return 200, body, method == "HEAD"


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    """The request line, after reading (and ignoring) the headers, bounded in size."""
    request_line = await reader.readuntil(b"\n")
    total = len(request_line)
    for _ in range(MAX_HEADER_LINES):
        line = await reader.readuntil(b"\n")
        total += len(line)
        if total > MAX_REQUEST_BYTES:
            raise ValueError("request too large")
        if line in (b"\r\n", b"\n"):
            return request_line
    raise ValueError("too many headers")


async def _write_response(
    writer: asyncio.StreamWriter, status: int, body: bytes, head_only: bool
) -> None:
    # 0.0.4: every name here is a legacy (non-UTF-8) name, and every scraper reads it.
    content_type = CONTENT_TYPE_PLAIN_0_0_4 if status == 200 else "text/plain; charset=utf-8"
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + (b"" if head_only else body))
    await writer.drain()
