"""Addresses: `host:port`, listen URLs (tcp://, unix:), etcd URLs, and which ones collide.

Like `values`, every parser returns the parsed address or an `Invalid` reason and never
raises. Hosts are IP addresses or DNS names (never resolved: parsing does no network
I/O); IPv6 addresses go in brackets; unix socket paths fit in `sun_path`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Protocol

from agent.config.values import Invalid, string
from agent.config.wording import show
from supervisor.spec import ListenSpec

MAX_PORT = 65535
#: sun_path is 108 bytes including the NUL (grpc also fails above 107, see FACTS.md)
MAX_UNIX_PATH = 107
HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
#: names that bind what their addresses bind
HOST_ALIASES = {"localhost": ("127.0.0.1", "::1")}


class Bindable(Protocol):
    """Anything that takes an address: a `ListenSpec`, or an agent listener."""

    @property
    def scheme(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def path(self) -> str: ...


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return HOSTNAME_RE.fullmatch(host) is not None
    return True


def host_port(text: str, *, require_port: bool = True) -> tuple[str, int | None] | Invalid:
    """`host:port`, `[v6]:port` (or only a host when not `require_port`)."""
    if not text:
        return Invalid("must not be empty")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return Invalid("missing ] after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return Invalid(f"{show(host)} is not an IPv6 address")
        if not rest and not require_port:
            return host, None
        if not rest.startswith(":"):
            return Invalid("expected :PORT after the ]")
        port_text = rest[1:]
    else:
        if text.count(":") > 1:
            return Invalid("an IPv6 address goes in brackets: [::1]:8080")
        host, sep, port_text = text.partition(":")
        if not sep and require_port:
            return Invalid("expected HOST:PORT")
        if sep and not host:
            return Invalid("missing host (0.0.0.0 means every interface)")
        if not valid_host(host):
            return Invalid(f"{show(host)} is not a host name or IP address")
        if not sep:
            return host, None
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > len(str(MAX_PORT)):
        return Invalid(f"port must be a number from 0 to {MAX_PORT}, got {show(port_text)}")
    port = int(port_text)
    if port > MAX_PORT:
        return Invalid(f"port must be a number from 0 to {MAX_PORT}, got {port}")
    return host, port


def address(value: object) -> tuple[str, int] | Invalid:
    """`host:port` (no scheme), e.g. "127.0.0.1:9464", "[::]:7071"."""
    checked = string(value)
    if isinstance(checked, Invalid):
        return checked
    parsed = host_port(checked)
    if isinstance(parsed, Invalid):
        return Invalid(f'{parsed.reason} (expected HOST:PORT like "127.0.0.1:9464")')
    host, port = parsed
    assert port is not None  # require_port
    return host, port


def unix_path(path: str) -> str | Invalid:
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        return Invalid(
            f"a unix socket path is at most {MAX_UNIX_PATH} bytes, {show(path)} is longer"
        )
    return path


def listen_url(url: str, base_dir: str, backlog: int) -> ListenSpec | Invalid:
    """A ListenSpec for `url`; a relative unix path is relative to `base_dir`."""
    if url.startswith("tcp://"):
        parsed = host_port(url[len("tcp://") :])
        if isinstance(parsed, Invalid):
            return Invalid(f"{parsed.reason}, in {show(url)}")
        host, port = parsed
        assert port is not None
        return ListenSpec(url=url, scheme="tcp", host=host, port=port, backlog=backlog)
    if url.startswith("unix:"):
        path = url[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            return Invalid(f'missing path, in {show(url)} (like "unix:///run/app.sock")')
        if path.startswith("@"):
            return Invalid(f"abstract unix sockets are not supported, in {show(url)}")
        checked = unix_path(os.path.normpath(os.path.join(base_dir, path)))
        if isinstance(checked, Invalid):
            return checked
        return ListenSpec(url=url, scheme="unix", path=checked, backlog=backlog)
    scheme = url.partition("://")[0] if "://" in url else ""
    plain = (
        ' (use "tcp://": the agent binds plain sockets)'
        if scheme in ("http", "https", "ws", "grpc")
        else ""
    )
    return Invalid(f"must start with tcp:// or unix://, got {show(url)}{plain}")


def etcd_endpoint(url: str) -> str | Invalid:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https"):
        return Invalid(
            f'must be an http:// or https:// URL like "http://127.0.0.1:2379", got {show(url)}'
        )
    parsed = host_port(rest.rstrip("/"))
    if isinstance(parsed, Invalid):
        return Invalid(f"{parsed.reason}, in {show(url)}")
    if ":" in parsed[0]:
        # etcd3aio dials an `ipv4:` gRPC target: an IPv6 endpoint would never connect
        return Invalid(
            f"IPv6 etcd endpoints are not supported (the etcd client speaks IPv4): "
            f"use an IPv4 address or a host name with an IPv4 address, got {show(url)}"
        )
    return url


def hosts_overlap(a: str, b: str) -> bool:
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
    for name, other_host in ((a.lower(), b), (b.lower(), a)):
        if name in HOST_ALIASES and other_host in HOST_ALIASES[name]:
            return True
    return False


def collide(a: Bindable, b: Bindable) -> bool:
    """Would binding both fail: one unix path, or one port (not 0) on overlapping hosts?"""
    if a.scheme != b.scheme:
        return False
    if a.scheme == "unix":
        return a.path == b.path
    return a.port == b.port and a.port != 0 and hosts_overlap(a.host, b.host)
