"""svcd's config: TOML (plus includes) parsed once into frozen dataclasses, and reload plans.

Responsibility: turn `svcd.toml` and the files it includes into a `Config` whose every
value has been checked, or raise one `ConfigError` listing *every* problem found, each
naming its file, its dotted key and the reason (`svcd.toml: services.api.count: must be
>= 1, got 0`). Nothing downstream re-validates: the supervisor trusts a `ServiceSpec`.

Invariants:
- A config is parsed once; the result is immutable (frozen dataclasses, mappingproxy).
- Parsing never runs user code and never executes a command: a string `command` is
  split with shlex and nothing else. It reads only the config files themselves (regular
  files, 1 MiB each at most, a bounded number, bounded include depth) and checks that
  referenced paths exist (`cwd`, `env_file`, TLS files) and users/groups resolve.
- Any input yields a `Config` or a `ConfigError`; no other exception escapes for any
  TOML text (a fuzz test holds us to it).
- Relative paths resolve against the directory of the file that wrote them.
- Every key that is read is marked; whatever is left in a table is an unknown key.

`plan(old, new)` compares two configs and says what a reload does: services added,
removed, rolled (new processes), changed live, unchanged, and agent settings that only
an agent restart applies.
"""

from __future__ import annotations

import difflib
import enum
import glob
import grp
import ipaddress
import itertools
import json
import math
import os
import pwd
import re
import resource
import shlex
import signal
import socket
import stat
import sys
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import date, datetime, time
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any, Literal, TextIO, TypeVar

from agent import paths
from supervisor.spec import (
    ROLLOUT_FIELDS,
    BackoffSpec,
    HealthKind,
    HealthSpec,
    ListenSpec,
    LogSpec,
    OnFailure,
    ReadyMode,
    RestartPolicy,
    ServiceSpec,
)

__all__ = [
    "AgentSettings",
    "Change",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "RegistrySettings",
    "ReloadPlan",
    "ServicePlan",
    "check_config_main",
    "load_config",
    "parse_config",
    "plan",
]

# ---------------------------------------------------------------------------------------
# limits and vocabularies

MAX_FILE_BYTES = 1024 * 1024  #: one config file, main or included
MAX_INCLUDE_DEPTH = 8  #: main -> a -> b ... ; deeper is almost surely a cycle or a mistake
MAX_INCLUDE_FILES = 128  #: total files read for one config
MAX_WORKERS = 1024  #: per service; a typo such as count = 10000 must not fork-bomb the host
MAX_DURATION = 30 * 24 * 3600.0  #: seconds; larger values overflow timers or mean a typo
MAX_SIZE = 1 << 50  #: bytes (1 PiB)
MIN_MAX_MEMORY = 1024 * 1024  #: below 1 MiB no process runs: "512" surely meant "512MiB"
MAX_LOG_LINE = 1024 * 1024  #: longest captured log line before it is split
MAX_RING_LINES = 1_000_000
MAX_BACKUPS = 1000
MAX_THRESHOLD = 1000  #: health rise/fall, backoff start_limit
MAX_BACKLOG = 65535
MAX_RLIMIT = 2**63 - 1  #: rlim_t; larger is "unlimited", which users spell out
MAX_TTL = 24 * 3600  #: etcd lease TTL, seconds
MAX_ID = 2**32 - 2  #: largest uid/gid (2**32 - 1 is "no id")
MAX_NAME = 63  #: service name length (it appears in etcd keys, fd names, metrics labels)
MAX_AGENT_NAME = 253
#: sun_path is 108 bytes including the NUL (grpc also fails above 107, see FACTS.md)
MAX_UNIX_PATH = 107
MAX_SHOWN = 60  #: characters of a bad value quoted back in a message
DEFAULT_SOCKET_MODE = 0o600
GROUP_SOCKET_MODE = 0o660  #: default when `control_group` is set: the group may connect
DEFAULT_TTL = 10
DEFAULT_REGISTRY_TIMEOUT = 5.0
DEFAULT_PREFIX = "/svcd"
DEFAULT_HEALTH_TIMEOUT = HealthSpec.timeout
HINT_CUTOFF = 0.6  #: difflib similarity for "did you mean"

SERVICE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
AGENT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
DURATION_RE = re.compile(r"\s*(\d{1,15}(?:\.\d{1,9})?)\s*(ms|s|m|h)?\s*")
SIZE_RE = re.compile(r"\s*(\d{1,20}(?:\.\d{1,9})?)\s*([A-Za-z]*)\s*")
STATUS_RANGE_RE = re.compile(r"\s*(\d{3})\s*(?:-\s*(\d{3})\s*)?")
INDEXED_RE = re.compile(r"(.*?)((?:\[\d+\])+)")
TOML_POSITION_RE = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$", re.DOTALL)

DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
#: IEC units are binary; single letters are binary too (as systemd and docker read
#: them); kB/MB/GB are decimal (SI)
SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 1000,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 1000**2,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 1000**3,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 1000**4,
}

RESTART: dict[str, RestartPolicy] = {
    "always": "always",
    "on-failure": "on-failure",
    "never": "never",
}
READY: dict[str, ReadyMode] = {"notify": "notify", "health": "health", "started": "started"}
HEALTH_KINDS: dict[str, HealthKind] = {
    "http": "http",
    "tcp": "tcp",
    "grpc": "grpc",
    "exec": "exec",
    "none": "none",
}
ON_FAILURE: dict[str, OnFailure] = {"restart": "restart", "unready": "unready"}
LogFormat = Literal["text", "json"]
LOG_FORMATS: dict[str, LogFormat] = {"text": "text", "json": "json"}
Role = Literal["read", "admin"]
ROLES: dict[str, Role] = {"read": "read", "admin": "admin"}

#: set by svcd for every worker (SPEC.md "Protocols"); a service may not override them
RESERVED_ENV = frozenset(
    {
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "SVCD_SERVICE",
        "SVCD_WORKER",
    }
)
#: grpc.health.v1 service names the agent answers itself, and the private fd name
RESERVED_SERVICE_NAMES = frozenset({"liveness", "readiness", "svcd-health"})

RLIMITS = frozenset(n[len("RLIMIT_") :].lower() for n in dir(resource) if n.startswith("RLIMIT_"))
#: limits counted in bytes accept sizes such as "8MiB"
BYTE_RLIMITS = frozenset({"as", "core", "data", "fsize", "memlock", "msgqueue", "rss", "stack"})
UNLIMITED = ("unlimited", "infinity")

#: names other tools use for our keys, for "did you mean"
ALIASES = {
    "workers": "count",
    "numprocs": "count",
    "instances": "count",
    "processes": "count",
    "directory": "cwd",
    "workdir": "cwd",
    "working_directory": "cwd",
    "environment": "env",
    "autorestart": "restart",
    "stopsignal": "stop_signal",
    "kill_signal": "stop_signal",
    "port": "listen",
    "bind": "listen",
    "args": "command",
    "cmd": "command",
    "exec": "command",
    "stop_timeout": "graceful_timeout",
    "stopwaitsecs": "graceful_timeout",
    "kill_timeout": "graceful_timeout",
    "max_memory_restart": "max_memory",
    "type": "kind",
    "url": "path",
}

TOP_KEYS = ("agent", "registry", "services", "include")
INCLUDED_KEYS = ("services", "include")


# ---------------------------------------------------------------------------------------
# errors


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config: where (file, dotted key) and why.

    `key` is empty for problems of a whole file (unreadable, TOML syntax); then `line`
    and `column` locate a syntax error when known.
    """

    file: str
    key: str
    reason: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        if self.key:
            return f"{self.file}: {self.key}: {self.reason}"
        if self.line is not None:
            return f"{self.file}:{self.line}:{self.column}: {self.reason}"
        return f"{self.file}: {self.reason}"


class ConfigError(Exception):
    """The config was rejected; `problems` lists every problem found, in file order."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems: list[ConfigProblem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# ---------------------------------------------------------------------------------------
# the result


