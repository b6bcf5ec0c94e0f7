"""Fuzzing the config loader: any TOML document (or any text) -> a Config or a ConfigError.

Documents are generated as nested dicts biased towards svcd's own keys and plausible
values (so the fuzzer reaches deep validation, not just "unknown key"), dumped with a
tiny TOML writer, and fed to `parse_config`. Nothing but `Config` or `ConfigError` may
come out, and since the writer only writes valid TOML, no problem may be a syntax error.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import Config, ConfigError, load_config, parse_config

#: examples per fuzz test; raise it for a longer hunt: SVCD_FUZZ_EXAMPLES=20000 pytest ...
EXAMPLES = int(os.environ.get("SVCD_FUZZ_EXAMPLES", "200"))

KEYS = [
    # top level and [agent] / [registry]
    "agent",
    "registry",
    "services",
    "include",
    "name",
    "control_socket",
    "control_socket_mode",
    "control_allow_uids",
    "control_allow_gids",
    "control_group",
    "control_address",
    "tls_cert",
    "tls_key",
    "tls_ca",
    "roles",
    "probe_address",
    "metrics_address",
    "log_dir",
    "state_dir",
    "log_format",
    "drain_delay",
    "endpoints",
    "prefix",
    "ttl",
    "timeout",
    "username",
    "password",
    "ca_cert",
    "cert",
    "key",
    "grpc_naming_prefix",
    "deregister_delay",
    # services
    "command",
    "count",
    "cwd",
    "user",
    "group",
    "env",
    "env_file",
    "stop_signal",
    "listen",
    "restart",
    "ready",
    "ready_timeout",
    "graceful_timeout",
    "max_memory",
    "watchdog",
    "max_surge",
    "max_unavailable",
    "min_ready",
    "umask",
    "rlimits",
    "health",
    "backoff",
    "logs",
    "nofile",
    "core",
    "stack",
    "kind",
    "path",
    "expect_status",
    "grpc_service",
    "interval",
    "rise",
    "fall",
    "start_period",
    "on_failure",
    "initial",
    "first_delay",
    "factor",
    "max",
    "jitter",
    "stable_after",
    "start_limit",
    "fatal_retry",
    "max_bytes",
    "max_size",
    "backups",
    "ring_lines",
    "max_line",
    "format",
    "advertise",
    "meta",
    "url",
    "backlog",
    "api",
    "web",
    "LOG_LEVEL",
    "LISTEN_FDS",
]

STRINGS = [
    "tcp://0.0.0.0:8080",
    "tcp://127.0.0.1:8080",
    "tcp://[::1]:9000",
    "tcp://[::]:8080",
    "unix:///tmp/fuzz.sock",
    "unix://rel.sock",
    "unix:@x",
    "tcp://::1:80",
    "tcp://h:99999",
    "http://127.0.0.1:2379",
    "https://[::1]:2379",
    "embedded",
    "127.0.0.1:9464",
    "[::]:7071",
    "0.0.0.0:7071",
    "512MiB",
    "1G",
    "100kB",
    "1.5GiB",
    "9999999999999999999T",
    "30s",
    "500ms",
    "5m",
    "1h",
    "0022",
    "0o777",
    "0999",
    "SIGTERM",
    "term",
    "SIGTREM",
    "always",
    "on-failure",
    "never",
    "notify",
    "health",
    "started",
    "http",
    "tcp",
    "grpc",
    "exec",
    "none",
    "restart",
    "unready",
    "text",
    "json",
    "read",
    "admin",
    "200-399",
    "500-200",
    "/healthz",
    "/svcd",
    "/grpc/",
    "root",
    "nobody",
    "no-such-user",
    ".",
    "/",
    "/tmp",
    "/nonexistent",
    "conf.d/*.toml",
    "*.toml",
    "missing.toml",
    "unlimited",
    "python -m app",
    "a 'b",
    "",
    " ",
    "\x00",
    "\u00e9t\u00e9",
    "x" * 200,
]

INTS = [0, 1, 2, -1, 3, 8080, 65535, 65536, 0o600, 0o777, 2**31, 2**63 - 1, -(2**63)]


def keys() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(KEYS), st.text(max_size=12))


def scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(STRINGS),
        st.text(max_size=30),
        st.sampled_from(INTS),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
    )


def values() -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars(),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(keys(), inner, max_size=6),
        ),
        max_leaves=8,
    )


def service_tables() -> st.SearchStrategy[dict[str, Any]]:
    """A `[services.X]` table: mostly real keys with plausible values."""
    return st.dictionaries(st.sampled_from(KEYS[32:]), values(), max_size=10).map(
        lambda d: {"command": ["true"], **d} if len(d) % 2 else d
    )


def documents() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "agent": st.dictionaries(st.sampled_from(KEYS[4:32]), values(), max_size=8),
            "registry": st.dictionaries(st.sampled_from(KEYS[19:32]), values(), max_size=8),
            "services": st.dictionaries(
                st.one_of(st.sampled_from(["api", "web", "db", "Bad", "readiness"]), keys()),
                service_tables(),
                max_size=4,
            ),
            "include": st.one_of(
                st.lists(st.sampled_from(["conf.d/*.toml", "*.toml", "missing.toml"])),
                values(),
            ),
        },
    ).flatmap(
        lambda doc: st.dictionaries(keys(), values(), max_size=2).map(
            lambda extra: {**extra, **doc}
        )
    )


# ---------------------------------------------------------------------------------------
# a tiny TOML writer: every table inline, every string escaped


BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_string(text: str) -> str:
    # JSON escapes are TOML escapes, except that TOML also wants DEL escaped
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_key(key: str) -> str:
    return key if BARE_KEY.fullmatch(key) else toml_string(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def dump(doc: dict[str, Any]) -> str:
    return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in doc.items())


# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory with includable files: one good, one with problems, one broken."""
    directory = tmp_path_factory.mktemp("fuzz")
    (directory / "conf.d").mkdir()
    (directory / "conf.d" / "good.toml").write_text('[services.inc]\ncommand = ["true"]\n')
    (directory / "conf.d" / "bad.toml").write_text("[services.api]\ncount = 0\n")
    (directory / "broken.toml").write_text("[services\n")
    yield directory


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(doc=documents())
def test_any_toml_document_gives_a_config_or_a_config_error(
    config_dir: Path, doc: dict[str, Any]
) -> None:
    text = dump(doc)
    parsed = tomllib.loads(text)  # the writer writes valid TOML ...
    if not _has_nan(doc):
        assert parsed == doc  # ... of this very document
    try:
        config = parse_config(text, str(config_dir / "svcd.toml"))
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.reason and problem.file
            assert "TOML syntax error" not in problem.reason or problem.file != str(
                config_dir / "svcd.toml"
            ), str(problem)
            str(problem)
    else:
        assert isinstance(config, Config)
        assert set(config.services) <= set(doc.get("services", {})) | {"inc"}


