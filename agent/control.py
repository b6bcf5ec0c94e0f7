"""The control socket: svcd.v1.Agent + grpc.health.v1 + reflection, and the probe port.

Layout (SPEC.md "gRPC", issue 9):

    svctl --unix--> <socket_path>            asyncio unix server: SO_PEERCRED check
                         | allowed                          | refused
                         v                                  v
           <private>/agent.sock                 <private>/denied.sock
           grpc.aio: Agent, Health, reflection  grpc.aio: every method PERMISSION_DENIED

grpc never tells a servicer the peer's uid (grpc/grpc#15511), so the public socket is
ours: each accepted connection is checked with SO_PEERCRED (uid, gid; SO_PEERGROUPS for
supplementary groups) against the allow list (root, the agent's own uid, configured
uids/gids) and then spliced, bytes both ways, to one of two grpc servers listening in
a private 0700 directory. A refused caller thus gets a real gRPC PERMISSION_DENIED
(svctl: "permission denied", exit 4) instead of a dropped connection.

Invariants:
- Single instance: an exclusive flock on `<socket_path>.lock` is taken before anything
  is bound and held until stop; a grpc server would silently take over the path of a
  live socket, so without it two agents could fight over one socket.
- The socket's directory is owned by the agent's user (or root) and writable by no one
  else (created 0700 if absent); the socket appears with its final mode (bound under a
  temporary name, chmod-ed, then renamed into place). A file at the socket path that is
  not a socket is never replaced: the start fails.
- Several agents may keep their sockets in one directory: private dirs carry the
  agent's pid, and a starting agent removes only those of agents no longer running.
- The splice is bounded: at most MAX_CONNECTIONS allowed callers at once, and each side
  stops reading while the other side's write buffer is full (transport flow control).
- Refused callers have a budget of their own (MAX_REFUSED_CONNECTIONS; a new one closes
  the oldest), so a refused user holding idle connections on a socket opened wider
  (mode 0666, a group) can never take the allowed callers' places.
- The probe listener (plaintext TCP, for kubelet gRPC probes) serves Health only.
- Health statuses come from `core.health_targets()`, recomputed on every event and at
  least every HEALTH_REFRESH seconds; only changes are pushed (Watch streams see them).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import stat
import struct
import tempfile
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from grpc_reflection.v1alpha import reflection

from agent.api import SERVICE_NAME as AGENT_SERVICE_NAME
from agent.api import AgentServicer
from agent.health_service import AgentHealth
from supervisor.reaper import process_alive

if TYPE_CHECKING:
    from agent.core import AgentCore

log = logging.getLogger("svcd.control")

#: Largest request a client may send (the control API's requests are tiny).
MAX_RECEIVE_BYTES = 4 * 1024 * 1024
#: Largest response (a status of many workers, a burst of log lines).
MAX_SEND_BYTES = 64 * 1024 * 1024
#: RPCs handled at once per server; more wait (grpc answers RESOURCE_EXHAUSTED).
MAX_CONCURRENT_RPCS = 256
#: Allowed callers' connections spliced at once on the control socket; more are closed
#: at once.
MAX_CONNECTIONS = 256
#: Refused callers' connections kept at once (each only gets PERMISSION_DENIED); a new
#: one closes the oldest, so the latest refused caller still gets a clear answer.
MAX_REFUSED_CONNECTIONS = 16
#: Health statuses are recomputed at least this often (seconds), besides on events.
HEALTH_REFRESH = 1.0
#: Seconds in-flight RPCs get at stop before they are cancelled.
STOP_GRACE = 2.0
#: A unix socket path longer than this does not fit in sockaddr_un.
MAX_UNIX_PATH = 107
#: Linux SO_PEERGROUPS (4.13+): supplementary groups of the peer at connect time.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: Most supplementary groups we read of a peer (NGROUPS_MAX is 65536; 64 is plenty).
MAX_PEER_GROUPS = 64
INTERNAL_DIR_PREFIX = ".svcd-internal-"
#: Bytes a client may send before its splice is connected (an HTTP/2 preface is ~100).
MAX_EARLY_BYTES = 256 * 1024

_Handler = Any  # grpc.RpcMethodHandler; its stubs describe the sync API only
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    ("grpc.max_send_message_length", MAX_SEND_BYTES),
    ("grpc.so_reuseport", 0),
]


class ControlSocketError(Exception):
    """The control socket cannot be set up (lock held, unsafe directory, bind failed)."""


def _peer_credentials(sock: Any) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


def _peer_groups(sock: Any) -> set[int]:
    """Supplementary groups of the peer (empty where the kernel cannot tell)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_PEER_GROUPS)
    except OSError:
        return set()
    count = len(raw) // 4
    return set(struct.unpack(f"{count}I", raw[: 4 * count]))


