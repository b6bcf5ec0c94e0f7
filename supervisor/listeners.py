"""Listening sockets: bound once by the agent, inherited by workers (socket activation).

The agent, not the workers, owns every listening socket. A socket is bound when the
first service asks for its address and stays open, with its accept backlog, across
worker restarts, rolling reloads and config changes, so clients that connect while no
worker accepts are queued by the kernel instead of refused. It is closed only when the
last service that uses it releases it.

Invariants:
- Every socket made here is non-inheritable (O_CLOEXEC) in the agent; `spawn` places
  copies at fds 3.. in the child, so no other child ever sees it.
- Sockets stay in blocking mode: O_NONBLOCK lives on the shared open file description,
  so setting it here would change it under every worker. The agent never accepts.
- TCP uses SO_REUSEADDR (restart of the agent while old connections sit in TIME_WAIT)
  and never SO_REUSEPORT (a second agent, or a stray server, must fail loudly instead of
  silently stealing half of the connections).
- A unix socket file is removed before binding only when it is a socket nobody answers
  on (stale); it is unlinked on close only if it is still the inode this module bound.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass

from supervisor.errors import ListenerError
from supervisor.spec import ListenSpec

#: fd name of a worker's private health-check listener (LISTEN_FDNAMES).
HEALTH_FD_NAME = "svcd-health"
#: Backlog of the private health listener: the agent dials it, one check at a time.
HEALTH_BACKLOG = 16
#: Longest path a unix socket address can hold (sun_path is 108 bytes with the NUL).
UNIX_PATH_MAX = 107
#: Mode of a bound unix socket file (systemd's SocketMode= default): who may connect is
#: decided by the directory it lives in.
UNIX_SOCKET_MODE = 0o666
#: Mode of parent directories created for a unix socket.
UNIX_PARENT_MODE = 0o755

_REASONS = {
    errno.EADDRINUSE: "address already in use",
    errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
    errno.EPERM: "permission denied",
    errno.EADDRNOTAVAIL: "address not available on this host",
}


def _fail(spec: ListenSpec, exc: OSError) -> ListenerError:
    reason = _REASONS.get(exc.errno or 0) or exc.strerror or str(exc)
    return ListenerError(f"{spec.url}: cannot listen: {reason}")


def bind_listener(spec: ListenSpec) -> socket.socket:
    """Bind and listen on `spec`; return the (blocking, non-inheritable) socket.

    Raises ListenerError naming the address and the reason (in use, permission, bad
    host, path too long, a live server already on a unix path).
    """
    if spec.scheme == "tcp":
        return _bind_tcp(spec)
    if spec.scheme == "unix":
        return _bind_unix(spec)
    raise ListenerError(f"{spec.url}: unsupported listen scheme {spec.scheme!r}")


def _bind_tcp(spec: ListenSpec) -> socket.socket:
    host = spec.host.strip("[]") or None  # "" / None: every address (AI_PASSIVE)
    try:
        infos = socket.getaddrinfo(
            host,
            spec.port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV,
        )
    except socket.gaierror as exc:
        raise ListenerError(f"{spec.url}: cannot resolve host {spec.host!r}: {exc}") from exc
    if not infos:
        raise ListenerError(f"{spec.url}: host {spec.host!r} has no address")
    # AI_PASSIVE with no host lists 0.0.0.0 first; "::" alone is dual-stack by the
    # kernel's default (net.ipv6.bindv6only=0), as systemd's BindIPv6Only=default.
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(spec.backlog)
    except OSError as exc:
        sock.close()
        raise _fail(spec, exc) from exc
    return sock


def _bind_unix(spec: ListenSpec) -> socket.socket:
    path = spec.path
    if not path:
        raise ListenerError(f"{spec.url}: empty unix socket path")
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise ListenerError(
            f"{spec.url}: unix socket path longer than {UNIX_PATH_MAX} bytes"
        )
    _remove_stale_unix(spec)
    parent = os.path.dirname(path)
    if parent:
        try:
            os.makedirs(parent, mode=UNIX_PARENT_MODE, exist_ok=True)
        except OSError as exc:
            raise _fail(spec, exc) from exc
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # widen the umask's mode before listen(): nobody can connect before that anyway
        os.chmod(path, UNIX_SOCKET_MODE)
        sock.listen(spec.backlog)
    except OSError as exc:
        sock.close()
        raise _fail(spec, exc) from exc
    return sock


def _remove_stale_unix(spec: ListenSpec) -> None:
    """Unlink spec.path if it is a socket file nobody listens on; refuse anything else."""
    path = spec.path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _fail(spec, exc) from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"{spec.url}: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # stale: nobody accepts there
    except BlockingIOError:
        # a live server whose backlog is full
        raise ListenerError(f"{spec.url}: another server is listening on {path}") from None
    except OSError as exc:
        raise _fail(spec, exc) from exc
    else:
        raise ListenerError(f"{spec.url}: another server is listening on {path}")
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _unlink_if_ours(sock: socket.socket, path: str, inode: tuple[int, int] | None) -> None:
    """Remove a unix socket file we bound, unless someone replaced it meanwhile."""
    if inode is None:
        return
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == inode:
            os.unlink(path)


def bind_private_health() -> socket.socket:
    """A listening socket on 127.0.0.1:<free port> for one worker's health checks.

    Hand it to the worker under the fd name `HEALTH_FD_NAME`; the agent dials
    `sock.getsockname()` to check that one worker. Close it when the worker is gone.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(HEALTH_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"private health listener: cannot listen: {exc}") from exc
    return sock


