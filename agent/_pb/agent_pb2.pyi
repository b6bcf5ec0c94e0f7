from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: _Optional[str] = ...) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("name", "version", "pid", "uptime_s", "registry")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    pid: int
    uptime_s: float
    registry: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., pid: _Optional[int] = ..., uptime_s: _Optional[float] = ..., registry: _Optional[str] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker", "index", "pid", "generation", "state", "ready", "health", "restarts", "uptime_s", "rss_bytes", "cpu_percent", "connections", "requests", "qps", "cpu_seconds", "send_fail", "timers", "bytes_in", "bytes_out", "started_at", "health_reason", "status_text", "last_exit", "exit_counts", "metrics", "num_fds", "num_threads", "last_exit_reason")
    class ExitCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    WORKER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QPS_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SEND_FAIL_FIELD_NUMBER: _ClassVar[int]
    TIMERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    HEALTH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATUS_TEXT_FIELD_NUMBER: _ClassVar[int]
    LAST_EXIT_FIELD_NUMBER: _ClassVar[int]
    EXIT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    NUM_FDS_FIELD_NUMBER: _ClassVar[int]
    NUM_THREADS_FIELD_NUMBER: _ClassVar[int]
    LAST_EXIT_REASON_FIELD_NUMBER: _ClassVar[int]
    worker: str
    index: int
    pid: int
    generation: int
    state: str
    ready: bool
    health: str
    restarts: int
    uptime_s: float
    rss_bytes: float
    cpu_percent: float
    connections: int
    requests: int
    qps: float
    cpu_seconds: float
    send_fail: int
    timers: int
    bytes_in: int
    bytes_out: int
    started_at: float
    health_reason: str
    status_text: str
    last_exit: str
    exit_counts: _containers.ScalarMap[str, int]
    metrics: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    num_fds: int
    num_threads: int
    last_exit_reason: str
    def __init__(self, worker: _Optional[str] = ..., index: _Optional[int] = ..., pid: _Optional[int] = ..., generation: _Optional[int] = ..., state: _Optional[str] = ..., ready: _Optional[bool] = ..., health: _Optional[str] = ..., restarts: _Optional[int] = ..., uptime_s: _Optional[float] = ..., rss_bytes: _Optional[float] = ..., cpu_percent: _Optional[float] = ..., connections: _Optional[int] = ..., requests: _Optional[int] = ..., qps: _Optional[float] = ..., cpu_seconds: _Optional[float] = ..., send_fail: _Optional[int] = ..., timers: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., started_at: _Optional[float] = ..., health_reason: _Optional[str] = ..., status_text: _Optional[str] = ..., last_exit: _Optional[str] = ..., exit_counts: _Optional[_Mapping[str, int]] = ..., metrics: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ..., num_fds: _Optional[int] = ..., num_threads: _Optional[int] = ..., last_exit_reason: _Optional[str] = ...) -> None: ...

class ServiceStatus(_message.Message):
    __slots__ = ("name", "state", "desired", "ready", "generation", "workers", "listen", "required_ready", "reloads", "advertise", "meta", "log_lines_dropped", "log_lines_cut", "templates")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    LISTEN_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_READY_FIELD_NUMBER: _ClassVar[int]
    RELOADS_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    LOG_LINES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    LOG_LINES_CUT_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    desired: int
    ready: int
    generation: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    listen: _containers.RepeatedScalarFieldContainer[str]
    required_ready: int
    reloads: int
    advertise: str
    meta: _containers.ScalarMap[str, str]
    log_lines_dropped: int
    log_lines_cut: int
    templates: _containers.RepeatedCompositeFieldContainer[PreloadTemplate]
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., desired: _Optional[int] = ..., ready: _Optional[int] = ..., generation: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., listen: _Optional[_Iterable[str]] = ..., required_ready: _Optional[int] = ..., reloads: _Optional[int] = ..., advertise: _Optional[str] = ..., meta: _Optional[_Mapping[str, str]] = ..., log_lines_dropped: _Optional[int] = ..., log_lines_cut: _Optional[int] = ..., templates: _Optional[_Iterable[_Union[PreloadTemplate, _Mapping]]] = ...) -> None: ...

