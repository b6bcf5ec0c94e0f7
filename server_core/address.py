"""Listen addresses (`http://0.0.0.0:8080`, `ws://[::]:8000`, `text://127.0.0.1:0`, ...).

The scheme picks the protocol; host and port are only used when the worker runs alone
and binds the socket itself (under svcd it serves the inherited sockets instead).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from server_core.protocols import SCHEMES

DEFAULT_HOST = "0.0.0.0"


@dataclass(frozen=True)
class ListenAddress:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_address(url: str) -> ListenAddress:
    """Parse `scheme://host:port`; ValueError names what is wrong."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        known = ", ".join(sorted(SCHEMES))
        raise ValueError(f"listen address {url!r}: scheme must be one of {known}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"listen address {url!r}: {exc}") from None
    if port is None:
        raise ValueError(f"listen address {url!r}: a port is required")
    if parts.path not in ("", "/"):
        raise ValueError(f"listen address {url!r}: unexpected path {parts.path!r}")
    return ListenAddress(scheme, parts.hostname or DEFAULT_HOST, port)


def bind(address: ListenAddress, backlog: int) -> socket.socket:
    """A listening TCP socket for `address` (SO_REUSEADDR, not SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