@dataclass(frozen=True)
class AgentSettings:
    """The `[agent]` table. Paths are absolute; addresses are `host:port` (IPv6 in [])."""

    name: str
    control_socket: str
    log_dir: str
    state_dir: str
    control_socket_mode: int = DEFAULT_SOCKET_MODE
    #: SO_PEERCRED uids allowed on the control socket (default: root and the agent's uid)
    control_allow_uids: tuple[int, ...] = ()
    #: primary gids allowed too (default: the gid of `control_group`, if set)
    control_allow_gids: tuple[int, ...] = ()
    #: gid that owns the control socket (None: the agent's own group)
    control_group: int | None = None
    #: optional TCP control listener; mTLS only, so the three TLS files are then set
    control_address: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    #: client certificate common name -> role, for the TCP control listener
    roles: Mapping[str, Role] = field(default_factory=lambda: MappingProxyType({}))
    probe_address: str | None = None
    metrics_address: str | None = None
    log_format: LogFormat = "text"
    #: seconds readiness reports "not serving" before the drain on SIGTERM
    drain_delay: float = 0.0


@dataclass(frozen=True)
class RegistrySettings:
    """The `[registry]` table; absent table = no registry (`Config.registry` is None)."""

    endpoints: tuple[str, ...] = ()
    embedded: bool = False
    prefix: str = DEFAULT_PREFIX
    ttl: int = DEFAULT_TTL
    timeout: float = DEFAULT_REGISTRY_TIMEOUT
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    #: also write grpc-go naming keys under this prefix (ends with "/"); None: don't
    grpc_naming_prefix: str | None = None
    #: default of every service's `[services.X.registry] deregister_delay`
    deregister_delay: float = 0.0


@dataclass(frozen=True)
class Config:
    """A whole validated config. `text` is the main file's raw text (kept for history)."""

    agent: AgentSettings
    registry: RegistrySettings | None
    services: Mapping[str, ServiceSpec]
    path: str
    #: may hold secrets (registry password): kept out of repr, and so out of logs
    text: str = field(repr=False)
    files: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------
# small helpers


class _Missing(enum.Enum):
    MISSING = enum.auto()


MISSING = _Missing.MISSING
D = TypeVar("D")
T = TypeVar("T")


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime):
        return "a date-time"
    if isinstance(value, date):
        return "a date"
    if isinstance(value, time):
        return "a time"
    return type(value).__name__


def _show(value: object) -> str:
    """A value as TOML would spell it, shortened: what the user wrote, quoted back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= MAX_SHOWN else value[:MAX_SHOWN] + "..."
        return json.dumps(text, ensure_ascii=False)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        text = str(value) if abs(value) < 10**MAX_SHOWN else "(a huge integer)"
        return text
    return _type_name(value)


def _got(value: object) -> str:
    """`a string ("4")`: the type, and the value when it is short enough to help."""
    if isinstance(value, (bool, int, float, str)):
        return f"{_type_name(value)} ({_show(value)})"
    return _type_name(value)


def _key_part(name: str) -> str:
    """A table key as it appears in a dotted path: bare when TOML allows, else quoted."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", name):
        return name
    return _show(name)


def _one_of(options: Iterable[str]) -> str:
    return ", ".join(_show(o) for o in options)


def _hint(name: str, known: Iterable[str]) -> str:
    known = list(known)
    alias = ALIASES.get(name.lower())
    if alias in known:
        return f' (did you mean "{alias}"?)'
    close = difflib.get_close_matches(name, known, n=1, cutoff=HINT_CUTOFF)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return HOSTNAME_RE.fullmatch(host) is not None
    return True


def _parse_host_port(text: str, require_port: bool = True) -> tuple[str, int | None] | str:
    """`host:port`, `[v6]:port` (or only a host when not `require_port`).

    Returns (host, port) or the reason it is not valid.
    """
    if not text:
        return "must not be empty"
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return "missing ] after the IPv6 address"
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{_show(host)} is not an IPv6 address"
        if not rest and not require_port:
            return host, None
        if not rest.startswith(":"):
            return "expected :PORT after the ]"
        port_text = rest[1:]
    else:
        if text.count(":") > 1:
            return "an IPv6 address goes in brackets: [::1]:8080"
        host, sep, port_text = text.partition(":")
        if not sep:
            if require_port:
                return "expected HOST:PORT"
            if not _valid_host(host):
                return f"{_show(host)} is not a host name or IP address"
            return host, None
        if not host:
            return "missing host (0.0.0.0 means every interface)"
        if not _valid_host(host):
            return f"{_show(host)} is not a host name or IP address"
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > len("65535"):
        return f"port must be a number from 0 to 65535, got {_show(port_text)}"
    port = int(port_text)
    if port > 65535:
        return f"port must be a number from 0 to 65535, got {port}"
    return host, port


# ---------------------------------------------------------------------------------------
# one TOML table being read


class _Problems:
    """Where every problem of one load goes, in the order found."""

    def __init__(self) -> None:
        self.items: list[ConfigProblem] = []

    def add(self, file: str, key: str, reason: str) -> None:
        self.items.append(ConfigProblem(file, key, reason))