@FUZZ
@given(text=st.text(alphabet=st.characters(exclude_categories=()), max_size=400))
def test_any_text_gives_a_config_or_a_config_error(config_dir: Path, text: str) -> None:
    try:
        parse_config(text, str(config_dir / "svcd.toml"))
    except ConfigError as exc:
        assert exc.problems


@FUZZ
@given(
    lines=st.lists(
        st.one_of(
            st.sampled_from(
                [
                    "[services.api]",
                    "[agent]",
                    "[registry]",
                    "[services.api.health]",
                    "[[services]]",
                    "[services.api.logs]",
                    'include = ["conf.d/*.toml"]',
                    'command = ["true"]',
                    "count = 0",
                    'listen = ["tcp://0.0.0.0:8080"]',
                ]
            ),
            st.builds(lambda k, v: f"{toml_key(k)} = {toml_value(v)}", keys(), scalars()),
            st.text(max_size=20),
        ),
        max_size=12,
    )
)
def test_line_soup_gives_a_config_or_a_config_error(config_dir: Path, lines: list[str]) -> None:
    """Table headers and key lines in random order: TOML that is often almost valid."""
    try:
        parse_config("\n".join(lines) + "\n", str(config_dir / "svcd.toml"))
    except ConfigError as exc:
        assert exc.problems


@FUZZ
@given(raw=st.binary(max_size=300))
def test_any_bytes_on_disk_give_a_config_or_a_config_error(config_dir: Path, raw: bytes) -> None:
    path = config_dir / "bytes.toml"
    path.write_bytes(raw)
    try:
        load_config(str(path))
    except ConfigError as exc:
        assert exc.problems


FULL_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "full.toml"


def _leaf_paths(table: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for key, value in table.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out.extend(_leaf_paths(value, (*prefix, key)))
    return out


BASE_DOC = tomllib.loads(FULL_EXAMPLE.read_text())
BASE_PATHS = _leaf_paths(BASE_DOC)


@FUZZ
@given(
    where=st.sampled_from(BASE_PATHS),
    action=st.sampled_from(["replace", "delete", "add"]),
    key=keys(),
    value=values(),
)
def test_one_mutation_of_the_full_example(
    config_dir: Path, where: tuple[str, ...], action: str, key: str, value: Any
) -> None:
    """A valid, complete config with one value changed: reaches every key's checks."""
    doc = copy.deepcopy(BASE_DOC)
    parent = doc
    for part in where[:-1]:
        parent = parent[part]
    if action == "replace":
        parent[where[-1]] = value
    elif action == "delete":
        del parent[where[-1]]
    else:
        parent[key] = value
    try:
        parse_config(dump(doc), str(config_dir / "svcd.toml"))
    except ConfigError as exc:
        assert exc.problems


def test_deep_nesting_is_a_config_error(config_dir: Path) -> None:
    depth = 100_000
    with pytest.raises(ConfigError):
        parse_config("x = " + "[" * depth + "]" * depth + "\n", str(config_dir / "svcd.toml"))


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, list):
        return any(_has_nan(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    return False
