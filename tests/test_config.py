"""agent.config: valid configs, the error matrix, includes, relative paths, ports, check-config."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import resource
from pathlib import Path
from types import MappingProxyType

import pytest

from agent import paths
from agent.config import (
    MAX_FILE_BYTES,
    AgentSettings,
    Config,
    ConfigError,
    ConfigProblem,
    RegistrySettings,
    check_config_main,
    load_config,
    parse_config,
)
from supervisor.spec import BackoffSpec, HealthSpec, ListenSpec, LogSpec, ServiceSpec

MINIMAL = '[services.api]\ncommand = ["true"]\n'


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str, name: str = "svcd.toml") -> Config:
    return load_config(str(write(tmp_path, name, text)))


def problems(tmp_path: Path, text: str) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert info.value.problems, "a ConfigError always names at least one problem"
    return info.value.problems


def service(body: str, name: str = "api") -> str:
    return f'[services.{name}]\ncommand = ["true"]\n{body}\n'


# ---------------------------------------------------------------------------------------
# what a good config becomes


SPEC_EXAMPLE = """
[agent]
name = "web-1"
control_socket = "run/svcd.sock"
probe_address = "0.0.0.0:7071"
metrics_address = "127.0.0.1:9464"
log_dir = "logs"

[registry]
endpoints = ["http://127.0.0.1:2379"]
prefix = "/svcd"
ttl = 10

[services.api]
command = ["python", "-m", "myapp"]
count = 4
cwd = "."
listen = ["tcp://0.0.0.0:8080"]
restart = "always"
ready = "notify"
graceful_timeout = 30
max_memory = "512MiB"
env = { LOG_LEVEL = "info" }
[services.api.health]
kind = "http"
path = "/healthz"
interval = 2
timeout = 1
rise = 2
fall = 3
"""


def test_the_spec_example_parses(tmp_path: Path) -> None:
    config = load(tmp_path, SPEC_EXAMPLE)
    assert config.agent.name == "web-1"
    assert config.agent.control_socket == str(tmp_path / "run" / "svcd.sock")
    assert config.agent.log_dir == str(tmp_path / "logs")
    assert config.agent.probe_address == "0.0.0.0:7071"
    assert config.registry is not None
    assert config.registry.endpoints == ("http://127.0.0.1:2379",)
    assert config.registry.ttl == 10 and not config.registry.embedded
    api = config.services["api"]
    assert api.command == ("python", "-m", "myapp")
    assert api.count == 4
    assert api.cwd == str(tmp_path)
    assert api.listen == (
        ListenSpec(url="tcp://0.0.0.0:8080", scheme="tcp", host="0.0.0.0", port=8080),
    )
    assert api.max_memory == 512 * 1024 * 1024
    assert dict(api.env) == {"LOG_LEVEL": "info"}
    assert api.health.kind == "http" and api.health.interval == 2.0
    assert config.path == str(tmp_path / "svcd.toml")
    assert config.text == SPEC_EXAMPLE
    assert config.files == (str(tmp_path / "svcd.toml"),)


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SVCD_SOCKET", raising=False)
    config = load(tmp_path, MINIMAL)
    assert config.registry is None
    assert config.agent.control_socket == paths.default_control_socket()
    assert config.agent.state_dir == paths.default_state_dir()
    assert config.agent.log_dir == paths.default_log_dir()
    assert config.agent.control_socket_mode == 0o600
    assert config.agent.control_allow_uids == tuple(dict.fromkeys((0, os.geteuid())))
    assert config.agent.log_format == "text" and config.agent.drain_delay == 0.0
    assert config.services["api"] == ServiceSpec(name="api", command=("true",))


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL)
    with pytest.raises(AttributeError):
        config.agent = config.agent  # type: ignore[misc]
    assert isinstance(config.services, MappingProxyType)
    with pytest.raises(TypeError):
        config.services["x"] = config.services["api"]  # type: ignore[index]


def test_every_service_key(tmp_path: Path) -> None:
    write(tmp_path, "app.env", "A=1\n")
    text = service(
        """