class _Table:
    """Typed, checked access to one TOML table; remembers the keys it handed out.

    Each getter returns `default` when the key is absent *or* its value is bad (the
    problem is recorded and the key lands in `bad`, so cross-checks can skip it).
    `finish()` reports every key nobody asked for as unknown.
    """

    def __init__(
        self,
        problems: _Problems,
        file: str,
        prefix: str,
        data: Mapping[str, Any],
        base_dir: str,
    ) -> None:
        self.problems = problems
        self.file = file
        self.prefix = prefix
        self.data = data
        self.base_dir = base_dir
        self.seen: set[str] = set()
        self.bad: set[str] = set()

    # -- bookkeeping

    def key(self, name: str) -> str:
        """The dotted path of `name` in this table; `name` may carry an index: listen[1]."""
        index = ""
        match = INDEXED_RE.fullmatch(name)
        if match:
            name, index = match.group(1), match.group(2)
        part = _key_part(name) + index
        return f"{self.prefix}.{part}" if self.prefix else part

    def problem(self, name: str, reason: str) -> None:
        self.bad.add(name)
        self.problems.add(self.file, self.key(name), reason)

    def has(self, name: str) -> bool:
        return name in self.data

    def ok(self, *names: str) -> bool:
        """None of `names` had a bad value (cross-checks on bad values only add noise)."""
        return not self.bad.intersection(names)

    def raw(self, name: str) -> object:
        self.seen.add(name)
        return self.data.get(name, MISSING)

    def finish(self) -> None:
        for name in self.data:
            if name in self.seen:
                continue
            hint = _hint(name, self.seen)
            if name == "include" and self.prefix:
                hint = " (a top-level include must come before the first [table])"
            self.problems.add(self.file, self.key(name), "unknown key" + hint)

    def sub(self, name: str) -> _Table | None:
        """A nested table, or None when absent (or not a table: reported)."""
        value = self.raw(name)
        if value is MISSING:
            return None
        if not isinstance(value, dict):
            self.problem(name, f"must be a table, got {_got(value)}")
            return None
        return _Table(self.problems, self.file, self.key(name), value, self.base_dir)

    # -- scalars

    def _text(self, name: str, value: object, what: str = "a string") -> str | None:
        """`value` when it is a usable string, else report and return None."""
        if not isinstance(value, str):
            self.problem(name, f"must be {what}, got {_got(value)}")
            return None
        if "\x00" in value:
            self.problem(name, "must not contain NUL characters")
            return None
        try:
            value.encode()
        except UnicodeEncodeError:
            self.problem(name, "must be valid UTF-8")
            return None
        return value

    def string(self, name: str, default: D, *, empty_ok: bool = False) -> str | D:
        value = self.raw(name)
        if value is MISSING:
            return default
        text = self._text(name, value)
        if text is None:
            return default
        if not text and not empty_ok:
            self.problem(name, "must not be empty")
            return default
        return text

    def choice(self, name: str, options: Mapping[str, T], default: D) -> T | D:
        value = self.raw(name)
        if value is MISSING:
            return default
        text = self._text(name, value)
        if text is None:
            return default
        if text not in options:
            hint = _hint(text, options)
            self.problem(name, f"must be one of {_one_of(options)}; got {_show(text)}{hint}")
            return default
        return options[text]

    def boolean(self, name: str, default: D) -> bool | D:
        value = self.raw(name)
        if value is MISSING:
            return default
        if not isinstance(value, bool):
            self.problem(name, f"must be true or false, got {_got(value)}")
            return default
        return value

    def _int_value(self, name: str, value: object, minimum: int, maximum: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(name, f"must be an integer, got {_got(value)}")
            return None
        if value < minimum:
            self.problem(name, f"must be >= {minimum}, got {_show(value)}")
            return None
        if value > maximum:
            self.problem(name, f"must be <= {maximum}, got {_show(value)}")
            return None
        return value

    def integer(self, name: str, default: D, *, minimum: int, maximum: int) -> int | D:
        value = self.raw(name)
        if value is MISSING:
            return default
        checked = self._int_value(name, value, minimum, maximum)
        return default if checked is None else checked

    def number(
        self, name: str, default: D, *, minimum: float, maximum: float, above: bool = False
    ) -> float | D:
        """A plain number (int or float). `above`: strictly greater than `minimum`."""
        value = self.raw(name)
        if value is MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problem(name, f"must be a number, got {_got(value)}")
            return default
        result = self._range(name, value, minimum, maximum, above, unit="")
        return default if result is None else result

    def _range(
        self, name: str, value: float, minimum: float, maximum: float, above: bool, unit: str
    ) -> float | None:
        """`value` as a float when finite and in range; else report and return None."""
        shown = _show(value)
        if isinstance(value, float) and not math.isfinite(value):
            self.problem(name, f"must be a finite number, got {shown}")
            return None
        if above and value <= minimum:
            self.problem(name, f"must be > {minimum:g}{unit}, got {shown}")
            return None
        if value < minimum:
            self.problem(name, f"must be >= {minimum:g}{unit}, got {shown}")
            return None
        if value > maximum:
            self.problem(name, f"must be <= {maximum:g}{unit}, got {shown}")
            return None
        return float(value)

    def duration(
        self, name: str, default: D, *, zero_ok: bool = False, maximum: float = MAX_DURATION
    ) -> float | D:
        """Seconds: a number, or a string with a unit ("500ms", "30s", "5m", "1h")."""
        value = self.raw(name)
        if value is MISSING:
            return default
        seconds: float | int
        if isinstance(value, str):
            match = DURATION_RE.fullmatch(value)
            if match is None:
                self.problem(
                    name,
                    f'must be seconds or a duration like "500ms", "30s", '
                    f'"5m", "1h"; got {_show(value)}',
                )
                return default
            seconds = float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problem(name, f"must be a number of seconds, got {_got(value)}")
            return default
        else:
            seconds = value
        result = self._range(name, seconds, 0.0, maximum, above=not zero_ok, unit=" s")
        return default if result is None else result

    def _size_value(self, name: str, value: object, minimum: int) -> int | None:
        """Bytes: an integer, or a string like "512MiB", "1G", "100kB"."""
        if isinstance(value, str):
            match = SIZE_RE.fullmatch(value)
            unit = match.group(2).lower() if match else ""
            if match is None or unit not in SIZE_UNITS:
                self.problem(
                    name,
                    f'must be bytes or a size like "512MiB", "1G", "100kB"; got {_show(value)}',
                )
                return None
            try:
                amount = Decimal(match.group(1)) * SIZE_UNITS[unit]
            except InvalidOperation:  # pragma: no cover - the regex admits only decimals
                self.problem(name, f"is not a size: {_show(value)}")
                return None
            if amount > MAX_SIZE:
                self.problem(name, f"must be <= {MAX_SIZE} bytes, got {_show(value)}")
                return None
            size = int(amount)
        elif isinstance(value, bool) or not isinstance(value, int):
            self.problem(
                name, f'must be a size (bytes, or a string like "512MiB"), got {_got(value)}'
            )
            return None
        else:
            size = value
        if size < minimum:
            hint = f' (bytes: "{value}MiB" is {value} mebibytes)' if isinstance(value, int) else ""
            self.problem(name, f"must be >= {minimum} bytes, got {_show(value)}{hint}")
            return None
        if size > MAX_SIZE:
            self.problem(name, f"must be <= {MAX_SIZE} bytes, got {_show(value)}")
            return None
        return size

    def size(self, name: str, default: D, *, minimum: int = 1) -> int | D:
        value = self.raw(name)
        if value is MISSING:
            return default
        checked = self._size_value(name, value, minimum)
        return default if checked is None else checked

    def mode(self, name: str, default: D) -> int | D:
        """A permission mode: an integer (write 0o022 in TOML) or an octal string "0022"."""
        value = self.raw(name)
        if value is MISSING:
            return default
        if isinstance(value, str):
            digits = value[2:] if value.lower().startswith("0o") else value
            if not (1 <= len(digits) <= 4) or any(c not in "01234567" for c in digits):
                self.problem(name, f'must be an octal mode like "0022", got {_show(value)}')
                return default
            number = int(digits, 8)
        elif isinstance(value, bool) or not isinstance(value, int):
            self.problem(
                name, f'must be an octal string like "0022" or an integer, got {_got(value)}'
            )
            return default
        else:
            number = value
        if not 0 <= number <= 0o777:
            self.problem(name, f"must be between 0 and 0o777, got {_show(value)}")
            return default
        return number

    # -- paths

    def resolve(self, path: str) -> str:
        """Relative paths are relative to the directory of the file that wrote them."""
        return os.path.normpath(os.path.join(self.base_dir, path))

    def path(self, name: str, default: D) -> str | D:
        text = self.string(name, None)
        return default if text is None else self.resolve(text)

    def directory(self, name: str) -> str | None:
        path = self.path(name, None)
        if path is not None and not os.path.isdir(path):
            self.problem(name, f"{_show(path)} is not an existing directory")
            return None
        return path

    def readable_file(self, name: str) -> str | None:
        path = self.path(name, None)
        if path is None:
            return None
        if not os.path.isfile(path):
            self.problem(name, f"{_show(path)} is not an existing file")
            return None
        if not os.access(path, os.R_OK):
            self.problem(name, f"{_show(path)} is not readable")
            return None
        return path

    def socket_path(self, name: str, default: str) -> str:
        path = self.path(name, None)
        if path is None:
            return default
        if len(os.fsencode(path)) > MAX_UNIX_PATH:
            self.problem(
                name,
                f"a unix socket path is at most {MAX_UNIX_PATH} bytes, {_show(path)} is longer",
            )
            return default
        return path

    # -- composite values

    def argv(self, name: str) -> tuple[str, ...] | None:
        """A command: an array of strings (argv), or a string split like a shell would.

        It is never run by a shell: quotes group words, nothing else is interpreted.
        """
        value = self.raw(name)
        if value is MISSING:
            return None
        if isinstance(value, str):
            text = self._text(name, value)
            if text is None:
                return None
            try:
                words = shlex.split(text)
            except ValueError as exc:
                self.problem(name, f"cannot split into words: {exc}")
                return None
        elif isinstance(value, list):
            words = []
            for i, word in enumerate(value):
                checked = self._text(f"{name}[{i}]", word)
                if checked is None:
                    self.bad.add(name)
                    return None
                words.append(checked)
        else:
            self.problem(name, f"must be an array of strings or a string, got {_got(value)}")
            return None
        if not words or not words[0]:
            self.problem(name, "must not be empty (the program to run comes first)")
            return None
        return tuple(words)

    def str_list(self, name: str) -> tuple[str, ...] | None:
        """An array of non-empty strings; a lone string counts as a one-element array."""
        value = self.raw(name)
        if value is MISSING:
            return None
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            self.problem(name, f"must be an array of strings, got {_got(value)}")
            return None
        out: list[str] = []
        for i, item in enumerate(items):
            text = self._text(f"{name}[{i}]", item)
            if text is None:
                self.bad.add(name)
                return None
            if not text:
                self.problem(f"{name}[{i}]", "must not be empty")
                return None
            out.append(text)
        return tuple(out)

    def string_table(self, name: str, *, env: bool) -> Mapping[str, str] | None:
        """A table of string values (numbers are taken as their text).

        `env`: keys must be environment variable names, and booleans are refused (true
        could mean "1" or "true" to the program: the user should say which).
        """
        table = self.sub(name)
        if table is None:
            return None
        out: dict[str, str] = {}
        for key, value in table.data.items():
            table.seen.add(key)
            if env:
                if not ENV_NAME_RE.fullmatch(key):
                    table.problem(key, "is not a valid environment variable name")
                    continue
                if key in RESERVED_ENV:
                    table.problem(key, "is set by svcd for every worker and cannot be overridden")
                    continue
            elif "\x00" in key:
                table.problem(key, "key must not contain NUL characters")
                continue
            if isinstance(value, bool):
                if env:
                    table.problem(key, 'must be a string: quote it ("true", "1")')
                    continue
                out[key] = "true" if value else "false"
            elif isinstance(value, (int, float)):
                if isinstance(value, float) and not math.isfinite(value):
                    table.problem(key, f"must be a finite number or a string, got {_show(value)}")
                    continue
                out[key] = str(value)
            else:
                text = table._text(key, value)
                if text is not None:
                    out[key] = text
        if table.bad:
            self.bad.add(name)
        return MappingProxyType(out)

    def address(self, name: str) -> tuple[str, int] | None:
        """`host:port` (no scheme), e.g. "127.0.0.1:9464", "[::]:7071"."""
        text = self.string(name, None)
        if text is None:
            return None
        parsed = _parse_host_port(text)
        if isinstance(parsed, str):
            self.problem(name, f'{parsed} (expected HOST:PORT like "127.0.0.1:9464")')
            return None
        host, port = parsed
        assert port is not None  # require_port
        return host, port

    def user_id(self, name: str, value: object) -> int | None:
        """A user name (must exist) or a numeric uid."""
        return self._id(name, value, "user", lambda n: pwd.getpwnam(n).pw_uid)

    def group_id(self, name: str, value: object) -> int | None:
        """A group name (must exist) or a numeric gid."""
        return self._id(name, value, "group", lambda n: grp.getgrnam(n).gr_gid)

    def _id(self, name: str, value: object, what: str, lookup: Any) -> int | None:
        if isinstance(value, int) and not isinstance(value, bool):
            return self._int_value(name, value, 0, MAX_ID)
        text = self._text(name, value, f"a {what} name or a numeric id")
        if text is None:
            return None
        if text.isascii() and text.isdigit() and len(text) <= len(str(MAX_ID)):
            return self._int_value(name, int(text), 0, MAX_ID)
        try:
            return int(lookup(text))
        except (KeyError, ValueError, OverflowError):
            self.problem(name, f"no such {what}: {_show(text)}")
            return None


# ---------------------------------------------------------------------------------------
# files and includes


@dataclass
class _Document:
    """One parsed config file."""

    display: str  #: the path as shown in problems
    path: str  #: absolute
    text: str
    data: dict[str, Any]

    @property
    def base_dir(self) -> str:
        return os.path.dirname(self.path)


def _read_text(display: str, path: str, problems: _Problems) -> str | None:
    """The text of a regular file of at most MAX_FILE_BYTES, or None (reported)."""
    try:
        # O_NONBLOCK: a glob may match a FIFO or a device; never hang opening one
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        problems.add(display, "", f"cannot read: {getattr(exc, 'strerror', None) or exc}")
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            problems.add(display, "", "not a regular file")
            return None
        if info.st_size > MAX_FILE_BYTES:
            problems.add(
                display, "", f"file too large ({info.st_size} bytes, limit {MAX_FILE_BYTES})"
            )
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        problems.add(display, "", f"cannot read: {exc.strerror or exc}")
        return None
    finally:
        os.close(fd)
    if len(raw) > MAX_FILE_BYTES:
        problems.add(display, "", f"file too large (limit {MAX_FILE_BYTES} bytes)")
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.add(display, "", f"not valid UTF-8 (byte {exc.start})")
        return None


def _parse_toml(display: str, text: str, problems: _Problems) -> dict[str, Any] | None:
    if len(text) > MAX_FILE_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        problems.add(display, "", f"file too large (limit {MAX_FILE_BYTES} bytes)")
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = TOML_POSITION_RE.match(message)
        if match:
            line, column = int(match.group(2)), int(match.group(3))
            problems.items.append(
                ConfigProblem(display, "", f"TOML syntax error: {match.group(1)}", line, column)
            )
        else:
            problems.add(display, "", f"TOML syntax error: {message}")
        return None
    except RecursionError:
        problems.add(display, "", "TOML syntax error: nested too deeply")
        return None


class _Loader:
    """Reads the main file and its includes into `_Document`s, reporting as it goes."""

    def __init__(self, problems: _Problems) -> None:
        self.problems = problems
        self.documents: list[_Document] = []
        self.seen_paths: set[str] = set()

    def add(self, display: str, path: str, text: str, chain: tuple[str, ...]) -> None:
        """Parse one file and follow its includes (depth-first, in glob order)."""
        self.seen_paths.add(os.path.realpath(path))
        data = _parse_toml(display, text, self.problems)
        if data is None:
            return
        doc = _Document(display, path, text, data)
        self.documents.append(doc)
        self._follow_includes(doc, (*chain, os.path.realpath(path)))

    def _follow_includes(self, doc: _Document, chain: tuple[str, ...]) -> None:
        table = _Table(self.problems, doc.display, "", doc.data, doc.base_dir)
        patterns = table.str_list("include")
        if not patterns:
            return
        for i, pattern in enumerate(patterns):
            key = f"include[{i}]"
            absolute = os.path.join(doc.base_dir, pattern)
            if glob.has_magic(pattern):
                # bounded: a pattern such as "/*/*/*" must not walk the whole disk
                found = list(itertools.islice(glob.iglob(absolute), MAX_INCLUDE_FILES + 1))
                if len(found) > MAX_INCLUDE_FILES:
                    table.problem(key, f"matches more than {MAX_INCLUDE_FILES} files")
                    continue
                matches = sorted(found)
            elif os.path.exists(absolute):
                matches = [absolute]
            else:
                table.problem(key, f"no such file: {_show(pattern)}")
                continue
            for match in matches:
                if os.path.isdir(match):
                    continue  # "conf.d/*" may match a subdirectory: not a config file
                display = (
                    match
                    if os.path.isabs(pattern)
                    else os.path.normpath(
                        os.path.join(
                            os.path.dirname(doc.display), os.path.relpath(match, doc.base_dir)
                        )
                    )
                )
                real = os.path.realpath(match)
                if real in chain:
                    table.problem(key, f"include cycle: {_show(display)} includes itself")
                    continue
                if real in self.seen_paths:
                    continue  # two patterns matching one file: read it once
                if len(chain) >= MAX_INCLUDE_DEPTH:
                    table.problem(key, f"includes nested deeper than {MAX_INCLUDE_DEPTH} files")
                    return
                if len(self.seen_paths) >= MAX_INCLUDE_FILES:
                    table.problem(key, f"more than {MAX_INCLUDE_FILES} config files")
                    return
                text = _read_text(display, match, self.problems)
                self.seen_paths.add(real)
                if text is not None:
                    self.add(display, match, text, chain)


# ---------------------------------------------------------------------------------------
# sections


def _read_agent(
    table: _Table | None, base_dir: str, problems: _Problems, file: str
) -> AgentSettings:
    t = table or _Table(problems, file, "agent", {}, base_dir)
    name = t.string("name", None)
    if name is not None and (len(name) > MAX_AGENT_NAME or not AGENT_NAME_RE.fullmatch(name)):
        t.problem(
            "name",
            "must be letters, digits, '.', '_' or '-' (it is part of etcd keys), "
            f"got {_show(name)}",
        )
        name = None
    control_socket = t.socket_path("control_socket", paths.default_control_socket())
    group_value = t.raw("control_group")
    control_group = None if group_value is MISSING else t.group_id("control_group", group_value)
    default_mode = DEFAULT_SOCKET_MODE if control_group is None else GROUP_SOCKET_MODE
    mode = t.mode("control_socket_mode", default_mode)
    if control_group is not None and t.has("control_socket_mode") and not mode & 0o060:
        t.problem(
            "control_socket_mode",
            f"gives the control_group no access ({mode:#o}); use {GROUP_SOCKET_MODE:#o}",
        )
    uids = _id_list(t, "control_allow_uids", user=True)
    if uids is None:
        uids = tuple(dict.fromkeys((0, os.geteuid())))
    gids = _id_list(t, "control_allow_gids", user=False)
    if gids is None:
        gids = () if control_group is None else (control_group,)

    control = t.address("control_address")
    tls = {key: t.readable_file(key) for key in ("tls_cert", "tls_key", "tls_ca")}
    roles = _read_roles(t)
    if control is not None:
        for key, value in tls.items():
            if value is None and not t.has(key):
                t.problem(key, "is required with control_address (TCP control is mTLS only)")
    else:
        for key in (*tls, "roles"):
            if t.has(key) and not t.has("control_address"):
                t.problem(key, "is only used with control_address")
    probe = t.address("probe_address")
    metrics = t.address("metrics_address")
    log_dir = t.path("log_dir", paths.default_log_dir())
    state_dir = t.path("state_dir", paths.default_state_dir())
    log_format: LogFormat = t.choice("log_format", LOG_FORMATS, "text")
    drain_delay = t.duration("drain_delay", 0.0, zero_ok=True)
    if table is not None:
        table.finish()
    return AgentSettings(
        name=name if name is not None else socket.gethostname(),
        control_socket=control_socket,
        control_socket_mode=mode,
        control_allow_uids=uids,
        control_allow_gids=gids,
        control_group=control_group,
        control_address=None if control is None else _format_address(*control),
        tls_cert=tls["tls_cert"],
        tls_key=tls["tls_key"],
        tls_ca=tls["tls_ca"],
        roles=roles,
        probe_address=None if probe is None else _format_address(*probe),
        metrics_address=None if metrics is None else _format_address(*metrics),
        log_dir=log_dir,
        state_dir=state_dir,
        log_format=log_format,
        drain_delay=drain_delay,
    )


def _id_list(t: _Table, name: str, *, user: bool) -> tuple[int, ...] | None:
    value = t.raw(name)
    if value is MISSING:
        return None
    if not isinstance(value, list):
        what = "user names or uids" if user else "group names or gids"
        t.problem(name, f"must be an array of {what}, got {_got(value)}")
        return None
    ids: list[int] = []
    for i, item in enumerate(value):
        lookup = t.user_id if user else t.group_id
        checked = lookup(f"{name}[{i}]", item)
        if checked is None:
            t.bad.add(name)
        else:
            ids.append(checked)
    return tuple(dict.fromkeys(ids))


def _read_roles(t: _Table) -> Mapping[str, Role]:
    table = t.sub("roles")
    roles: dict[str, Role] = {}
    if table is None:
        return MappingProxyType(roles)
    for key in list(table.data):
        role = table.choice(key, ROLES, None)
        if role is not None:
            roles[key] = role
    return MappingProxyType(roles)


def _read_registry(table: _Table) -> RegistrySettings:
    t = table
    endpoints: tuple[str, ...] = ()
    embedded = False
    raw = t.raw("endpoints")
    if raw is MISSING:
        t.problem(
            "endpoints", 'is required: etcd URLs like ["http://127.0.0.1:2379"], or "embedded"'
        )
    elif raw == "embedded" or raw == ["embedded"]:
        embedded = True
    else:
        t.seen.discard("endpoints")  # str_list marks it again
        urls = t.str_list("endpoints")
        if urls is not None and not urls:
            t.problem("endpoints", 'must not be empty (or "embedded")')
        for i, url in enumerate(urls or ()):
            reason = _endpoint_problem(url)
            if reason:
                t.problem(f"endpoints[{i}]", reason)
        endpoints = urls or ()
    prefix = t.string("prefix", DEFAULT_PREFIX)
    if not prefix.startswith("/") or prefix.endswith("/") or any(c.isspace() for c in prefix):
        t.problem(
            "prefix",
            f'must start with "/", not end with "/" and contain no spaces, got {_show(prefix)}',
        )
        prefix = DEFAULT_PREFIX
    ttl = t.integer("ttl", DEFAULT_TTL, minimum=1, maximum=MAX_TTL)
    timeout = t.duration("timeout", DEFAULT_REGISTRY_TIMEOUT)
    username = t.string("username", None)
    password = t.string("password", None)
    if (username is None) != (password is None):
        missing = "password" if password is None else "username"
        if t.ok("username", "password"):
            t.problem(missing, "is required: username and password go together")
    ca_cert = t.readable_file("ca_cert")
    cert = t.readable_file("cert")
    key = t.readable_file("key")
    if t.has("cert") != t.has("key"):
        t.problem("key" if t.has("cert") else "cert", "is required: cert and key go together")
    if (
        (t.has("ca_cert") or t.has("cert"))
        and endpoints
        and not any(e.startswith("https://") for e in endpoints)
    ):
        t.problem("ca_cert" if t.has("ca_cert") else "cert", "TLS files need https:// endpoints")
    naming = t.string("grpc_naming_prefix", None)
    if naming is not None and not naming.endswith("/"):
        # etcd's grpc resolver watches the prefix: "api" would also match "api-admin"
        t.problem("grpc_naming_prefix", f'must end with "/", got {_show(naming)}')
        naming = None
    deregister_delay = t.duration("deregister_delay", 0.0, zero_ok=True)
    t.finish()
    return RegistrySettings(
        endpoints=endpoints,
        embedded=embedded,
        prefix=prefix,
        ttl=ttl,
        timeout=timeout,
        username=username,
        password=password,
        ca_cert=ca_cert,
        cert=cert,
        key=key,
        grpc_naming_prefix=naming,
        deregister_delay=deregister_delay,
    )


def _endpoint_problem(url: str) -> str | None:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https"):
        return f'must be an http:// or https:// URL like "http://127.0.0.1:2379", got {_show(url)}'
    parsed = _parse_host_port(rest.rstrip("/"))
    if isinstance(parsed, str):
        return f"{parsed}, in {_show(url)}"
    return None


# -- services


def _read_service(
    t: _Table, name: str, default_deregister_delay: float
) -> tuple[ServiceSpec | None, list[tuple[int, ListenSpec]]]:
    """One `[services.NAME]` table: its spec, or None when it had problems (all reported),
    and its valid listeners with their index in `listen` (checked for collisions even
    when the service has other problems, so that every problem is reported at once)."""
    problems_before = len(t.problems.items)
    command = t.argv("command")
    if command is None and not t.has("command"):
        t.problem("command", 'is required (an array like ["python", "-m", "app"])')
    count = t.integer("count", 1, minimum=1, maximum=MAX_WORKERS)
    cwd = t.directory("cwd")
    user = _user_or_group(t, "user", user=True)
    group = _user_or_group(t, "group", user=False)
    env = t.string_table("env", env=True)
    env_file = t.readable_file("env_file")
    stop_signal = _signal(t, "stop_signal")
    indexed_listen = _read_listen(t)
    listen = tuple(spec for _, spec in indexed_listen)
    restart: RestartPolicy = t.choice("restart", RESTART, "always")
    ready: ReadyMode = t.choice("ready", READY, "notify")
    ready_timeout = t.duration("ready_timeout", ServiceSpec.ready_timeout)
    graceful_timeout = t.duration("graceful_timeout", ServiceSpec.graceful_timeout)
    max_memory = t.size("max_memory", None, minimum=MIN_MAX_MEMORY)
    watchdog = t.duration("watchdog", None)
    max_surge = t.integer("max_surge", ServiceSpec.max_surge, minimum=0, maximum=MAX_WORKERS)
    max_unavailable = t.integer(
        "max_unavailable", ServiceSpec.max_unavailable, minimum=0, maximum=MAX_WORKERS
    )
    min_ready = t.integer("min_ready", None, minimum=0, maximum=MAX_WORKERS)
    umask = t.mode("umask", None)
    rlimits = _read_rlimits(t)
    health = _read_health(t.sub("health"))
    backoff = _read_backoff(t.sub("backoff"))
    logs = _read_logs(t.sub("logs"))
    advertise, deregister_delay, meta = _read_service_registry(
        t.sub("registry"), default_deregister_delay, listen
    )
    t.finish()

    # cross-checks between keys, each only when the keys involved were themselves fine
    if ready == "health" and health is not None and health.kind == "none" and t.ok("ready"):
        t.problem(
            "ready", f'"health" needs a health check: set [services.{_key_part(name)}.health] kind'
        )
    if (
        ready == "health"
        and health is not None
        and health.kind != "none"
        and ready_timeout <= health.interval
        and t.ok("ready_timeout")
    ):
        t.problem(
            "ready_timeout",
            f"must be longer than health.interval ({health.interval:g} s), got {ready_timeout:g}",
        )
    if max_surge == 0 and max_unavailable == 0 and t.ok("max_surge", "max_unavailable"):
        t.problem(
            "max_surge",
            "max_surge and max_unavailable cannot both be 0: a rolling "
            "reload could never replace a worker",
        )
    if min_ready is not None and min_ready > count and t.ok("count", "min_ready"):
        t.problem("min_ready", f"must be <= count ({count}), got {min_ready}")

    if len(t.problems.items) > problems_before or command is None or health is None:
        return None, indexed_listen
    spec = ServiceSpec(
        name=name,
        command=command,
        count=count,
        cwd=cwd,
        user=user,
        group=group,
        env=env if env is not None else MappingProxyType({}),
        env_file=env_file,
        stop_signal=stop_signal,
        listen=listen,
        restart=restart,
        ready=ready,
        ready_timeout=ready_timeout,
        graceful_timeout=graceful_timeout,
        max_memory=max_memory,
        watchdog=watchdog,
        health=health,
        backoff=backoff or BackoffSpec(),
        logs=logs or LogSpec(),
        max_surge=max_surge,
        max_unavailable=max_unavailable,
        min_ready=min_ready,
        umask=umask,
        rlimits=rlimits,
        advertise=advertise,
        deregister_delay=deregister_delay,
        meta=meta,
    )
    return spec, indexed_listen


def _user_or_group(t: _Table, name: str, *, user: bool) -> str | None:
    """The name as written (or the numeric id as text), once it is known to resolve."""
    value = t.raw(name)
    if value is MISSING:
        return None
    checked = t.user_id(name, value) if user else t.group_id(name, value)
    if checked is None:
        return None
    return value if isinstance(value, str) else str(checked)


def _signal(t: _Table, name: str) -> str:
    """A signal by name ("SIGTERM", "TERM", "term") or number; stored as "SIGTERM"."""
    value = t.raw(name)
    if value is MISSING:
        return "SIGTERM"
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return signal.Signals(value).name
        except ValueError:
            t.problem(name, f"is not a signal number: {value}")
            return "SIGTERM"
    text = t._text(name, value, 'a signal name like "SIGTERM"')
    if text is None:
        return "SIGTERM"
    upper = text.upper()
    candidate = upper if upper.startswith("SIG") else "SIG" + upper
    names = [s.name for s in signal.Signals if not s.name.startswith("SIG_")]
    if candidate not in names:
        t.problem(name, f"is not a signal name: {_show(text)}{_hint(candidate, names)}")
        return "SIGTERM"
    return candidate


def _read_listen(t: _Table) -> list[tuple[int, ListenSpec]]:
    value = t.raw("listen")
    if value is MISSING:
        return []
    entries = [value] if isinstance(value, (str, dict)) else value
    if not isinstance(entries, list):
        t.problem(
            "listen", f'must be an array of URLs like "tcp://0.0.0.0:8080", got {_got(value)}'
        )
        return []
    specs: list[tuple[int, ListenSpec]] = []
    for i, entry in enumerate(entries):
        key = f"listen[{i}]"
        backlog = ListenSpec.backlog
        if isinstance(entry, dict):
            # the table form: { url = "tcp://...", backlog = 4096 }
            sub = _Table(t.problems, t.file, t.key(key), entry, t.base_dir)
            url = sub.string("url", None)
            backlog = sub.integer("backlog", backlog, minimum=1, maximum=MAX_BACKLOG)
            if url is None and not sub.has("url"):
                sub.problem("url", 'is required (like "tcp://0.0.0.0:8080")')
            sub.finish()
            if sub.bad or url is None:
                t.bad.add("listen")
                continue
        else:
            checked = t._text(key, entry, 'a URL like "tcp://0.0.0.0:8080"')
            if checked is None:
                t.bad.add("listen")
                continue
            url = checked
        parsed = _parse_listen(url, t.base_dir, backlog)
        if isinstance(parsed, str):
            t.problem(key, parsed)
            t.bad.add("listen")
            continue
        if any(_same_listener(parsed, other) for _, other in specs):
            t.problem(key, f"{_show(url)} is listed twice")
            continue
        specs.append((i, parsed))
    return specs


def _parse_listen(url: str, base_dir: str, backlog: int) -> ListenSpec | str:
    """A ListenSpec, or the reason `url` is not a valid listen URL."""
    if url.startswith("tcp://"):
        parsed = _parse_host_port(url[len("tcp://") :])
        if isinstance(parsed, str):
            return f"{parsed}, in {_show(url)}"
        host, port = parsed
        assert port is not None
        return ListenSpec(url=url, scheme="tcp", host=host, port=port, backlog=backlog)
    if url.startswith("unix:"):
        path = url[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            return f'missing path, in {_show(url)} (like "unix:///run/app.sock")'
        if path.startswith("@"):
            return f"abstract unix sockets are not supported, in {_show(url)}"
        path = os.path.normpath(os.path.join(base_dir, path))
        if len(os.fsencode(path)) > MAX_UNIX_PATH:
            return f"a unix socket path is at most {MAX_UNIX_PATH} bytes, {_show(path)} is longer"
        return ListenSpec(url=url, scheme="unix", path=path, backlog=backlog)
    scheme = url.partition("://")[0] if "://" in url else ""
    hint = (
        ' (use "tcp://": the agent binds plain sockets)'
        if scheme in ("http", "https", "ws", "grpc")
        else ""
    )
    return f"must start with tcp:// or unix://, got {_show(url)}{hint}"


def _read_rlimits(t: _Table) -> Mapping[str, int]:
    table = t.sub("rlimits")
    limits: dict[str, int] = {}
    if table is None:
        return MappingProxyType(limits)
    for key in list(table.data):
        if key not in RLIMITS:
            continue  # finish() reports it with a hint
        value = table.raw(key)
        if isinstance(value, str) and value.lower() in UNLIMITED:
            limits[key] = resource.RLIM_INFINITY
        elif key in BYTE_RLIMITS:
            size = table._size_value(key, value, 0)
            if size is not None:
                limits[key] = size
        elif isinstance(value, str):
            table.problem(key, f'must be an integer or "unlimited", got {_show(value)}')
        else:
            number = table._int_value(key, value, 0, MAX_RLIMIT)
            if number is not None:
                limits[key] = number
    _finish_with(table, RLIMITS)
    if table.bad:
        t.bad.add("rlimits")
    return MappingProxyType(limits)


def _finish_with(table: _Table, known: Iterable[str]) -> None:
    """Like `finish`, but hints from a fixed vocabulary (the table's keys are open-ended)."""
    known = sorted(known)
    for name in table.data:
        if name not in table.seen:
            table.problems.add(table.file, table.key(name), "unknown key" + _hint(name, known))


def _read_health(t: _Table | None) -> HealthSpec | None:
    if t is None:
        return HealthSpec()
    kind = t.choice("kind", HEALTH_KINDS, None)
    if kind is None and not t.has("kind"):
        t.problem("kind", f"is required in a health table: one of {_one_of(HEALTH_KINDS)}")
    path = t.string("path", HealthSpec.path)
    if not path.startswith("/"):
        t.problem("path", f'must start with "/", got {_show(path)}')
    expect = _status_range(t, "expect_status")
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
    only = {"path": "http", "expect_status": "http", "command": "exec", "grpc_service": "grpc"}
    for key, needs in only.items():
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


def _status_range(t: _Table, name: str) -> tuple[int, int]:
    """`"200-399"`, `"200"` or `200`: an inclusive range of HTTP status codes."""
    default = HealthSpec.expect_status
    value = t.raw(name)
    if value is MISSING:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and (match := STATUS_RANGE_RE.fullmatch(value)):
        low = int(match.group(1))
        high = int(match.group(2) or low)
    else:
        t.problem(name, f'must be a status or a range like "200-399", got {_got(value)}')
        return default
    if not 100 <= low <= high <= 599:
        t.problem(name, f"must be HTTP statuses from 100 to 599, low to high, got {_show(value)}")
        return default
    return low, high


def _read_backoff(t: _Table | None) -> BackoffSpec | None:
    if t is None:
        return None
    b = BackoffSpec
    initial = t.duration("initial", b.initial, zero_ok=True)
    first_delay = t.duration("first_delay", b.first_delay, zero_ok=True)
    factor = t.number("factor", b.factor, minimum=1.0, maximum=100.0)
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


def _read_logs(t: _Table | None) -> LogSpec | None:
    if t is None:
        return None
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


def _read_service_registry(
    t: _Table | None, default_delay: float, listen: tuple[ListenSpec, ...]
) -> tuple[str | None, float, Mapping[str, str]]:
    if t is None:
        return None, default_delay, MappingProxyType({})
    advertise_text = t.string("advertise", None)
    advertise = None
    if advertise_text is not None:
        parsed = _parse_host_port(advertise_text, require_port=False)
        if isinstance(parsed, str):
            t.problem("advertise", f"{parsed} (expected HOST or HOST:PORT)")
        else:
            host, port = parsed
            if port is None and not any(spec.scheme == "tcp" for spec in listen):
                t.problem("advertise", "needs a port: the service has no tcp:// listener")
            advertise = host if port is None else _format_address(host, port)
    delay = t.duration("deregister_delay", default_delay, zero_ok=True)
    meta = t.string_table("meta", env=False)
    t.finish()
    return advertise, delay, meta if meta is not None else MappingProxyType({})


# ---------------------------------------------------------------------------------------
# checks across services


@dataclass(frozen=True)
class _Bound:
    """Something that takes an address: a service listener or an agent listener."""

    file: str
    key: str
    owner: str  #: "service api" / "agent"
    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""


def _hosts_overlap(a: str, b: str) -> bool:
    """Could binding `a` and `b` on one port collide? Errs towards yes."""
    if a.lower() == b.lower():
        return True
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address | None] = []
    for host in (a, b):
        try:
            ips.append(ipaddress.ip_address(host))
        except ValueError:
            ips.append(None)
    ip_a, ip_b = ips
    # "::" is dual-stack on Linux by default (bindv6only = 0): it takes IPv4 too
    for ip, other in ((ip_a, ip_b), (ip_b, ip_a)):
        if (
            ip is not None
            and ip.is_unspecified
            and (ip.version == 6 or other is None or other.version == 4)
        ):
            return True
    names = {"localhost": ("127.0.0.1", "::1")}
    for name, other_host in ((a.lower(), b), (b.lower(), a)):
        if name in names and other_host in names[name]:
            return True
    return False


def _same_listener(a: ListenSpec, b: ListenSpec) -> bool:
    if a.scheme != b.scheme:
        return False
    if a.scheme == "unix":
        return a.path == b.path
    return a.port == b.port and a.port != 0 and _hosts_overlap(a.host, b.host)


def _check_collisions(bound: list[_Bound], problems: _Problems) -> None:
    """Two listeners on one port (overlapping hosts) or one unix path: reported once."""
    for i, later in enumerate(bound):
        for earlier in bound[:i]:
            if later.scheme != earlier.scheme:
                continue
            if later.scheme == "unix":
                clash = later.path == earlier.path
                what = _show(later.path)
            else:
                clash = (
                    later.port == earlier.port
                    and later.port != 0
                    and _hosts_overlap(later.host, earlier.host)
                )
                what = f"port {later.port}"
            if clash and later.owner != earlier.owner:
                where = (
                    earlier.key
                    if earlier.file == later.file
                    else (f"{earlier.key} in {earlier.file}")
                )
                problems.add(
                    later.file, later.key, f"{what} is already used by {earlier.owner} ({where})"
                )
                break


# ---------------------------------------------------------------------------------------
# entry points


def parse_config(text: str, path: str = "svcd.toml") -> Config:
    """Validate `text` as the main config file at `path` (includes are read from disk).

    Raises ConfigError listing every problem.
    """
    problems = _Problems()
    loader = _Loader(problems)
    loader.add(path, os.path.abspath(path), text, ())
    return _build(loader, path, text, problems)


def load_config(path: str) -> Config:
    """Read and validate the config file at `path` and its includes.

    Raises ConfigError listing every problem (an unreadable file is one).
    """
    problems = _Problems()
    text = _read_text(path, path, problems)
    if text is None:
        raise ConfigError(problems.items)
    loader = _Loader(problems)
    loader.add(path, os.path.abspath(path), text, ())
    return _build(loader, path, text, problems)


def _build(loader: _Loader, path: str, text: str, problems: _Problems) -> Config:
    if not loader.documents:
        raise ConfigError(problems.items)  # the main file did not parse: nothing to check
    main = loader.documents[0]
    top = _Table(problems, main.display, "", main.data, main.base_dir)
    top.seen.add("include")  # read by the loader
    agent_table = top.sub("agent")
    registry_table = top.sub("registry")
    services_table = top.sub("services")
    top.finish()

    registry = _read_registry(registry_table) if registry_table is not None else None
    agent = _read_agent(agent_table, main.base_dir, problems, main.display)
    default_delay = registry.deregister_delay if registry is not None else 0.0

    tables: list[_Table] = [] if services_table is None else [services_table]
    for doc in loader.documents[1:]:
        inc = _Table(problems, doc.display, "", doc.data, doc.base_dir)
        inc.seen.add("include")
        for key in doc.data:
            if key in ("agent", "registry"):
                inc.seen.add(key)
                inc.problem(key, f"only the main config file ({main.display}) may set [{key}]")
        sub = inc.sub("services")
        _finish_with(inc, INCLUDED_KEYS)
        if sub is not None:
            tables.append(sub)

    services: dict[str, ServiceSpec] = {}
    defined_in: dict[str, str] = {}
    bound: list[_Bound] = []
    for table in tables:
        for name in list(table.data):
            table.seen.add(name)
            key = table.key(name)
            if len(name) > MAX_NAME or not SERVICE_NAME_RE.fullmatch(name):
                table.problem(
                    name,
                    "a service name is lowercase letters, digits, '_' and '-', "
                    f"starting with a letter or digit, at most {MAX_NAME} long",
                )
                continue
            if name in RESERVED_SERVICE_NAMES:
                table.problem(name, f"{_show(name)} is reserved by svcd (a health service name)")
                continue
            if name in defined_in:
                table.problem(
                    name, f"service {_show(name)} is already defined in {defined_in[name]}"
                )
                continue
            defined_in[name] = table.file
            service_table = table.sub(name)
            if service_table is None:
                continue
            spec, listeners = _read_service(service_table, name, default_delay)
            if spec is not None:
                services[name] = spec
            for i, listener in listeners:
                bound.append(
                    _Bound(
                        table.file,
                        f"{key}.listen[{i}]",
                        f"service {name}",
                        listener.scheme,
                        listener.host,
                        listener.port,
                        listener.path,
                    )
                )

    # the agent's own listeners first: a service that takes their port is the one at fault
    agent_bound: list[_Bound] = [
        _Bound(main.display, "agent.control_socket", "agent", "unix", path=agent.control_socket)
    ]
    for key in ("control_address", "probe_address", "metrics_address"):
        address = getattr(agent, key)
        if address is not None:
            parsed = _parse_host_port(address)
            assert not isinstance(parsed, str) and parsed[1] is not None
            agent_bound.append(
                _Bound(main.display, f"agent.{key}", f"agent {key}", "tcp", parsed[0], parsed[1])
            )
    _check_collisions(agent_bound + bound, problems)

    if problems.items:
        raise ConfigError(problems.items)
    return Config(
        agent=agent,
        registry=registry,
        services=MappingProxyType(services),
        path=os.path.abspath(path),
        text=text,
        files=tuple(doc.path for doc in loader.documents),
    )


# ---------------------------------------------------------------------------------------
# reload plans


#: keys whose values are never printed (plans go to logs and terminals)
SECRET_KEYS = frozenset({"registry.password", "env"})


@dataclass(frozen=True)
class Change:
    """One changed setting: dotted `key`, old and new values as text, and a summary."""

    key: str
    old: str
    new: str
    summary: str

    def as_dict(self) -> dict[str, str]:
        return {"key": self.key, "old": self.old, "new": self.new, "summary": self.summary}


@dataclass(frozen=True)
class ServicePlan:
    """What changes in one service."""

    name: str
    changes: tuple[Change, ...]

    @property
    def summary(self) -> str:
        return ", ".join(c.summary for c in self.changes)

    def as_dict(self) -> dict[str, Any]:
        return {"service": self.name, "changes": [c.as_dict() for c in self.changes]}


@dataclass(frozen=True)
class ReloadPlan:
    """What applying `config` on top of the running config does.

    `rollout`: new processes (ServiceSpec.needs_rollout); `live`: applied to running
    workers; `agent_changes`: [agent]/[registry] settings that only an agent restart
    applies (a reload leaves them as they were).
    """

    config: Config
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    rollout: tuple[ServicePlan, ...] = ()
    live: tuple[ServicePlan, ...] = ()
    unchanged: tuple[str, ...] = ()
    agent_changes: tuple[Change, ...] = ()

    @property
    def empty(self) -> bool:
        """Nothing to do for the services (agent changes do not count: a reload skips them)."""
        return not (self.added or self.removed or self.rollout or self.live)

    def lines(self) -> list[str]:
        out: list[str] = []
        for name in self.added:
            count = self.config.services[name].count
            out.append(f"+ {name} (new, {count} worker{'s' if count != 1 else ''})")
        out.extend(f"- {name}" for name in self.removed)
        out.extend(f"~ {p.name}: rolling reload ({p.summary})" for p in self.rollout)
        out.extend(f"~ {p.name}: live ({p.summary})" for p in self.live)
        out.extend(f"= {name} unchanged" for name in self.unchanged)
        out.extend(f"! {c.summary} (needs an agent restart)" for c in self.agent_changes)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "added": [{"service": n, "count": self.config.services[n].count} for n in self.added],
            "removed": list(self.removed),
            "rollout": [p.as_dict() for p in self.rollout],
            "live": [p.as_dict() for p in self.live],
            "unchanged": list(self.unchanged),
            "agent_changes": [c.as_dict() for c in self.agent_changes],
        }


