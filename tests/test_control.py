"""The control socket: lock, directory and socket modes, the SO_PEERCRED accept step,
health (stock grpc.health.v1 client), reflection, the probe port, limits, mTLS.

The core here is a real AgentCore with no services and a supervisor that is never
started (no SIGCHLD reaper in this process), so `svctl` can run as a subprocess, under
another uid where the test runs as root.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agent._pb import agent_pb2 as pb
from agent.config import parse_config
from agent.control import ControlServer, ControlSocketError, role_of
from agent.core import AgentCore
from supervisor.events import EventBus
from supervisor.supervisor import Supervisor
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
TIMEOUT = 10.0
SERVING = health_pb2.HealthCheckResponse.SERVING

pytestmark = pytest.mark.timeout(60)


def make_core(tmp: Path, services: str = "") -> AgentCore:
    """A real AgentCore over a real (not started) Supervisor."""
    text = (
        textwrap.dedent(
            f"""
        [agent]
        name = "test-agent"
        control_socket = "{tmp / "run" / "svcd.sock"}"
        log_dir = "{tmp / "logs"}"
        state_dir = "{tmp / "state"}"
        """
        )
        + services
    )
    path = tmp / "svcd.toml"
    path.write_text(text)
    config = parse_config(text, str(path))
    bus = EventBus()
    supervisor = Supervisor(events=bus, log_dir=tmp / "logs")
    return AgentCore(config, supervisor, bus)


@contextlib.asynccontextmanager
async def running(agent_core: AgentCore) -> AsyncIterator[AgentCore]:
    """Run the core's loop-lag monitor (the liveness signal) while in the block."""
    monitor = asyncio.ensure_future(agent_core.run_lag_monitor())
    try:
        yield agent_core
    finally:
        monitor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await monitor


def svctl(
    socket_path: Path | str, *args: str, as_nobody: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run svctl in a child process (optionally as uid/gid 65534)."""
    argv = [sys.executable, "-m", "agent.cli", "--socket", str(socket_path), *args]
    if as_nobody:
        argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT)


async def asvctl(
    socket_path: Path | str, *args: str, as_nobody: bool = False
) -> subprocess.CompletedProcess[str]:
    # a thread: the control server in this loop must keep serving meanwhile
    return await asyncio.to_thread(svctl, socket_path, *args, as_nobody=as_nobody)


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A 0755 directory every user can reach (pytest's tmp_path is under a 0700 one)."""
    where = Path(tempfile.mkdtemp(prefix="svcd-test-"))
    os.chmod(where, 0o755)
    yield where
    shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "svcd.sock"


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[AgentCore]:
    """make_core with its loop-lag monitor running (liveness depends on it)."""
    async with running(make_core(tmp_path)) as agent_core:
        yield agent_core


@pytest.fixture
async def server(core: AgentCore, sock_path: Path) -> AsyncIterator[ControlServer]:
    async with ControlServer(core, sock_path, probe_address="127.0.0.1:0") as srv:
        yield srv


# ---------------------------------------------------------------- files and lock


async def test_socket_dir_and_modes(server: ControlServer, sock_path: Path) -> None:
    st = os.stat(sock_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sock_path.parent).st_mode) == 0o700
    assert server._private_dir is not None
    assert stat.S_IMODE(os.stat(server._private_dir).st_mode) == 0o700
    assert Path(f"{sock_path}.lock").read_text().strip() == str(os.getpid())  # noqa: ASYNC240


async def test_stop_removes_socket_and_private_dir(
    core: AgentCore, tmp_path: Path, sock_path: Path
) -> None:
    srv = ControlServer(core, sock_path)
    await srv.start()
    private = srv._private_dir
    await srv.stop()
    assert private is not None
    assert not sock_path.exists() and not private.exists()  # noqa: ASYNC240


