"""The sub-tables of a service: `health`, `backoff`, `logs` and `registry`.

Each reader takes the sub-table (None when the service has none) and returns the spec
with every unset value at the `supervisor.spec` default, after the checks between its
own keys (a health timeout shorter than the interval, a backoff `max` not below
`first_delay`, a check kind that uses the keys given).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from agent.config import values
from agent.config.addresses import format_address, host_port
from agent.config.model import LOG_FORMATS
from agent.config.table import Table
from agent.config.values import Invalid
from agent.config.wording import one_of, show
from supervisor.spec import BackoffSpec, HealthKind, HealthSpec, ListenSpec, LogSpec, OnFailure

MAX_THRESHOLD = 1000  #: health rise/fall, backoff start_limit
MAX_FACTOR = 100.0  #: backoff growth per failure
MAX_LOG_LINE = 1024 * 1024  #: longest captured log line before it is split
MAX_RING_LINES = 1_000_000
MAX_BACKUPS = 1000
DEFAULT_HEALTH_TIMEOUT = HealthSpec.timeout

HEALTH_KINDS: dict[str, HealthKind] = {
    "http": "http",
    "tcp": "tcp",
    "grpc": "grpc",
    "exec": "exec",
    "none": "none",
}
ON_FAILURE: dict[str, OnFailure] = {"restart": "restart", "unready": "unready"}
#: health keys that only one kind of check reads
KIND_ONLY = {"path": "http", "expect_status": "http", "command": "exec", "grpc_service": "grpc"}


def read_health(t: Table | None) -> HealthSpec | None:
    """The health check: no table means none; None when the kind is unusable (reported)."""
    if t is None:
        return HealthSpec()
    kind = t.choice("kind", HEALTH_KINDS, None)
    if kind is None and not t.has("kind"):
        t.problem("kind", f"is required in a health table: one of {one_of(HEALTH_KINDS)}")
    path = t.string("path", HealthSpec.path)
    if not path.startswith("/"):
        t.problem("path", f'must start with "/", got {show(path)}')
    expect = t.get("expect_status", HealthSpec.expect_status, values.status_range)
    command = t.argv("command")
    grpc_service = t.string("grpc_service", "", empty_ok=True)
    interval = t.duration("interval", HealthSpec.interval)
    # an unset timeout follows a short interval down, so interval = 0.5 alone is valid
    timeout = t.duration("timeout", min(DEFAULT_HEALTH_TIMEOUT, interval / 2))
    rise = t.integer("rise", HealthSpec.rise, minimum=1, maximum=MAX_THRESHOLD)
    fall = t.integer("fall", HealthSpec.fall, minimum=1, maximum=MAX_THRESHOLD)
    start_period = t.duration("start_period", HealthSpec.start_period, zero_ok=True)
    on_failure = t.choice("on_failure", ON_FAILURE, HealthSpec.on_failure)
    t.finish()
    if timeout >= interval and t.ok("timeout", "interval"):
        t.problem("timeout", f"must be shorter than interval ({interval:g} s), got {timeout:g}")
    if kind is None:
        return None
    if kind == "exec" and command is None and not t.has("command"):
        t.problem("command", 'is required with kind = "exec"')
    for key, needs in KIND_ONLY.items():
        if t.has(key) and kind != needs:
            t.problem(key, f'is only used with kind = "{needs}" (kind is "{kind}")')
    return HealthSpec(
        kind=kind,
        path=path,
        expect_status=expect,
        command=command or (),
        grpc_service=grpc_service,
        interval=interval,
        timeout=timeout,
        rise=rise,
        fall=fall,
        start_period=start_period,
        on_failure=on_failure,
    )


def read_backoff(t: Table | None) -> BackoffSpec:
    if t is None:
        return BackoffSpec()
    b = BackoffSpec
    initial = t.duration("initial", b.initial, zero_ok=True)
    first_delay = t.duration("first_delay", b.first_delay, zero_ok=True)
    factor = t.number("factor", b.factor, minimum=1.0, maximum=MAX_FACTOR)
    maximum = t.duration("max", b.max)
    jitter = t.number("jitter", b.jitter, minimum=0.0, maximum=1.0)
    stable_after = t.duration("stable_after", b.stable_after)
    start_limit = t.integer("start_limit", b.start_limit, minimum=1, maximum=MAX_THRESHOLD)
    fatal_retry = t.duration("fatal_retry", b.fatal_retry)
    t.finish()
    if maximum < first_delay and t.ok("max", "first_delay"):
        t.problem("max", f"must be >= first_delay ({first_delay:g} s), got {maximum:g}")
    return BackoffSpec(
        initial=initial,
        first_delay=first_delay,
        factor=factor,
        max=maximum,
        jitter=jitter,
        stable_after=stable_after,
        start_limit=start_limit,
        fatal_retry=fatal_retry,
    )


def read_logs(t: Table | None) -> LogSpec:
    if t is None:
        return LogSpec()
    spec = LogSpec
    max_bytes = t.size("max_bytes", spec.max_bytes)
    # max_size is the friendlier alias ("10MiB"); both at once would be ambiguous
    max_size = t.size("max_size", None)
    if max_size is not None:
        if t.has("max_bytes"):
            t.problem("max_size", "max_bytes and max_size are the same setting: keep one")
        max_bytes = max_size
    backups = t.integer("backups", spec.backups, minimum=0, maximum=MAX_BACKUPS)
    ring_lines = t.integer("ring_lines", spec.ring_lines, minimum=0, maximum=MAX_RING_LINES)
    max_line = t.size("max_line", spec.max_line)
    if max_line > MAX_LOG_LINE:
        t.problem("max_line", f"must be <= {MAX_LOG_LINE} bytes, got {max_line}")
        max_line = spec.max_line
    log_format = t.choice("format", LOG_FORMATS, spec.format)
    t.finish()
    return LogSpec(
        max_bytes=max_bytes,
        backups=backups,
        ring_lines=ring_lines,
        max_line=max_line,
        format=log_format,
    )


def read_service_registry(
    t: Table | None, default_delay: float, listen: tuple[ListenSpec, ...]
) -> tuple[str | None, float, Mapping[str, str]]:
    """`[services.X.registry]`: the advertised address, deregister delay and meta."""
    if t is None:
        return None, default_delay, MappingProxyType({})
    advertise_text = t.string("advertise", None)
    advertise = None
    if advertise_text is not None:
        parsed = host_port(advertise_text, require_port=False)
        if isinstance(parsed, Invalid):
            t.problem("advertise", f"{parsed.reason} (expected HOST or HOST:PORT)")
        else:
            host, port = parsed
            if port is None and not any(spec.scheme == "tcp" for spec in listen):
                t.problem("advertise", "needs a port: the service has no tcp:// listener")
            advertise = host if port is None else format_address(host, port)
    delay = t.duration("deregister_delay", default_delay, zero_ok=True)
    meta = t.string_table("meta", env=False)
    t.finish()
    return advertise, delay, meta if meta is not None else MappingProxyType({})
