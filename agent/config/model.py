"""What a parsed config is: the frozen result (`Config` and its settings) and its errors.

Invariants: every class here is immutable (frozen dataclasses; mappings are
`MappingProxyType`); a `Config` is only ever built from values that passed every check,
so nothing downstream re-validates. A `ConfigError` always carries at least one
`ConfigProblem`, and each problem names its file and, unless the whole file is at
fault, its dotted key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from supervisor.spec import ServiceSpec

DEFAULT_SOCKET_MODE = 0o600
DEFAULT_TTL = 10
DEFAULT_REGISTRY_TIMEOUT = 5.0
DEFAULT_PREFIX = "/svcd"

LogFormat = Literal["text", "json"]
LOG_FORMATS: dict[str, LogFormat] = {"text": "text", "json": "json"}
Role = Literal["read", "admin"]


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