class PreloadTemplate(_message.Message):
    __slots__ = ("pid", "generation", "rss_bytes", "uptime_s", "forks")
    PID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    FORKS_FIELD_NUMBER: _ClassVar[int]
    pid: int
    generation: int
    rss_bytes: float
    uptime_s: float
    forks: int
    def __init__(self, pid: _Optional[int] = ..., generation: _Optional[int] = ..., rss_bytes: _Optional[float] = ..., uptime_s: _Optional[float] = ..., forks: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("agent", "services")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    agent: AgentInfo
    services: _containers.RepeatedCompositeFieldContainer[ServiceStatus]
    def __init__(self, agent: _Optional[_Union[AgentInfo, _Mapping]] = ..., services: _Optional[_Iterable[_Union[ServiceStatus, _Mapping]]] = ...) -> None: ...

class ServiceRequest(_message.Message):
    __slots__ = ("service", "no_wait")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    NO_WAIT_FIELD_NUMBER: _ClassVar[int]
    service: str
    no_wait: bool
    def __init__(self, service: _Optional[str] = ..., no_wait: _Optional[bool] = ...) -> None: ...

class ActionResponse(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ("service", "dry_run", "previous", "no_wait")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    NO_WAIT_FIELD_NUMBER: _ClassVar[int]
    service: str
    dry_run: bool
    previous: bool
    no_wait: bool
    def __init__(self, service: _Optional[str] = ..., dry_run: _Optional[bool] = ..., previous: _Optional[bool] = ..., no_wait: _Optional[bool] = ...) -> None: ...

class ReloadResult(_message.Message):
    __slots__ = ("ok", "message", "plan")
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    message: str
    plan: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ok: _Optional[bool] = ..., message: _Optional[str] = ..., plan: _Optional[_Iterable[str]] = ...) -> None: ...

class ReloadUpdate(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: str
    result: ReloadResult
    def __init__(self, progress: _Optional[str] = ..., result: _Optional[_Union[ReloadResult, _Mapping]] = ...) -> None: ...

class ScaleRequest(_message.Message):
    __slots__ = ("service", "count")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    service: str
    count: int
    def __init__(self, service: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class LogsRequest(_message.Message):
    __slots__ = ("service", "n", "follow", "worker")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    service: str
    n: int
    follow: bool
    worker: int
    def __init__(self, service: _Optional[str] = ..., n: _Optional[int] = ..., follow: _Optional[bool] = ..., worker: _Optional[int] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("time", "service", "worker", "pid", "stream", "line")
    TIME_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    time: float
    service: str
    worker: int
    pid: int
    stream: str
    line: str
    def __init__(self, time: _Optional[float] = ..., service: _Optional[str] = ..., worker: _Optional[int] = ..., pid: _Optional[int] = ..., stream: _Optional[str] = ..., line: _Optional[str] = ...) -> None: ...

class EventsRequest(_message.Message):
    __slots__ = ("follow", "n")
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    follow: bool
    n: int
    def __init__(self, follow: _Optional[bool] = ..., n: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("time", "type", "service", "worker", "pid", "generation", "message", "fields")
    TIME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    time: float
    type: str
    service: str
    worker: str
    pid: int
    generation: int
    message: str
    fields: _struct_pb2.Struct
    def __init__(self, time: _Optional[float] = ..., type: _Optional[str] = ..., service: _Optional[str] = ..., worker: _Optional[str] = ..., pid: _Optional[int] = ..., generation: _Optional[int] = ..., message: _Optional[str] = ..., fields: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("kind", "service")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    service: str
    def __init__(self, kind: _Optional[str] = ..., service: _Optional[str] = ...) -> None: ...

class ProbeResponse(_message.Message):
    __slots__ = ("ok", "message")
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    message: str
    def __init__(self, ok: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class RegistryInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RegistryInfoResponse(_message.Message):
    __slots__ = ("enabled", "endpoints", "prefix", "ca_cert", "cert", "key", "username", "password")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    CA_CERT_FIELD_NUMBER: _ClassVar[int]
    CERT_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    endpoints: _containers.RepeatedScalarFieldContainer[str]
    prefix: str
    ca_cert: str
    cert: str
    key: str
    username: str
    password: str
    def __init__(self, enabled: _Optional[bool] = ..., endpoints: _Optional[_Iterable[str]] = ..., prefix: _Optional[str] = ..., ca_cert: _Optional[str] = ..., cert: _Optional[str] = ..., key: _Optional[str] = ..., username: _Optional[str] = ..., password: _Optional[str] = ...) -> None: ...
