"""The `[agent]` and `[registry]` tables (main file only) -> AgentSettings, RegistrySettings.

Invariants: the settings come out complete (defaults filled in: the host name, the
default control socket and directories, root and the agent's own uid on the control
socket), with absolute paths and `host:port` addresses; settings that only make sense
together (TCP control and its TLS files, username and password, cert and key) are
either all there or reported.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping

from agent import paths
from agent.config import values
from agent.config.addresses import etcd_endpoint, format_address
from agent.config.model import (
    DEFAULT_PREFIX,
    DEFAULT_REGISTRY_TIMEOUT,
    DEFAULT_SOCKET_MODE,
    DEFAULT_TTL,
    LOG_FORMATS,
    AgentSettings,
    LogFormat,
    RegistrySettings,
    Role,
)
from agent.config.table import MISSING, Problems, Table
from agent.config.values import Invalid
from agent.config.wording import got, show

MAX_AGENT_NAME = 253
MAX_TTL = 24 * 3600  #: etcd lease TTL, seconds
GROUP_SOCKET_MODE = 0o660  #: default when `control_group` is set: the group may connect
GROUP_ACCESS = 0o060  #: the group's read and write bits of a mode
AGENT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
ROLES: dict[str, Role] = {"read": "read", "admin": "admin"}
TLS_FILES = ("tls_cert", "tls_key", "tls_ca")
EMBEDDED = "embedded"


def read_agent(table: Table | None, problems: Problems, file: str, base_dir: str) -> AgentSettings:
    """The `[agent]` table of `file` (None: absent, every setting at its default)."""
    t = table or Table(problems, file, "agent", {}, base_dir)
    name = t.string("name", None)
    if name is not None and (len(name) > MAX_AGENT_NAME or not AGENT_NAME_RE.fullmatch(name)):
        t.problem(
            "name",
            f"must be letters, digits, '.', '_' or '-' (it is part of etcd keys), got {show(name)}",
        )
        name = None
    control_socket = t.socket_path("control_socket", paths.default_control_socket())
    group_value = t.raw("control_group")
    control_group = None if group_value is MISSING else t.group_id("control_group", group_value)
    default_mode = DEFAULT_SOCKET_MODE if control_group is None else GROUP_SOCKET_MODE
    mode = t.mode("control_socket_mode", default_mode)
    if control_group is not None and t.has("control_socket_mode") and not mode & GROUP_ACCESS:
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
    tls = {key: t.readable_file(key) for key in TLS_FILES}
    roles: Mapping[str, Role] = t.open_table("roles", _role)
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
        control_address=_address_text(control),
        tls_cert=tls["tls_cert"],
        tls_key=tls["tls_key"],
        tls_ca=tls["tls_ca"],
        roles=roles,
        probe_address=_address_text(probe),
        metrics_address=_address_text(metrics),
        log_dir=log_dir,
        state_dir=state_dir,
        log_format=log_format,
        drain_delay=drain_delay,
    )


def _address_text(address: tuple[str, int] | None) -> str | None:
    return None if address is None else format_address(*address)


def _role(_common_name: str, value: object) -> Role | Invalid:
    return values.choice(value, ROLES)


def _id_list(t: Table, name: str, *, user: bool) -> tuple[int, ...] | None:
    """An array of user (or group) names or ids, as ids without repeats; None: absent."""
    value = t.raw(name)
    if value is MISSING:
        return None
    if not isinstance(value, list):
        what = "user names or uids" if user else "group names or gids"
        t.problem(name, f"must be an array of {what}, got {got(value)}")
        return None
    lookup = t.user_id if user else t.group_id
    ids: list[int] = []
    for i, item in enumerate(value):
        checked = lookup(f"{name}[{i}]", item)
        if checked is None:
            t.bad.add(name)
        else:
            ids.append(checked)
    return tuple(dict.fromkeys(ids))


def read_registry(t: Table) -> RegistrySettings:
    """The `[registry]` table (present: an absent one means no registry at all)."""
    endpoints: tuple[str, ...] = ()
    embedded = False
    raw = t.raw("endpoints")
    if raw is MISSING:
        t.problem(
            "endpoints", 'is required: etcd URLs like ["http://127.0.0.1:2379"], or "embedded"'
        )
    elif raw in (EMBEDDED, [EMBEDDED]):
        embedded = True
    else:
        t.seen.discard("endpoints")  # str_list marks it again
        urls = t.str_list("endpoints")
        if urls is not None and not urls:
            t.problem("endpoints", 'must not be empty (or "embedded")')
        for i, url in enumerate(urls or ()):
            checked = etcd_endpoint(url)
            if isinstance(checked, Invalid):
                t.problem(f"endpoints[{i}]", checked.reason)
        endpoints = urls or ()
    prefix = t.string("prefix", DEFAULT_PREFIX)
    if not prefix.startswith("/") or prefix.endswith("/") or any(c.isspace() for c in prefix):
        t.problem(
            "prefix",
            f'must start with "/", not end with "/" and contain no spaces, got {show(prefix)}',
        )
        prefix = DEFAULT_PREFIX
    ttl = t.integer("ttl", DEFAULT_TTL, minimum=1, maximum=MAX_TTL)
    timeout = t.duration("timeout", DEFAULT_REGISTRY_TIMEOUT)
    username = t.string("username", None)
    password = t.string("password", None)
    if t.has("password_file"):
        if t.has("password"):
            t.problem("password_file", "give password or password_file, not both")
        password = _read_secret(t, "password_file")
    if (username is None) != (password is None):
        missing = "password" if password is None else "username"
        if t.ok("username", "password", "password_file"):
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
        t.problem("grpc_naming_prefix", f'must end with "/", got {show(naming)}')
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


#: Largest secret file read (a password, not a document).
MAX_SECRET_BYTES = 64 * 1024


def _read_secret(t: Table, name: str) -> str | None:
    """The text of a secret file (a mounted Kubernetes Secret, a systemd credential),
    without its final newline; None (and a problem) when it cannot be used."""
    path = t.readable_file(name)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_BYTES + 1)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        t.problem(name, f"{show(path)} cannot be read: {exc}")
        return None
    if len(data) > MAX_SECRET_BYTES:
        t.problem(name, f"{show(path)} is larger than {MAX_SECRET_BYTES} bytes")
        return None
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret:
        t.problem(name, f"{show(path)} is empty")
        return None
    return secret