async def test_second_agent_on_same_socket_fails_clearly(
    core: AgentCore, server: ControlServer, tmp_path: Path, sock_path: Path
) -> None:
    other = ControlServer(core, sock_path)
    with pytest.raises(ControlSocketError) as info:
        await other.start()
    assert str(info.value) == (
        f"another svcd is running with control socket {sock_path} (pid {os.getpid()})"
    )
    # the first agent still answers on its socket
    result = await asvctl(sock_path, "probe", "live")
    assert result.returncode == 0, result.stderr


async def test_lock_released_at_stop_and_stale_socket_replaced(
    core: AgentCore, tmp_path: Path, sock_path: Path
) -> None:
    first = ControlServer(core, sock_path)
    await first.start()
    await first.stop()
    # a stale socket file, as a SIGKILLed agent leaves it
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))
    stale.close()
    (sock_path.parent / ".svcd-internal-leftover").mkdir()
    async with ControlServer(core, sock_path):
        result = await asvctl(sock_path, "probe", "live")
        assert result.returncode == 0, result.stderr
        assert not (sock_path.parent / ".svcd-internal-leftover").exists()


async def test_agents_with_sockets_in_one_directory_leave_each_other_alone(
    core: AgentCore, server: ControlServer, sock_path: Path
) -> None:
    """A starting agent removes the private dirs of dead agents only, not a neighbour's."""
    dead = sock_path.parent / ".svcd-internal-999999999-gone"  # beyond any pid_max
    dead.mkdir()
    async with ControlServer(core, sock_path.with_name("other.sock")):
        for path in (sock_path, sock_path.with_name("other.sock")):
            result = await asvctl(path, "probe", "live")
            assert result.returncode == 0, (path, result.stderr)
        assert not dead.exists()


async def test_refuses_to_replace_a_file_that_is_not_a_socket(
    core: AgentCore, sock_path: Path
) -> None:
    sock_path.parent.mkdir(mode=0o700)
    sock_path.write_text("precious\n")  # noqa: ASYNC240
    with pytest.raises(ControlSocketError, match="exists and is not a socket"):
        await ControlServer(core, sock_path).start()
    assert sock_path.read_text() == "precious\n"  # noqa: ASYNC240


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
async def test_refuses_a_directory_others_can_write(
    core: AgentCore, tmp_path: Path, mode: int
) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    os.chmod(directory, mode)
    srv = ControlServer(core, directory / "svcd.sock")
    with pytest.raises(ControlSocketError, match="writable by group or others"):
        await srv.start()
    assert not (directory / "svcd.sock").exists()
    assert not (directory / "svcd.sock.lock").exists()


@needs_root
async def test_socket_group_and_mode(core: AgentCore, sock_path: Path) -> None:
    async with ControlServer(core, sock_path, mode=0o660, socket_group=NOBODY):
        st = os.stat(sock_path)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, NOBODY)
        # the directory we created lets the group search it, nobody else
        assert stat.S_IMODE(os.stat(sock_path.parent).st_mode) == 0o710


@needs_root
async def test_refuses_a_directory_of_another_user(core: AgentCore, tmp_path: Path) -> None:
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o700)
    os.chown(directory, NOBODY, NOBODY)
    srv = ControlServer(core, directory / "svcd.sock")
    with pytest.raises(ControlSocketError, match="belongs to uid 65534"):
        await srv.start()