class _Pipe(asyncio.Protocol):
    """One side of a splice: what it reads it writes to its peer, with backpressure.

    The side that reads pauses when the side that writes has a full buffer
    (pause_writing/resume_writing of the writer's transport), so memory per
    connection stays bounded by the transports' high-water marks.
    """

    def __init__(self, pipes: set[_Pipe], peer: _Pipe | None = None) -> None:
        self._pipes = pipes
        self.transport: asyncio.Transport | None = None
        self.peer = peer
        self.got_eof = False
        # bytes read before the peer is connected: uvloop may deliver the first read
        # even though reading was paused in connection_made
        self._early: list[bytes] = []
        self._early_size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._pipes.add(self)
        if self.peer is not None:  # the upstream side: link both ways, let the client talk
            front = self.peer
            front.peer = self
            if front.transport is None or front.transport.is_closing():
                transport.close()
                return
            upstream: asyncio.Transport = transport  # type: ignore[assignment]
            for chunk in front._early:
                upstream.write(chunk)
            front._early.clear()
            if front.got_eof and upstream.can_write_eof():
                upstream.write_eof()
            front.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
            return
        self._early_size += len(data)
        if self._early_size > MAX_EARLY_BYTES:
            log.warning("control socket: client sent too much before the splice was ready")
            self.close()
            return
        self._early.append(data)

    def eof_received(self) -> bool:
        self.got_eof = True
        peer = self.peer
        if peer is None or peer.transport is None:
            return True  # not linked yet: the link passes the EOF on
        if peer.got_eof:
            self.close()
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
        return True  # half-closed: the other direction may still carry data

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._pipes.discard(self)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()  # flushes what is buffered, then closes

    def close(self) -> None:
        for side in (self, self.peer):
            if side is not None and side.transport is not None:
                side.transport.close()