count = 3
cwd = "."
user = "root"
group = "root"
env = { PORT = 8080, NAME = "x" }
env_file = "app.env"
stop_signal = "int"
listen = ["tcp://[::1]:9000", { url = "unix://run/app.sock", backlog = 128 }]
restart = "on-failure"
ready = "health"
ready_timeout = "90s"
graceful_timeout = "1m"
max_memory = "1G"
watchdog = 10
max_surge = 2
max_unavailable = 1
min_ready = 2
umask = "0027"
preload = true
[services.api.rlimits]
nofile = 4096
core = "unlimited"
stack = "8MiB"
[services.api.health]
kind = "grpc"
grpc_service = "api.v1"
interval = "500ms"
rise = 1
fall = 5
start_period = 3
on_failure = "unready"
[services.api.backoff]
initial = 0
first_delay = 0.5
factor = 3
max = 20
jitter = 0.2
stable_after = 30
start_limit = 3
fatal_retry = 120
[services.api.logs]
max_size = "1MiB"
backups = 2
ring_lines = 50
max_line = "4KiB"
format = "json"
[services.api.registry]
advertise = "10.0.0.5"
deregister_delay = 2
meta = { zone = "a", weight = 3 }
"""
    )
    api = load(tmp_path, text).services["api"]
    assert api.count == 3 and api.user == "root" and api.group == "root"
    assert dict(api.env) == {"PORT": "8080", "NAME": "x"}
    assert api.env_file == str(tmp_path / "app.env")
    assert api.stop_signal == "SIGINT"
    assert api.listen[0].host == "::1" and api.listen[0].port == 9000
    assert api.listen[1].scheme == "unix"
    assert api.listen[1].path == str(tmp_path / "run" / "app.sock")
    assert api.listen[1].backlog == 128
    assert (api.restart, api.ready) == ("on-failure", "health")
    assert (api.ready_timeout, api.graceful_timeout) == (90.0, 60.0)
    assert api.max_memory == 1 << 30 and api.watchdog == 10.0
    assert (api.max_surge, api.max_unavailable, api.min_ready) == (2, 1, 2)
    assert api.umask == 0o027 and api.preload
    assert dict(api.rlimits) == {
        "nofile": 4096,
        "core": resource.RLIM_INFINITY,
        "stack": 8 << 20,
    }
    health = api.health
    assert (health.kind, health.grpc_service, health.interval) == ("grpc", "api.v1", 0.5)
    assert health.timeout == 0.25, "an unset timeout follows a short interval"
    assert (health.rise, health.fall, health.start_period) == (1, 5, 3.0)
    assert health.on_failure == "unready"
    assert api.backoff.factor == 3.0 and api.backoff.start_limit == 3
    assert api.logs.max_bytes == 1 << 20 and api.logs.max_line == 4096
    assert api.logs.format == "json" and api.logs.ring_lines == 50
    assert api.advertise == "10.0.0.5" and api.deregister_delay == 2.0
    assert dict(api.meta) == {"zone": "a", "weight": "3"}


def test_string_command_is_split_like_a_shell_never_run_by_one(tmp_path: Path) -> None:
    text = "[services.api]\ncommand = \"python -c 'print(1); exit' $HOME > out\"\n"
    api = load(tmp_path, text).services["api"]
    assert api.command == ("python", "-c", "print(1); exit", "$HOME", ">", "out")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1024", 1024),
        ('"512MiB"', 512 << 20),
        ('"1G"', 1 << 30),
        ('"1g"', 1 << 30),
        ('"100kB"', 100_000),
        ('"2 MB"', 2_000_000),
        ('"1.5GiB"', 3 << 29),
    ],
)
def test_sizes(tmp_path: Path, value: str, expected: int) -> None:
    api = load(tmp_path, service(f"[services.api.logs]\nmax_bytes = {value}")).services["api"]
    assert api.logs.max_bytes == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("30", 30.0), ("2.5", 2.5), ('"250ms"', 0.25), ('"5m"', 300.0), ('"1h"', 3600.0)],
)
def test_durations(tmp_path: Path, value: str, expected: float) -> None:
    api = load(tmp_path, service(f"graceful_timeout = {value}")).services["api"]
    assert api.graceful_timeout == expected


def test_registry_settings(tmp_path: Path) -> None:
    for name in ("ca.pem", "c.pem", "k.pem"):
        write(tmp_path, name, "x")
    text = MINIMAL + (
        '[registry]\nendpoints = ["https://127.0.0.1:2379", "https://etcd-1.internal:2379"]\n'
        'prefix = "/prod"\nttl = 5\ntimeout = 2\nusername = "u"\npassword = "p"\n'
        'ca_cert = "ca.pem"\ncert = "c.pem"\nkey = "k.pem"\ngrpc_naming_prefix = "/grpc/api/"\n'
        "deregister_delay = 1.5\n"
    )
    config = load(tmp_path, text)
    registry = config.registry
    assert registry is not None
    assert registry.endpoints == ("https://127.0.0.1:2379", "https://etcd-1.internal:2379")
    assert (registry.prefix, registry.ttl, registry.timeout) == ("/prod", 5, 2.0)
    assert (registry.username, registry.password) == ("u", "p")
    assert registry.ca_cert == str(tmp_path / "ca.pem")
    assert registry.grpc_naming_prefix == "/grpc/api/"
    assert "p'" not in repr(registry), "the password stays out of reprs (and so of logs)"
    assert "password" not in repr(config), "nor does the raw text"
    # the registry's deregister_delay is the default of every service's own
    assert config.services["api"].deregister_delay == 1.5


def test_registry_password_file(tmp_path: Path) -> None:
    """A mounted secret: read at load, its final newline dropped; bad files named."""
    write(tmp_path, "secret", "s3cret\n")
    base = MINIMAL + "[registry]\nendpoints = 'embedded'\nusername = 'u'\n"
    registry = load(tmp_path, base + "password_file = 'secret'\n").registry
    assert registry is not None and registry.password == "s3cret"
    write(tmp_path, "empty", "")
    for extra, reason in (
        ("password_file = 'empty'\n", "is empty"),
        ("password_file = 'missing'\n", "not an existing file"),
        ("password_file = 'secret'\npassword = 'p'\n", "not both"),
    ):
        with pytest.raises(ConfigError) as info:
            load(tmp_path, base + extra)
        assert any(
            p.key == "registry.password_file" and reason in p.reason
            for p in info.value.problems
        ), (extra, info.value.problems)


def test_embedded_registry(tmp_path: Path) -> None:
    registry = load(tmp_path, MINIMAL + '[registry]\nendpoints = "embedded"\n').registry
    assert registry is not None and registry.embedded and registry.endpoints == ()


def test_agent_control_settings(tmp_path: Path) -> None:
    for name in ("cert.pem", "key.pem", "ca.pem"):
        write(tmp_path, name, "x")
    text = MINIMAL + (
        '[agent]\ncontrol_group = "root"\ncontrol_allow_uids = [0, "root", 1000]\n'
        'control_address = "127.0.0.1:7443"\ntls_cert = "cert.pem"\ntls_key = "key.pem"\n'
        'tls_ca = "ca.pem"\nroles = { "ops" = "admin", "grafana" = "read" }\n'
        'log_format = "json"\ndrain_delay = 5\nstate_dir = "state"\n'
    )
    agent = load(tmp_path, text).agent
    assert agent.control_group == 0
    assert agent.control_socket_mode == 0o660, "a control_group gets group access by default"
    assert agent.control_allow_uids == (0, 1000)
    assert agent.control_allow_gids == (0,)
    assert agent.control_address == "127.0.0.1:7443"
    assert agent.tls_ca == str(tmp_path / "ca.pem")
    assert dict(agent.roles) == {"ops": "admin", "grafana": "read"}
    assert (agent.log_format, agent.drain_delay) == ("json", 5.0)
    assert agent.state_dir == str(tmp_path / "state")


def test_socket_env_sets_the_default_control_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SVCD_SOCKET", str(tmp_path / "s.sock"))
    assert load(tmp_path, MINIMAL).agent.control_socket == str(tmp_path / "s.sock")


# ---------------------------------------------------------------------------------------
# the error matrix: each bad value is rejected, naming its key

ERRORS = [
    # (config text, key, part of the reason)
    (service("count = 0"), "services.api.count", "must be >= 1, got 0"),
    (service('count = "4"'), "services.api.count", 'must be an integer, got a string ("4")'),
    (service("count = 100000"), "services.api.count", "must be <= 1024"),
    (service("count = true"), "services.api.count", "got a boolean"),
    (service("workers = 2"), "services.api.workers", 'unknown key (did you mean "count"?)'),
    (service("comand = []"), "services.api.comand", 'did you mean "command"?'),
    ("[services.api]\ncount = 1\n", "services.api.command", "is required"),
    ("[services.api]\ncommand = []\n", "services.api.command", "must not be empty"),
    ('[services.api]\ncommand = ""\n', "services.api.command", "must not be empty"),
    ("[services.api]\ncommand = [1]\n", "services.api.command[0]", "must be a string"),
    ('[services.api]\ncommand = "a \'b"\n', "services.api.command", "cannot split"),
    ("[services.api]\ncommand = 3\n", "services.api.command", "must be an array"),
    (service('cwd = "/no/such/dir"'), "services.api.cwd", "not an existing directory"),
    (service('user = "no-such-user-x"'), "services.api.user", "no such user"),
    (service('group = "no-such-group-x"'), "services.api.group", "no such group"),
    (service('env_file = "missing.env"'), "services.api.env_file", "not an existing file"),
    (service("env = { 1BAD = 'x' }"), "services.api.env.1BAD", "not a valid environment"),
    (service("env = { LISTEN_FDS = '3' }"), "services.api.env.LISTEN_FDS", "set by svcd"),
    (service("env = { DEBUG = true }"), "services.api.env.DEBUG", "quote it"),
    (service('env = "A=1"'), "services.api.env", "must be a table"),
    (service('stop_signal = "SIGTREM"'), "services.api.stop_signal", 'mean "SIGTERM"'),
    (service("stop_signal = 999"), "services.api.stop_signal", "not a signal number"),
    (service('restart = "sometimes"'), "services.api.restart", 'one of "always"'),
    (service('ready = "ready"'), "services.api.ready", "must be one of"),
    (service("graceful_timeout = 0"), "services.api.graceful_timeout", "must be > 0 s"),
    (service("graceful_timeout = -1"), "services.api.graceful_timeout", "must be > 0 s"),
    (service("graceful_timeout = inf"), "services.api.graceful_timeout", "finite"),
    (service("graceful_timeout = nan"), "services.api.graceful_timeout", "finite"),
    (service('graceful_timeout = "30 sec"'), "services.api.graceful_timeout", "duration"),
    (service("ready_timeout = 1e20"), "services.api.ready_timeout", "must be <="),
    (service("watchdog = 0"), "services.api.watchdog", "must be > 0"),
    (service('max_memory = "512XB"'), "services.api.max_memory", 'like "512MiB"'),
    (service("max_memory = 512"), "services.api.max_memory", '"512MiB"'),
    (service('max_memory = "99999999999PiB"'), "services.api.max_memory", "like"),
    (service('max_memory = "9999999999T"'), "services.api.max_memory", "must be <="),
    (service("max_memory = 1.5"), "services.api.max_memory", "got a float"),
    (service('umask = "0999"'), "services.api.umask", "octal"),
    (service("umask = 4096"), "services.api.umask", "between 0 and 0o777"),
    (service('preload = "yes"'), "services.api.preload", "true or false"),
    (service("max_surge = -1"), "services.api.max_surge", "must be >= 0"),
    (service("max_surge = 0"), "services.api.max_surge", "cannot both be 0"),
    (service("count = 2\nmin_ready = 3"), "services.api.min_ready", "must be <= count (2)"),
    (service('ready = "health"'), "services.api.ready", "needs a health check"),
    (service("listen = ['tcp://0.0.0.0']"), "services.api.listen[0]", "expected HOST:PORT"),
    (service("listen = ['tcp://0.0.0.0:99999']"), "services.api.listen[0]", "0 to 65535"),
    (service("listen = ['tcp://:80']"), "services.api.listen[0]", "missing host"),
    (service("listen = ['tcp://::1:80']"), "services.api.listen[0]", "in brackets"),
    (service("listen = ['tcp://[::1:80']"), "services.api.listen[0]", "missing ]"),
    (service("listen = ['tcp://bad_host!:80']"), "services.api.listen[0]", "not a host"),
    (service("listen = ['http://0.0.0.0:80']"), "services.api.listen[0]", 'use "tcp://"'),
    (service("listen = ['unix://']"), "services.api.listen[0]", "missing path"),
    (service("listen = ['unix:@abstract']"), "services.api.listen[0]", "abstract"),
    (service(f"listen = ['unix:///{'x' * 120}']"), "services.api.listen[0]", "at most 107"),
    (service("listen = [{ backlog = 5 }]"), "services.api.listen[0].url", "is required"),
    (service("listen = [{ url = 'tcp://a:1', bl = 5 }]"), "services.api.listen[0].bl", "unknown"),
    (
        service("listen = ['tcp://0.0.0.0:8080', 'tcp://0.0.0.0:8080']"),
        "services.api.listen[1]",
        "listed twice",
    ),
    (service("listen = 8080"), "services.api.listen", "must be an array of URLs"),
    (service("[services.api.rlimits]\nnofiles = 5"), "services.api.rlimits.nofiles", "nofile"),
    (service("[services.api.rlimits]\nnofile = -1"), "services.api.rlimits.nofile", ">= 0"),
    (service("[services.api.rlimits]\nnofile = 'lots'"), "services.api.rlimits.nofile", "unlim"),
    (service("[services.api.health]\npath = '/x'"), "services.api.health.kind", "is required"),
    (service("[services.api.health]\nkind = 'htp'"), "services.api.health.kind", '"http"?'),
    (service("[services.api.health]\nkind = 'exec'"), "services.api.health.command", "required"),
    (
        service("[services.api.health]\nkind = 'tcp'\npath = '/x'"),
        "services.api.health.path",
        'only used with kind = "http"',
    ),
    (
        service("[services.api.health]\nkind = 'http'\npath = 'healthz'"),
        "services.api.health.path",
        'must start with "/"',
    ),
    (
        service("[services.api.health]\nkind = 'http'\nexpect_status = '399-200'"),
        "services.api.health.expect_status",
        "low to high",
    ),
    (
        service("[services.api.health]\nkind = 'http'\nexpect_status = 'ok'"),
        "services.api.health.expect_status",
        "200-399",
    ),
    (
        service("[services.api.health]\nkind = 'tcp'\ninterval = 1\ntimeout = 1"),
        "services.api.health.timeout",
        "shorter than interval",
    ),
    (
        service("[services.api.health]\nkind = 'tcp'\nrise = 0"),
        "services.api.health.rise",
        ">= 1",
    ),
    (
        service("[services.api.health]\nkind = 'tcp'\non_failure = 'ignore'"),
        "services.api.health.on_failure",
        '"unready"',
    ),
    (
        service(
            "ready = 'health'\nready_timeout = 2\n[services.api.health]\nkind = 'tcp'\ninterval = 5"
        ),
        "services.api.ready_timeout",
        "longer than health.interval",
    ),
    (service("[services.api.backoff]\nfactor = 0.5"), "services.api.backoff.factor", ">= 1"),
    (service("[services.api.backoff]\njitter = 2"), "services.api.backoff.jitter", "<= 1"),
    (
        service("[services.api.backoff]\nfirst_delay = 5\nmax = 1"),
        "services.api.backoff.max",
        ">= first_delay",
    ),
    (
        service("[services.api.backoff]\nstart_limit = 0"),
        "services.api.backoff.start_limit",
        ">= 1",
    ),
    (service("[services.api.logs]\nmax_bytes = 0"), "services.api.logs.max_bytes", ">= 1"),
    (
        service("[services.api.logs]\nmax_bytes = 10\nmax_size = '1MiB'"),
        "services.api.logs.max_size",
        "keep one",
    ),
    (service("[services.api.logs]\nformat = 'xml'"), "services.api.logs.format", '"json"'),
    (service("[services.api.logs]\nmax_line = '2GiB'"), "services.api.logs.max_line", "<="),
    (
        service("[services.api.registry]\nadvertise = 'a b'"),
        "services.api.registry.advertise",
        "not a host",
    ),
    (
        service("[services.api.registry]\nadvertise = '10.0.0.1'"),
        "services.api.registry.advertise",
        "needs a port",
    ),
    (
        service("[services.api.registry]\nmeta = { a = [1] }"),
        "services.api.registry.meta.a",
        "must be a string",
    ),
    (
        service("[services.api.health]\nkind = 'tcp'\nintervall = 3"),
        "services.api.health.intervall",
        'did you mean "interval"?',
    ),
    ('[services.Api]\ncommand = ["true"]\n', "services.Api", "lowercase"),
    ('[services."a b"]\ncommand = ["true"]\n', 'services."a b"', "lowercase"),
    ('[services.readiness]\ncommand = ["true"]\n', "services.readiness", "reserved"),
    ("[services]\napi = 3\n", "services.api", "must be a table"),
    ("services = 1\n", "services", "must be a table"),
    (MINIMAL + "[agent]\nnme = 'x'\n", "agent.nme", 'did you mean "name"?'),
    (MINIMAL + "[agent]\nname = 'a/b'\n", "agent.name", "etcd keys"),
    (MINIMAL + "[agent]\nprobe_address = '7071'\n", "agent.probe_address", "HOST:PORT"),
    (MINIMAL + "[agent]\nmetrics_address = 9464\n", "agent.metrics_address", "a string"),
    (MINIMAL + "[agent]\nlog_format = 'xml'\n", "agent.log_format", "must be one of"),
    (MINIMAL + "[agent]\ndrain_delay = -1\n", "agent.drain_delay", ">= 0"),
    (MINIMAL + "[agent]\ncontrol_socket_mode = '0888'\n", "agent.control_socket_mode", "octal"),
    (MINIMAL + "[agent]\ncontrol_allow_uids = 0\n", "agent.control_allow_uids", "an array"),
    (MINIMAL + "[agent]\ncontrol_allow_uids = [-1]\n", "agent.control_allow_uids[0]", ">= 0"),
    (
        MINIMAL + "[agent]\ncontrol_allow_gids = ['nogrp-x']\n",
        "agent.control_allow_gids[0]",
        "no such group",
    ),
    (MINIMAL + "[agent]\ncontrol_group = 'nogrp-x'\n", "agent.control_group", "no such group"),
    (
        MINIMAL + "[agent]\ncontrol_group = 'root'\ncontrol_socket_mode = 0o600\n",
        "agent.control_socket_mode",
        "no access",
    ),
    (
        MINIMAL + "[agent]\ncontrol_address = '127.0.0.1:7443'\n",
        "agent.tls_cert",
        "required with control_address",
    ),
    (MINIMAL + "[agent]\ntls_cert = 'x.pem'\n", "agent.tls_cert", "not an existing file"),
    (MINIMAL + "[agent]\nroles = { a = 'root' }\n", "agent.roles.a", '"admin"'),
    (
        MINIMAL + f"[agent]\ncontrol_socket = '/{'s' * 120}'\n",
        "agent.control_socket",
        "at most 107 bytes",
    ),
    (MINIMAL + "[registry]\nprefix = '/x'\n", "registry.endpoints", "is required"),
    (MINIMAL + "[registry]\nendpoints = []\n", "registry.endpoints", "must not be empty"),
    (MINIMAL + "[registry]\nendpoints = ['127.0.0.1:2379']\n", "registry.endpoints[0]", "http"),
    (
        MINIMAL + "[registry]\nendpoints = ['http://127.0.0.1']\n",
        "registry.endpoints[0]",
        "HOST:PORT",
    ),
    (
        MINIMAL + "[registry]\nendpoints = ['http://[::1]:2379']\n",
        "registry.endpoints[0]",
        "IPv6 etcd endpoints are not supported",
    ),
    (
        MINIMAL + "[registry]\nendpoints = 'embedded'\nprefix = 'svcd/'\n",
        "registry.prefix",
        'must start with "/"',
    ),
    (MINIMAL + "[registry]\nendpoints = 'embedded'\nttl = 0\n", "registry.ttl", ">= 1"),
    (MINIMAL + "[registry]\nendpoints = 'embedded'\nttl = 2.5\n", "registry.ttl", "integer"),
    (
        MINIMAL + "[registry]\nendpoints = 'embedded'\nusername = 'u'\n",
        "registry.password",
        "go together",
    ),
    (
        MINIMAL + "[registry]\nendpoints = 'embedded'\ngrpc_naming_prefix = '/api'\n",
        "registry.grpc_naming_prefix",
        'must end with "/"',
    ),
    (MINIMAL + "[registry]\nendpoints = 'embedded'\nttll = 3\n", "registry.ttll", '"ttl"'),
    (MINIMAL + "[agnet]\nname = 'x'\n", "agnet", 'did you mean "agent"?'),
    ("include = 'nope.toml'\n" + MINIMAL, "include[0]", "no such file"),
    ("include = '.'\n" + MINIMAL, "include[0]", "is a directory (did you mean"),
    ("include = [3]\n" + MINIMAL, "include[0]", "must be a string"),
]


@pytest.mark.parametrize(("text", "key", "reason"), ERRORS, ids=[e[1] for e in ERRORS])
def test_error_matrix(tmp_path: Path, text: str, key: str, reason: str) -> None:
    found = problems(tmp_path, text)
    assert any(p.key == key and reason in p.reason for p in found), "\n".join(map(str, found))
    assert all(p.file == str(tmp_path / "svcd.toml") for p in found)


def test_problem_format() -> None:
    problem = ConfigProblem("svcd.toml", "services.api.count", "must be >= 1, got 0")
    assert str(problem) == "svcd.toml: services.api.count: must be >= 1, got 0"
    with pytest.raises(ConfigError) as info:
        parse_config("[services.api]\ncommand = ['x']\ncount = 0\n", "svcd.toml")
    assert str(info.value) == "svcd.toml: services.api.count: must be >= 1, got 0"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = """
[agent]
nme = "x"
[services.api]
command = []
count = 0
stop_signal = "SIGNOPE"
[services.api.health]
kind = "http"
interval = -2
[services.web]
command = "x"
restart = "maybe"
[services.Bad]
command = "x"
"""
    found = {p.key for p in problems(tmp_path, text)}
    assert found == {
        "agent.nme",
        "services.api.command",
        "services.api.count",
        "services.api.stop_signal",
        "services.api.health.interval",
        "services.web.restart",
        "services.Bad",
    }


def test_no_noise_from_cross_checks_on_bad_values(tmp_path: Path) -> None:
    # count is bad: min_ready <= count must not also fire against count's default
    found = problems(tmp_path, service("count = 0\nmin_ready = 2"))
    assert [p.key for p in found] == ["services.api.count"]


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    found = problems(tmp_path, '[services.api]\ncommand = ["true"]\ncount = = 2\n')
    assert len(found) == 1
    problem = found[0]
    assert problem.line == 3 and problem.column is not None
    assert str(problem).startswith(f"{tmp_path / 'svcd.toml'}:3:{problem.column}: TOML syntax")


def test_unreadable_and_oversized_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "missing.toml"))
    assert "cannot read" in str(info.value)
    big = write(tmp_path, "big.toml", MINIMAL + "#" * MAX_FILE_BYTES)
    with pytest.raises(ConfigError) as info:
        load_config(str(big))
    assert "too large" in str(info.value)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError) as info:
        load_config(str(binary))
    assert "UTF-8" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert "not a regular file" in str(info.value)


# ---------------------------------------------------------------------------------------
# includes


def test_includes_add_services(tmp_path: Path) -> None:
    write(tmp_path, "conf.d/b.toml", service("", "web"))
    write(tmp_path, "conf.d/a.toml", service('cwd = "."', "db"))
    write(tmp_path, "conf.d/notes.txt", "not toml")
    config = load(tmp_path, 'include = ["conf.d/*.toml"]\n' + MINIMAL)
    assert list(config.services) == ["api", "db", "web"], "main first, then glob order"
    assert config.services["db"].cwd == str(tmp_path / "conf.d"), "relative to its own file"
    assert config.files == (
        str(tmp_path / "svcd.toml"),
        str(tmp_path / "conf.d" / "a.toml"),
        str(tmp_path / "conf.d" / "b.toml"),
    )


def test_include_after_a_table_gets_a_hint(tmp_path: Path) -> None:
    # TOML puts a key written after [services.api] into that table: a classic slip
    found = problems(tmp_path, MINIMAL + 'include = ["conf.d/*.toml"]\n')
    assert [p.key for p in found] == ["services.api.include"]
    assert "before the first [table]" in found[0].reason


def test_include_matching_nothing_is_fine(tmp_path: Path) -> None:
    assert list(load(tmp_path, 'include = ["conf.d/*.toml"]\n' + MINIMAL).services) == ["api"]


def test_included_file_must_not_redefine_a_service(tmp_path: Path) -> None:
    write(tmp_path, "conf.d/a.toml", service("count = 2"))
    found = problems(tmp_path, 'include = ["conf.d/*.toml"]\n' + MINIMAL)
    assert [(p.file, p.key) for p in found] == [(str(tmp_path / "conf.d/a.toml"), "services.api")]
    assert "already defined in" in found[0].reason


def test_included_file_may_only_add_services(tmp_path: Path) -> None:
    write(tmp_path, "conf.d/a.toml", "[agent]\nname = 'x'\n[servics.x]\n")
    found = problems(tmp_path, 'include = ["conf.d/*.toml"]\n' + MINIMAL)
    assert {p.key for p in found} == {"agent", "servics"}
    assert any('did you mean "services"?' in p.reason for p in found)


def test_problems_in_included_files_name_that_file(tmp_path: Path) -> None:
    write(tmp_path, "conf.d/a.toml", service("count = 0", "web"))
    write(tmp_path, "conf.d/b.toml", "[services.db\n")
    found = problems(tmp_path, 'include = ["conf.d/*.toml"]\n' + service("count = -1"))
    where = {(os.path.basename(p.file), p.key or "syntax") for p in found}
    assert where == {
        ("svcd.toml", "services.api.count"),
        ("a.toml", "services.web.count"),
        ("b.toml", "syntax"),
    }


def test_include_cycles_are_reported_not_followed(tmp_path: Path) -> None:
    write(tmp_path, "a.toml", 'include = ["b.toml"]\n' + service("", "a"))
    write(tmp_path, "b.toml", 'include = ["a.toml", "svcd.toml"]\n' + service("", "b"))
    found = problems(tmp_path, 'include = ["a.toml"]\n' + MINIMAL)
    assert [p.key for p in found] == ["include[0]", "include[1]"]
    assert all("include cycle" in p.reason for p in found)


def test_include_depth_is_bounded(tmp_path: Path) -> None:
    for i in range(12):
        write(tmp_path, f"d{i}.toml", f'include = ["d{i + 1}.toml"]\n')
    write(tmp_path, "d12.toml", "")
    found = problems(tmp_path, 'include = ["d0.toml"]\n' + MINIMAL)
    assert any("nested deeper" in p.reason for p in found)


def test_include_glob_is_bounded(tmp_path: Path) -> None:
    for i in range(130):
        write(tmp_path, f"conf.d/s{i}.toml", "")
    found = problems(tmp_path, 'include = ["conf.d/*.toml"]\n' + MINIMAL)
    assert [p.key for p in found] == ["include[0]"]
    assert "matches more than 128 files" in found[0].reason


def test_include_file_is_read_once(tmp_path: Path) -> None:
    write(tmp_path, "conf.d/a.toml", service("", "web"))
    config = load(tmp_path, 'include = ["conf.d/*.toml", "conf.d/a.toml"]\n' + MINIMAL)
    assert list(config.services) == ["api", "web"]


def test_include_relative_to_the_including_file(tmp_path: Path) -> None:
    write(tmp_path, "etc/conf.d/web.toml", service('listen = ["unix://web.sock"]', "web"))
    write(tmp_path, "etc/svcd.toml", 'include = ["conf.d/*.toml"]\n' + MINIMAL)
    config = load_config(str(tmp_path / "etc" / "svcd.toml"))
    assert config.services["web"].listen[0].path == str(tmp_path / "etc/conf.d/web.sock")


def test_parse_config_reads_includes_relative_to_path(tmp_path: Path) -> None:
    write(tmp_path, "conf.d/web.toml", service("", "web"))
    text = 'include = ["conf.d/*.toml"]\n' + MINIMAL
    config = parse_config(text, str(tmp_path / "svcd.toml"))
    assert list(config.services) == ["api", "web"]


# ---------------------------------------------------------------------------------------
# ports and addresses


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("tcp://0.0.0.0:8080", "tcp://127.0.0.1:8080"),
        ("tcp://127.0.0.1:8080", "tcp://0.0.0.0:8080"),
        ("tcp://127.0.0.1:8080", "tcp://127.0.0.1:8080"),
        ("tcp://[::]:8080", "tcp://127.0.0.1:8080"),
        ("tcp://[::]:8080", "tcp://[::1]:8080"),
        ("tcp://localhost:8080", "tcp://127.0.0.1:8080"),
        ("unix:///tmp/x.sock", "unix:///tmp/../tmp/x.sock"),
    ],
)
def test_duplicate_listeners_across_services(tmp_path: Path, first: str, second: str) -> None:
    text = service(f'listen = ["{first}"]', "api") + service(f'listen = ["{second}"]', "web")
    found = problems(tmp_path, text)
    assert [p.key for p in found] == ["services.web.listen[0]"]
    assert "already used by service api (services.api.listen[0])" in found[0].reason


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("tcp://127.0.0.1:8080", "tcp://127.0.0.2:8080"),
        ("tcp://127.0.0.1:8080", "tcp://127.0.0.1:8081"),
        ("tcp://0.0.0.0:8080", "tcp://[::1]:8080"),
        ("tcp://127.0.0.1:0", "tcp://127.0.0.1:0"),
        ("unix:///tmp/a.sock", "unix:///tmp/b.sock"),
    ],
)
def test_distinct_listeners_are_fine(tmp_path: Path, first: str, second: str) -> None:
    text = service(f'listen = ["{first}"]', "api") + service(f'listen = ["{second}"]', "web")
    assert set(load(tmp_path, text).services) == {"api", "web"}


def test_duplicate_port_across_files(tmp_path: Path) -> None:
    write(tmp_path, "conf.d/web.toml", service('listen = ["tcp://0.0.0.0:9000"]', "web"))
    text = 'include = ["conf.d/*.toml"]\n' + service('listen = ["tcp://127.0.0.1:9000"]')
    found = problems(tmp_path, text)
    assert [(os.path.basename(p.file), p.key) for p in found] == [
        ("web.toml", "services.web.listen[0]")
    ]
    assert f"in {tmp_path / 'svcd.toml'}" in found[0].reason


def test_agent_addresses_collide_with_service_listeners(tmp_path: Path) -> None:
    text = (
        "[agent]\nprobe_address = '0.0.0.0:7071'\nmetrics_address = '127.0.0.1:7071'\n"
        f"control_socket = '{tmp_path / 'svcd.sock'}'\n"
        + service('listen = ["tcp://127.0.0.1:7071", "unix://svcd.sock"]')
    )
    found = problems(tmp_path, text)
    assert [p.key for p in found] == [
        "agent.metrics_address",
        "services.api.listen[0]",
        "services.api.listen[1]",
    ]
    assert "agent probe_address" in found[0].reason
    assert "agent (agent.control_socket)" in found[2].reason


def test_problems_of_a_service_do_not_hide_its_port_clash(tmp_path: Path) -> None:
    text = service('listen = ["tcp://0.0.0.0:8080"]') + service(
        'listen = ["tcp://0.0.0.0:8080"]\ncount = 0', "web"
    )
    assert {p.key for p in problems(tmp_path, text)} == {
        "services.web.count",
        "services.web.listen[0]",
    }


# ---------------------------------------------------------------------------------------
# svcd check-config


def test_check_config_ok(tmp_path: Path) -> None:
    path = write(tmp_path, "svcd.toml", MINIMAL + service("", "web"))
    out, err = io.StringIO(), io.StringIO()
    assert check_config_main(str(path), out, err) == 0
    assert out.getvalue() == f"{path}: OK (2 services)\n"
    assert err.getvalue() == ""


def test_check_config_lists_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "svcd.toml", service("count = 0\nrestart = 'x'"))
    out, err = io.StringIO(), io.StringIO()
    assert check_config_main(str(path), out, err) == 2
    lines = err.getvalue().splitlines()
    assert lines == [
        f"{path}: services.api.count: must be >= 1, got 0",
        f'{path}: services.api.restart: must be one of "always", "on-failure", "never"; got "x"',
    ]
    assert out.getvalue() == ""


def test_check_config_missing_file(tmp_path: Path) -> None:
    err = io.StringIO()
    assert check_config_main(str(tmp_path / "nope.toml"), io.StringIO(), err) == 2
    assert "nope.toml: cannot read" in err.getvalue()


# ---------------------------------------------------------------------------------------
# default paths


def test_default_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SVCD_SOCKET", "/x/y.sock")
    assert paths.default_control_socket() == "/x/y.sock"
    monkeypatch.delenv("SVCD_SOCKET")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert paths.default_control_socket() == "/run/svcd/svcd.sock"
    assert paths.default_state_dir() == "/var/lib/svcd"
    assert paths.default_log_dir() == "/var/log/svcd"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert paths.default_control_socket() == "/run/user/1000/svcd/svcd.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert paths.default_control_socket() == "/tmp/svcd-1000/svcd.sock"
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert paths.default_state_dir() == str(tmp_path / ".local/state/svcd")
    assert paths.default_log_dir() == str(tmp_path / ".local/state/svcd/logs")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "st"))
    assert paths.default_state_dir() == str(tmp_path / "st" / "svcd")


# ---------------------------------------------------------------------------------------
# examples

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", ["full.toml", "minimal.toml"])
def test_examples_are_valid(name: str) -> None:
    out = io.StringIO()
    assert check_config_main(str(EXAMPLES / name), out, io.StringIO()) == 0, out.getvalue()


def test_full_example_documents_every_key() -> None:
    """examples/full.toml names every setting (commented out where it needs real files)."""
    text = (EXAMPLES / "full.toml").read_text()
    specs = [ServiceSpec, HealthSpec, BackoffSpec, LogSpec, AgentSettings, RegistrySettings]
    names = {f.name for spec in specs for f in dataclasses.fields(spec)} - {"name"}
    missing = sorted(n for n in names if not re.search(rf"\b{n}\b", text))
    assert missing == []