@dataclass
class _Held:
    sock: socket.socket
    spec: ListenSpec
    users: int
    inode: tuple[int, int] | None  # unix sockets: the file we created


class ListenerSet:
    """Every bound listening socket of the agent, shared by the services that use it.

    Keyed by `ListenSpec.url`. Each `acquire` must be paired with one `release`; the
    socket closes when the count drops to zero. During a rolling reload the new
    generation acquires before the old one releases, so the socket never closes while a
    worker could still be handed it.
    """

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}

    def acquire(self, spec: ListenSpec) -> socket.socket:
        """The socket for spec.url, bound on first use. Raises ListenerError."""
        held = self._held.get(spec.url)
        if held is None:
            sock = bind_listener(spec)
            inode = None
            if spec.scheme == "unix":
                with contextlib.suppress(OSError):
                    st = os.lstat(spec.path)
                    inode = (st.st_dev, st.st_ino)
            held = self._held[spec.url] = _Held(sock, spec, 0, inode)
        elif spec.backlog != held.spec.backlog:
            # listen() again only resizes the accept queue; queued clients stay.
            with contextlib.suppress(OSError):
                held.sock.listen(spec.backlog)
            held.spec = spec
        held.users += 1
        return held.sock

    def release(self, spec: ListenSpec) -> None:
        """Drop one use of spec.url; close (and unlink a unix file) at the last one."""
        held = self._held.get(spec.url)
        if held is None:
            return
        held.users -= 1
        if held.users <= 0:
            del self._held[spec.url]
            self._close(held)

    def get(self, url: str) -> socket.socket | None:
        """The bound socket for `url`, or None."""
        held = self._held.get(url)
        return None if held is None else held.sock

    def users(self, url: str) -> int:
        """How many acquires of `url` are outstanding."""
        held = self._held.get(url)
        return 0 if held is None else held.users

    @property
    def urls(self) -> list[str]:
        return list(self._held)

    def close_all(self) -> None:
        """Close every socket regardless of users (agent shutdown)."""
        held_all, self._held = list(self._held.values()), {}
        for held in held_all:
            self._close(held)

    @staticmethod
    def _close(held: _Held) -> None:
        if held.spec.scheme == "unix":
            _unlink_if_ours(held.sock, held.spec.path, held.inode)
        held.sock.close()