class _Front(_Pipe):
    """An accepted client connection on the public socket: check, then connect upstream."""

    def __init__(self, server: ControlServer) -> None:
        super().__init__(server._pipes)
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()  # nothing flows until upstream is connected
        self._server._route(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._server._fronts.discard(self)
        self._server._refused_fronts.pop(self, None)


async def _deny(request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(
        grpc.StatusCode.PERMISSION_DENIED,
        "permission denied: this user may not use the svcd control socket",
    )


if TYPE_CHECKING:
    _GenericHandler = grpc.GenericRpcHandler[Any, Any]
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # generic only in the type stubs
    _GenericHandler = grpc.GenericRpcHandler
    _Interceptor = grpc.aio.ServerInterceptor


class _DenyEverything(_GenericHandler):
    """Every method answers PERMISSION_DENIED, at once (stream-stream: no need to wait
    for the request to finish)."""

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        return grpc.stream_stream_rpc_method_handler(_deny)


#: What the `read` role may call on the TCP control listener (status, events, logs,
#: discover); `admin` may call everything. RegistryInfo answers `read` without the
#: etcd secrets (agent.api.REGISTRY_SECRETS).
READ_METHODS = frozenset(
    f"/{AGENT_SERVICE_NAME}/{m}" for m in ("Status", "Logs", "Events", "Probe", "RegistryInfo")
)
ROLES = ("read", "admin")


def role_of(auth: Mapping[str, Iterable[bytes]], roles: Mapping[str, str]) -> str | None:
    """The role of an mTLS caller: by its certificate's common name in `roles`; with no
    mapping configured every certificate the CA signed is admin; else a name not in
    the mapping gets no role (refused)."""
    if not roles:
        return "admin"
    for name in auth.get("x509_common_name", ()):
        role = roles.get(name.decode(errors="replace"))
        if role is not None:
            return role
    return None


class _RoleCheck(_Interceptor):
    """Refuse, with PERMISSION_DENIED, the methods the caller's role does not allow."""

    def __init__(self, roles: Mapping[str, str]) -> None:
        self._roles = roles

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(f"/{AGENT_SERVICE_NAME}/"):
            return handler  # health and reflection: open to every certificate
        needs_admin = method not in READ_METHODS
        roles = self._roles

        async def check(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            role = role_of(context.auth_context(), roles)
            if role is None or (needs_admin and role != "admin"):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"permission denied: role {role or 'none'} may not call {method}",
                )

        if handler.unary_unary is not None:
            inner: Any = handler.unary_unary  # an async function under grpc.aio

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await check(context)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream: Any = handler.unary_stream  # an async generator function

            async def stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                await check(context)
                async for item in inner_stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # svcd.v1.Agent has no client-streaming methods


class ControlServer:
    """The agent's control endpoints. `await start()`, then `await stop()` (or `async with`).

    Raises ControlSocketError from start() when another agent holds the socket's lock,
    the socket directory is unsafe, or a listener cannot be bound.
    """

    def __init__(
        self,
        core: AgentCore,
        socket_path: str | os.PathLike[str],
        *,
        mode: int = 0o600,
        allow_uids: Collection[int] = (),
        allow_gids: Collection[int] = (),
        socket_group: int | None = None,
        probe_address: str | None = None,
        tcp_address: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        roles: Mapping[str, str] | None = None,
        max_connections: int = MAX_CONNECTIONS,
        max_refused: int = MAX_REFUSED_CONNECTIONS,
    ) -> None:
        self.core = core
        self.socket_path = Path(os.path.abspath(socket_path))
        self.mode = mode
        self.allow_uids = frozenset({0, os.geteuid(), *allow_uids})
        self.allow_gids = frozenset(allow_gids)
        self.socket_group = socket_group
        self.probe_address = probe_address
        self.tcp_address = tcp_address
        self._tls = (tls_cert, tls_key, tls_ca)
        if tcp_address is not None and not all(self._tls):
            raise ControlSocketError("a TCP control listener needs tls_cert, tls_key and tls_ca")
        self.roles = dict(roles or {})
        unknown = sorted(r for r in self.roles.values() if r not in ROLES)
        if unknown:
            raise ControlSocketError(f"unknown control roles {unknown}: use read or admin")
        self.max_connections = max_connections
        self.max_refused = max_refused
        #: bound ports (useful when the address asked for port 0)
        self.probe_port: int | None = None
        self.tcp_port: int | None = None
        self.health = AgentHealth()
        self._health_state: dict[str, bool] = {}
        self._lock_fd: int | None = None
        self._private_dir: Path | None = None
        self._front: asyncio.AbstractServer | None = None
        self._servers: list[grpc.aio.Server] = []
        self._pipes: set[_Pipe] = set()
        self._fronts: set[_Front] = set()  # allowed callers' connections still open
        # refused callers' connections still open, oldest first (a dict keeps the order)
        self._refused_fronts: dict[_Front, None] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._socket_ino: int | None = None
        self.refused = 0  # connections refused by the peer check (for tests/metrics)

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Lock, bind everything, start serving. On failure nothing is left behind."""
        try:
            await self._start()
        except BaseException:
            await self.stop(grace=0)
            raise

    async def _start(self) -> None:
        directory = self.socket_path.parent
        self._prepare_directory(directory)
        self._take_lock()
        self._refuse_a_non_socket()
        self._remove_stale_internal_dirs(directory)
        self._private_dir = self._make_private_dir(directory)
        agent_sock = self._private_dir / "agent.sock"
        denied_sock = self._private_dir / "denied.sock"

        servicer = AgentServicer(self.core)
        main = self._new_server()
        servicer.add_to_server(main)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, main)
        reflection.enable_server_reflection(
            (AGENT_SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), main
        )
        self._bind(main, f"unix:{agent_sock}")

        if self.tcp_address is not None:
            # its own server: its callers are known by certificate, not by uid
            tcp = self._new_server(interceptors=[_RoleCheck(self.roles)])
            roles = self.roles

            def is_admin(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
                return role_of(context.auth_context(), roles) == "admin"

            AgentServicer(self.core, may_see_secrets=is_admin).add_to_server(tcp)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, tcp)
            reflection.enable_server_reflection(
                (AGENT_SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), tcp
            )
            self.tcp_port = self._bind_tls(tcp, self.tcp_address)

        denied = self._new_server()
        denied.add_generic_rpc_handlers((_DenyEverything(),))
        self._bind(denied, f"unix:{denied_sock}")

        if self.probe_address is not None:
            probe = self._new_server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, probe)
            self.probe_port = self._bind(probe, self.probe_address)

        await self._refresh_health()
        for server in self._servers:
            await server.start()
        self._agent_sock = str(agent_sock)
        self._denied_sock = str(denied_sock)
        self._front = await self._listen_public()
        self._spawn(self._run_health())
        log.info("control socket %s ready", self.socket_path)

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop accepting, end in-flight RPCs (after `grace` s), remove the socket, unlock."""
        if self._front is not None:
            self._front.close()
        self._unlink_socket()
        with contextlib.suppress(Exception):
            await self.health.enter_graceful_shutdown()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        servers, self._servers = self._servers, []
        await asyncio.gather(*(s.stop(grace) for s in servers), return_exceptions=True)
        for pipe in list(self._pipes):
            pipe.close()
        if self._front is not None:
            with contextlib.suppress(Exception):
                await self._front.wait_closed()
            self._front = None
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock; the file stays (no unlink race)
            self._lock_fd = None

    # ------------------------------------------------------------ set-up steps

    def _prepare_directory(self, directory: Path) -> None:
        if not directory.exists():
            # search (x) bits for the classes the socket's mode lets in, nothing more
            dir_mode = 0o700
            if self.mode & 0o060:
                dir_mode |= 0o010
            if self.mode & 0o006:
                dir_mode |= 0o001
            directory.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                directory.mkdir(mode=dir_mode)
                os.chmod(directory, dir_mode)  # mkdir's mode is cut by the umask
                if self.socket_group is not None:  # its x bit is for that group
                    os.chown(directory, -1, self.socket_group)
        st = os.stat(directory)
        if not stat.S_ISDIR(st.st_mode):
            raise ControlSocketError(f"{directory} (control socket directory) is not a directory")
        if st.st_uid not in (os.geteuid(), 0):
            raise ControlSocketError(
                f"{directory} (control socket directory) belongs to uid {st.st_uid}, not to "
                f"this user ({os.geteuid()}) or root: refusing to use it"
            )
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ControlSocketError(
                f"{directory} (control socket directory) is writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}): refusing to use it"
            )
        if len(str(self.socket_path)) > MAX_UNIX_PATH:
            raise ControlSocketError(
                f"control socket path {self.socket_path} is longer than {MAX_UNIX_PATH} bytes"
            )

    def _take_lock(self) -> None:
        lock_path = f"{self.socket_path}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ControlSocketError(f"cannot open lock file {lock_path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ControlSocketError(
                    f"another svcd is running with control socket {self.socket_path} "
                    f"(pid {holder})"
                ) from None
            raise ControlSocketError(f"cannot lock {lock_path}: {exc.strerror}") from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _refuse_a_non_socket(self) -> None:
        """A file at the socket path that is not a socket is someone's data: never
        replace it (a stale socket of ours is replaced atomically later)."""
        try:
            mode = os.lstat(self.socket_path).st_mode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ControlSocketError(f"cannot use {self.socket_path}: {exc.strerror}") from exc
        if not stat.S_ISSOCK(mode):
            raise ControlSocketError(
                f"{self.socket_path} exists and is not a socket: refusing to replace it"
            )

    def _remove_stale_internal_dirs(self, directory: Path) -> None:
        """Private dirs left by agents that were killed. Several agents may keep their
        sockets in one directory (each holds its own socket's lock), so only the dirs of
        agents no longer running go: the pid is in the name."""
        for stale in directory.glob(f"{INTERNAL_DIR_PREFIX}*"):
            pid = stale.name[len(INTERNAL_DIR_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and process_alive(int(pid)):
                continue
            if stale.is_dir() and not stale.is_symlink() and stale.stat().st_uid == os.geteuid():
                shutil.rmtree(stale, ignore_errors=True)

    def _make_private_dir(self, directory: Path) -> Path:
        # next to the socket when the paths fit, else in $TMPDIR; mkdtemp makes it 0700
        prefix = f"{INTERNAL_DIR_PREFIX}{os.getpid()}-"
        longest = len(str(directory)) + 1 + len(prefix) + 8 + len("/denied.sock")
        where = directory if longest <= MAX_UNIX_PATH else None
        return Path(tempfile.mkdtemp(prefix=prefix, dir=where))

    def _new_server(self, interceptors: Sequence[_Interceptor] = ()) -> grpc.aio.Server:
        server = grpc.aio.server(
            interceptors=interceptors,
            options=_SERVER_OPTIONS,
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        )
        self._servers.append(server)
        return server

    def _bind(self, server: grpc.aio.Server, address: str) -> int:
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ControlSocketError(f"cannot listen on {address}: {exc}") from exc
        if port == 0 and not address.startswith("unix:"):
            raise ControlSocketError(f"cannot listen on {address}")
        return port

    def _bind_tls(self, server: grpc.aio.Server, address: str) -> int:
        cert, key, ca = (Path(p).read_bytes() for p in self._tls if p is not None)
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )
        try:
            port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise ControlSocketError(f"cannot listen on {address}: {exc}") from exc
        if port == 0:
            raise ControlSocketError(f"cannot listen on {address}")
        return port

    async def _listen_public(self) -> asyncio.AbstractServer:
        """Bind under a temporary name, set the mode (and group), rename into place."""
        assert self._private_dir is not None
        temporary = self.socket_path.with_name(f"{INTERNAL_DIR_PREFIX}{os.getpid()}.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            sock.bind(str(temporary))
            os.chmod(temporary, self.mode)
            if self.socket_group is not None:
                os.chown(temporary, -1, self.socket_group)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
            # atomic: a stale socket file (we hold the lock) is replaced, never half-seen
            os.rename(temporary, self.socket_path)
            self._socket_ino = os.stat(self.socket_path).st_ino
            loop = asyncio.get_running_loop()
            return await loop.create_unix_server(lambda: _Front(self), sock=sock)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise ControlSocketError(f"cannot listen on {self.socket_path}: {exc}") from exc

    def _unlink_socket(self) -> None:
        """Remove the socket file, but only if it is still ours."""
        if self._socket_ino is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.socket_path).st_ino == self._socket_ino:
                os.unlink(self.socket_path)
        self._socket_ino = None

    # ------------------------------------------------------------ the accept step

    def allowed(self, uid: int, gid: int, groups: Collection[int] = ()) -> bool:
        """May a caller with these credentials use the control API?"""
        if uid in self.allow_uids:
            return True
        return gid in self.allow_gids or bool(self.allow_gids & set(groups))

    def _route(self, front: _Front) -> None:
        """Check the peer, then splice it to the agent's server or the denying one.

        The credentials are read before any limit applies: allowed and refused callers
        are counted apart, so refused ones can only crowd out each other.
        """
        assert front.transport is not None
        transport = front.transport
        sock = transport.get_extra_info("socket")
        try:
            pid, uid, gid = _peer_credentials(sock)
            groups = _peer_groups(sock) if self.allow_gids else set()
        except OSError as exc:
            log.warning("control socket: cannot read peer credentials: %s", exc)
            transport.close()
            return
        if self.allowed(uid, gid, groups):
            if len(self._fronts) >= self.max_connections:
                log.warning("control socket: %d connections open, refusing more", len(self._fronts))
                transport.close()
                return
            self._fronts.add(front)
            target = self._agent_sock
        else:
            self.refused += 1
            log.warning("control socket: refused pid %d uid %d gid %d", pid, uid, gid)
            self._make_room_for_refused()
            self._refused_fronts[front] = None
            target = self._denied_sock
        self._spawn(self._connect_upstream(front, target))

    def _make_room_for_refused(self) -> None:
        """Close the oldest refused connections until one more fits in their budget."""
        while self._refused_fronts and len(self._refused_fronts) >= self.max_refused:
            oldest = next(iter(self._refused_fronts))
            del self._refused_fronts[oldest]  # now: its connection_lost comes later
            oldest.close()

    async def _connect_upstream(self, front: _Front, target: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_unix_connection(lambda: _Pipe(self._pipes, peer=front), target)
        except OSError as exc:
            log.warning("control socket: cannot reach the internal server: %s", exc)
            front.close()

    # ------------------------------------------------------------ health

    async def _refresh_health(self) -> None:
        try:
            targets = self.core.health_targets()
        except Exception:
            log.exception("health targets failed")
            targets = {"": True, "liveness": True, "readiness": False}
        for name, serving in targets.items():
            if self._health_state.get(name) != serving:
                self._health_state[name] = serving
                await self.health.set(name, _SERVING if serving else _NOT_SERVING)
        for gone in set(self._health_state) - set(targets):
            del self._health_state[gone]
            await self.health.set(gone, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

    async def _run_health(self) -> None:
        """Recompute health on every event and at least every HEALTH_REFRESH seconds."""
        subscription = self.core.events_subscribe(replay=False)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HEALTH_REFRESH):
                        await subscription.get()
                await self._refresh_health()
        finally:
            subscription.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