async def test_socket_path_too_long(core: AgentCore, tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    srv = ControlServer(core, deep / "svcd.sock")
    with pytest.raises(ControlSocketError, match="longer than"):
        await srv.start()


# ---------------------------------------------------------------- peer check


@needs_root
async def test_directory_keeps_other_users_out(server: ControlServer, sock_path: Path) -> None:
    """Default: 0600 socket in a 0700 directory: another uid cannot even connect."""
    result = await asvctl(sock_path, "status", as_nobody=True)
    assert result.returncode == 4, result
    assert "permission denied" in result.stderr
    assert result.stderr.count("\n") == 1


@needs_root
async def test_peer_uid_refused_with_permission_denied(
    core: AgentCore, tmp_path: Path, open_dir: Path
) -> None:
    """Socket and directory open to everyone: the SO_PEERCRED check still refuses."""
    path = open_dir / "svcd.sock"
    async with ControlServer(core, path, mode=0o666) as srv:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
        for args in (("status",), ("status", "--json"), ("events", "-f"), ("stop", "api")):
            result = await asvctl(path, *args, as_nobody=True)
            assert result.returncode == 4, (args, result)
            assert result.stderr.startswith("svctl: permission denied"), result.stderr
            if "--json" in args:  # the error as an object, for the reader of stdout
                assert json.loads(result.stdout)["exit_code"] == 4, result.stdout
            else:
                assert result.stdout == ""
        assert srv.refused == 4
        # root and our own uid stay allowed
        assert (await asvctl(path, "probe", "live")).returncode == 0


@needs_root
@pytest.mark.parametrize("allow", ["uid", "gid"])
async def test_allow_list_lets_a_configured_caller_in(
    core: AgentCore, tmp_path: Path, open_dir: Path, allow: str
) -> None:
    path = open_dir / "svcd.sock"
    kwargs = {"allow_uids": [NOBODY]} if allow == "uid" else {"allow_gids": [NOBODY]}
    async with ControlServer(core, path, mode=0o666, **kwargs) as srv:  # type: ignore[arg-type]
        result = await asvctl(path, "status", "--json", as_nobody=True)
        assert result.returncode == 0, result.stderr
        assert '"name": "test-agent"' in result.stdout
        assert srv.refused == 0


def test_allowed_rule() -> None:
    srv = ControlServer.__new__(ControlServer)
    srv.allow_uids = frozenset({0, 1000})
    srv.allow_gids = frozenset({50})
    assert srv.allowed(0, 0) and srv.allowed(1000, 7)
    assert srv.allowed(7, 50)  # primary group
    assert srv.allowed(7, 7, groups=[3, 50])  # supplementary group
    assert not srv.allowed(7, 7, groups=[3])


# ---------------------------------------------------------------- health, reflection


async def test_stock_health_client_sees_liveness_serving(
    server: ControlServer, sock_path: Path
) -> None:
    async with grpc.aio.insecure_channel(f"unix:{sock_path}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "liveness", "readiness"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
            assert reply.status == SERVING, name
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_probe_port_serves_health_only(server: ControlServer) -> None:
    assert server.probe_port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.probe_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=TIMEOUT)
        assert reply.status == SERVING
        status = channel.unary_unary(
            "/svcd.v1.Agent/Status",
            request_serializer=pb.StatusRequest.SerializeToString,
            response_deserializer=pb.StatusResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await status(pb.StatusRequest(), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_health_turns_not_serving_at_stop(
    core: AgentCore, tmp_path: Path, sock_path: Path
) -> None:
    srv = ControlServer(core, sock_path, probe_address="127.0.0.1:0")
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.probe_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service="readiness"))
            first = await asyncio.wait_for(watch.read(), TIMEOUT)
            assert first.status == SERVING
            stopping = asyncio.ensure_future(srv.stop(grace=1))
            second = await asyncio.wait_for(watch.read(), TIMEOUT)
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await stopping
    finally:
        await srv.stop()


async def test_reflection_lists_the_agent_service(server: ControlServer, sock_path: Path) -> None:
    async with grpc.aio.insecure_channel(f"unix:{sock_path}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(timeout=TIMEOUT)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        names = {s.name for s in reply.list_services_response.service}
        assert {"svcd.v1.Agent", "grpc.health.v1.Health"} <= names
        await call.write(
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="svcd.v1.Agent")
        )
        reply = await call.read()
        assert reply.file_descriptor_response.file_descriptor_proto
        await call.done_writing()


# ---------------------------------------------------------------- limits


async def test_oversized_request_is_refused(server: ControlServer, sock_path: Path) -> None:
    async with grpc.aio.insecure_channel(f"unix:{sock_path}") as channel:
        status = channel.unary_unary(
            "/svcd.v1.Agent/Status",
            request_serializer=pb.StatusRequest.SerializeToString,
            response_deserializer=pb.StatusResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await status(pb.StatusRequest(service="x" * (5 * 1024 * 1024)), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the server is unharmed
        reply = await status(pb.StatusRequest(), timeout=TIMEOUT)
        assert reply.agent.name == "test-agent"


async def test_connections_beyond_the_limit_are_closed(
    core: AgentCore, tmp_path: Path, sock_path: Path
) -> None:
    async with ControlServer(core, sock_path, max_connections=2) as srv:
        held = [await asyncio.open_unix_connection(str(sock_path)) for _ in range(2)]
        await wait_for(lambda: len(srv._fronts) == 2, TIMEOUT, "two spliced connections")
        reader, writer = await asyncio.open_unix_connection(str(sock_path))
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # closed at once
        writer.close()
        for _, w in held:
            w.close()
        await wait_for(lambda: not srv._fronts, TIMEOUT, "connections gone")
        # room again
        assert (await asvctl(sock_path, "probe", "live")).returncode == 0


@needs_root
async def test_refused_callers_have_their_own_budget(
    core: AgentCore, tmp_path: Path, open_dir: Path
) -> None:
    """A refused user holding many idle connections closes only its own oldest ones:
    allowed callers keep every place, and a fresh refused caller still gets exit 4."""
    path = open_dir / "svcd.sock"
    hold = (
        "import socket, sys, time\n"
        "socks = []\n"
        "for _ in range(8):\n"
        "    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); socks.append(s)\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
    )
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            sys.executable, "-c", hold, str(path)]  # fmt: skip
    async with ControlServer(core, path, mode=0o666, max_connections=2, max_refused=3) as srv:
        holder = await asyncio.to_thread(
            subprocess.Popen, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout is not None
            assert await asyncio.to_thread(holder.stdout.readline) == "held\n"
            await wait_for(lambda: srv.refused == 8, TIMEOUT, "eight refused connections")
            assert len(srv._refused_fronts) <= 3 and not srv._fronts
            assert (await asvctl(path, "probe", "live")).returncode == 0
            result = await asvctl(path, "status", as_nobody=True)
            assert result.returncode == 4, result
        finally:
            holder.kill()
            await asyncio.to_thread(holder.wait, TIMEOUT)
        await wait_for(lambda: not srv._refused_fronts, TIMEOUT, "refused connections gone")


async def test_garbage_on_the_socket_does_not_hurt(server: ControlServer, sock_path: Path) -> None:
    reader, writer = await asyncio.open_unix_connection(str(sock_path))
    writer.write(os.urandom(64 * 1024))
    await writer.drain()
    await asyncio.wait_for(reader.read(), TIMEOUT)  # grpc drops the connection
    writer.close()
    assert (await asvctl(sock_path, "probe", "live")).returncode == 0


# ---------------------------------------------------------------- mTLS and roles

#: Client certificates the tests make: name -> signed by our CA?
CLIENTS = {"admin-1": True, "reader-1": True, "unlisted": True, "stranger": False}


def _openssl(where: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True, timeout=30)


def _self_signed(where: Path, name: str) -> None:
    _openssl(where, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem")  # fmt: skip


def _signed(where: Path, name: str, ca: str) -> None:
    _openssl(where, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
    _openssl(where, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem",
             "-CAkey", f"{ca}.key", "-CAcreateserial", "-days", "2",
             "-extfile", "san.cnf", "-out", f"{name}.pem")  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1, client certificates; one foreign CA."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    where = tmp_path_factory.mktemp("pki")
    (where / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _self_signed(where, "ca")
    _self_signed(where, "other-ca")
    _signed(where, "server", "ca")
    for name, ours in CLIENTS.items():
        _signed(where, name, "ca" if ours else "other-ca")
    return where


def _tcp_server(core: AgentCore, sock_path: Path, pki: Path, **kwargs: Any) -> ControlServer:
    return ControlServer(
        core,
        sock_path,
        tcp_address="127.0.0.1:0",
        tls_cert=str(pki / "server.pem"),
        tls_key=str(pki / "server.key"),
        tls_ca=str(pki / "ca.pem"),
        **kwargs,
    )


async def _over_tcp(
    srv: ControlServer, pki: Path, client: str, *args: str
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "agent.cli", "--address", f"127.0.0.1:{srv.tcp_port}",
            "--tls-cert", str(pki / f"{client}.pem"), "--tls-key", str(pki / f"{client}.key"),
            "--tls-ca", str(pki / "ca.pem"), "--timeout", "5", *args]  # fmt: skip
    return await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=30, cwd=ROOT
    )


async def test_tcp_control_needs_a_client_certificate(
    core: AgentCore, sock_path: Path, pki: Path
) -> None:
    async with _tcp_server(core, sock_path, pki) as srv:
        ok = await _over_tcp(srv, pki, "unlisted", "status", "--json")
        assert ok.returncode == 0, ok.stderr
        assert '"name": "test-agent"' in ok.stdout
        # no role mapping: every certificate of our CA is admin
        assert (await _over_tcp(srv, pki, "unlisted", "stop", "nope")).returncode == 2
        bad = await _over_tcp(srv, pki, "stranger", "status", "--json")
        assert bad.returncode in (3, 4), bad
        # --address without the TLS files is a usage error
        plain = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "agent.cli", "--address", f"127.0.0.1:{srv.tcp_port}", "status"],
            capture_output=True, text=True, timeout=30, cwd=ROOT,
        )  # fmt: skip
        assert plain.returncode == 2 and "mTLS" in plain.stderr


async def test_tcp_control_roles(core: AgentCore, sock_path: Path, pki: Path) -> None:
    roles = {"admin-1": "admin", "reader-1": "read"}
    async with _tcp_server(core, sock_path, pki, roles=roles) as srv:
        reads: list[tuple[str, ...]] = [("status", "--json"), ("events",), ("probe", "live")]
        writes: list[tuple[str, ...]] = [("stop", "api"), ("reload",), ("scale", "api", "2")]
        for args in reads:
            result = await _over_tcp(srv, pki, "reader-1", *args)
            assert result.returncode == 0, (args, result.stderr)
        for args in writes:
            result = await _over_tcp(srv, pki, "reader-1", *args)
            assert result.returncode == 4, (args, result)
            assert "permission denied: role read" in result.stderr
        # admin gets through to the core (which does not know "nope")
        assert (await _over_tcp(srv, pki, "admin-1", "stop", "nope")).returncode == 2
        # a certificate of our CA whose name is not in the mapping gets nothing
        result = await _over_tcp(srv, pki, "unlisted", "status")
        assert result.returncode == 4 and "role none" in result.stderr
        # the unix socket is unaffected by roles
        assert (await asvctl(sock_path, "stop", "nope")).returncode == 2


def test_tcp_listener_without_tls_is_refused(core: AgentCore, tmp_path: Path) -> None:
    with pytest.raises(ControlSocketError, match="needs tls_cert"):
        ControlServer(core, tmp_path / "s.sock", tcp_address="127.0.0.1:0")


def test_unknown_role_is_refused(core: AgentCore, tmp_path: Path) -> None:
    with pytest.raises(ControlSocketError, match="unknown control roles"):
        ControlServer(core, tmp_path / "s.sock", roles={"x": "root"})


def test_role_of() -> None:
    auth = {"x509_common_name": [b"alice"]}
    assert role_of(auth, {}) == "admin"
    assert role_of(auth, {"alice": "read"}) == "read"
    assert role_of(auth, {"bob": "admin"}) is None
    assert role_of({}, {"bob": "admin"}) is None