def _text(value: object) -> str:
    """A setting's value for a plan line."""
    if value is None:
        return "unset"
    if isinstance(value, ListenSpec):
        return value.url
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_text(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return _show(value) if isinstance(value, (bool, float)) else str(value)


def _mode_text(value: object) -> str:
    return f"{value:#05o}" if isinstance(value, int) else _text(value)


def _change(key: str, old: object, new: object, *, rollout: bool) -> Change:
    name = key.rsplit(".", 1)[-1]
    if key in SECRET_KEYS or name in SECRET_KEYS:
        detail = ""
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            names = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
            detail = f" ({', '.join(names)})"
        return Change(key, "", "", f"{key} changed{detail}")
    if key.endswith("listen") and isinstance(old, tuple) and isinstance(new, tuple):
        old_urls, new_urls = [s.url for s in old], [s.url for s in new]
        moved = [f"+{u}" for u in new_urls if u not in old_urls]
        moved += [f"-{u}" for u in old_urls if u not in new_urls]
        detail = ", ".join(moved) or "backlog or order"
        return Change(key, _text(old), _text(new), f"{key} changed ({detail})")
    if name == "umask" or name.endswith("_mode"):
        old_mode, new_mode = (_mode_text(v) for v in (old, new))
        return Change(key, old_mode, new_mode, f"{key} {old_mode} -> {new_mode}")
    if rollout and name in ("command", "cwd", "env_file", "rlimits"):
        return Change(key, _text(old), _text(new), f"{key} changed")
    return Change(key, _text(old), _text(new), f"{key} {_text(old)} -> {_text(new)}")


def _diff(
    prefix: str, old: object, new: object, *, rollout_fields: Iterable[str] = ()
) -> list[Change]:
    rolled = set(rollout_fields)
    out: list[Change] = []
    for f in fields(old):  # type: ignore[arg-type]
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        key = f"{prefix}{f.name}"
        if is_dataclass(a) and is_dataclass(b) and not isinstance(a, type):
            out.extend(_diff(f"{key}.", a, b))
        else:
            out.append(_change(key, a, b, rollout=f.name in rolled))
    return out


def plan(old: Config | None, new: Config) -> ReloadPlan:
    """What a reload from `old` (None: nothing running yet) to `new` does."""
    if old is None:
        return ReloadPlan(config=new, added=tuple(new.services))
    added = tuple(n for n in new.services if n not in old.services)
    removed = tuple(n for n in old.services if n not in new.services)
    rollout: list[ServicePlan] = []
    live: list[ServicePlan] = []
    unchanged: list[str] = []
    for name, spec in new.services.items():
        before = old.services.get(name)
        if before is None:
            continue
        if before == spec:
            unchanged.append(name)
            continue
        changes = tuple(_diff("", before, spec, rollout_fields=ROLLOUT_FIELDS))
        (rollout if before.needs_rollout(spec) else live).append(ServicePlan(name, changes))
    agent = _diff("agent.", old.agent, new.agent)
    if old.registry is None or new.registry is None:
        if old.registry != new.registry:
            agent.append(
                Change(
                    "registry",
                    _registry_text(old.registry),
                    _registry_text(new.registry),
                    f"registry {_registry_text(old.registry)} -> {_registry_text(new.registry)}",
                )
            )
    else:
        # deregister_delay is only the default of each service's own: it shows there, live
        agent.extend(
            c
            for c in _diff("registry.", old.registry, new.registry)
            if c.key != "registry.deregister_delay"
        )
    return ReloadPlan(
        config=new,
        added=added,
        removed=removed,
        rollout=tuple(rollout),
        live=tuple(live),
        unchanged=tuple(unchanged),
        agent_changes=tuple(agent),
    )


def _registry_text(registry: RegistrySettings | None) -> str:
    if registry is None:
        return "none"
    if registry.embedded:
        return '"embedded"'
    return _text(registry.endpoints)


# ---------------------------------------------------------------------------------------
# svcd check-config


def check_config_main(path: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """`svcd check-config FILE`: 0 and `FILE: OK (N services)`, or 2 and every problem."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=err)
        return 2
    count = len(config.services)
    print(f"{path}: OK ({count} service{'s' if count != 1 else ''})", file=out)
    return 0
