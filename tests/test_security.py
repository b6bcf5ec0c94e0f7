"""Security, end to end: what a local user, a worker or a network client can try against
a real `svcd --config FILE` process, and what they must get.

Each test drives a real agent (tests/agent_proc.py) the way an attacker would: `svctl`
as another uid (`setpriv --reuid 65534`), raw gRPC on the control socket and the probe
port, a worker configured with `user = "nobody"` inspected through /proc, commands with
shell syntax, oversized requests and files. The unit tests of each control live with
its module (test_control.py, test_spawn.py, test_notify.py, test_config.py); these
check the wiring from config to running agent and the attacker-visible outcome.

Tests marked `xfail(strict=True)` document a defect found by this audit (reason names
the file and function); strict, so that the fix turns them into a failure to remove the
marker.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agent._pb import agent_pb2 as pb
from agent.control import MAX_CONNECTIONS, MAX_RECEIVE_BYTES
from supervisor.logs import CUT_MARK
from tests.agent_proc import HTTP_WORKER, ROOT, AgentProcess, worker_command
from tests.conftest import free_port
from tests.waiting import wait_for_sync

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

NOBODY = 65534
RPC_TIMEOUT = 10.0
WAIT = 30.0
SERVING = health_pb2.HealthCheckResponse.SERVING

is_root = os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not is_root or shutil.which("setpriv") is None, reason="needs root and setpriv"
)


# ---------------------------------------------------------------- helpers


def as_nobody(argv: list[str]) -> list[str]:
    """argv run as uid/gid 65534 with no supplementary groups and no capabilities."""
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def svctl(socket_path: str, *args: str, nobody: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "agent.cli", "--socket", socket_path, *args]
    return subprocess.run(
        as_nobody(argv) if nobody else argv,
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


def python_for_nobody() -> str:
    """A Python >= 3.11 that uid 65534 may execute (the test worker is stdlib-only)."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        real = Path(os.path.realpath(candidate))
        if real.exists() and all(os.stat(p).st_mode & 0o001 for p in (real, *real.parents)):
            return candidate
    pytest.skip("no Python interpreter that other users can execute")


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A directory other users may traverse (pytest's tmp_path sits under a 0700 one):
    needed when a worker runs as nobody or a socket is opened up on purpose."""
    base = Path(tempfile.mkdtemp(prefix="svcd-sec-"))
    base.chmod(0o711)
    (base / "state").mkdir(mode=0o711)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def service(name: str, port: int, *, count: int = 1, command: str | None = None,
            extra: str = "") -> str:  # fmt: skip
    return f"""
[services.{name}]
command = {command or worker_command()}
count = {count}
listen = ["tcp://127.0.0.1:{port}"]
graceful_timeout = 5
{extra}
"""


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def unary(channel: grpc.Channel, method: str, request: bytes) -> bytes:
    call = channel.unary_unary(method, None, None)  # no (de)serializer: raw bytes both ways
    reply: bytes = call(request, timeout=RPC_TIMEOUT)
    return reply


def status_over(channel: grpc.Channel) -> pb.StatusResponse:
    return pb.StatusResponse.FromString(
        unary(channel, "/svcd.v1.Agent/Status", pb.StatusRequest().SerializeToString())
    )


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"


# ---------------------------------------------------------------- the control socket


@needs_root
def test_default_control_socket_is_private_and_other_users_get_exit_4(tmp_path: Path) -> None:
    port = free_port()
    with AgentProcess(tmp_path, service("api", port)) as agent:
        sock = Path(agent.socket)
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        directory = os.stat(sock.parent)
        assert stat.S_IMODE(directory.st_mode) == 0o700 and directory.st_uid == os.geteuid()
        before = agent.worker_pids("api")
        for args in (("status",), ("stop", "api"), ("scale", "api", "3"), ("reload",),
                     ("logs", "api"), ("events",), ("probe", "live")):  # fmt: skip
            result = svctl(agent.socket, *args, nobody=True)
            assert result.returncode == 4, (args, result)
            assert "permission denied" in result.stderr and result.stdout == ""
        assert agent.worker_pids("api") == before  # nothing happened
        assert svctl(agent.socket, "status").returncode == 0  # root still may


@needs_root
def test_peercred_check_refuses_other_uids_even_on_an_open_socket(open_base: Path) -> None:
    """An operator opens the socket to everybody (mode 0666): the SO_PEERCRED allow list
    still refuses uid 65534, with a real PERMISSION_DENIED (exit 4), and changes nothing."""
    port = free_port()
    agent = AgentProcess(open_base, service("api", port), 'control_socket_mode = "0666"')
    with agent:
        assert stat.S_IMODE(os.stat(agent.socket).st_mode) == 0o666
        before = agent.worker_pids("api")
        for args in (("status", "--json"), ("stop", "api"), ("scale", "api", "0"),
                     ("events", "-f"), ("logs", "api", "-f"), ("reload", "api")):  # fmt: skip
            result = svctl(agent.socket, *args, nobody=True)
            assert result.returncode == 4, (args, result)
            assert result.stderr.startswith("svctl: permission denied"), result.stderr
            if "--json" in args:  # the error as an object, for the reader of stdout
                assert json.loads(result.stdout)["exit_code"] == 4, result.stdout
            else:
                assert result.stdout == ""
        assert agent.worker_pids("api") == before
        assert "refused pid" in agent.stderr()  # the agent logs who knocked


@needs_root
def test_allow_list_and_control_group_from_the_config(open_base: Path) -> None:
    """`control_group` owns the socket (0660) and its directory, and its members may call."""
    group = grp.getgrgid(NOBODY).gr_name if _gid_exists(NOBODY) else None
    if group is None:
        pytest.skip("no group with gid 65534")
    port = free_port()
    extra = f'control_group = "{group}"'  # allowed: the group (gids default to it)
    with AgentProcess(open_base, service("api", port), extra) as agent:
        info = os.stat(agent.socket)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == NOBODY, "control_group is not applied to the socket"
        result = svctl(agent.socket, "status", "--json", nobody=True)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["agent"]["name"] == "test-agent"


def _gid_exists(gid: int) -> bool:
    try:
        grp.getgrgid(gid)
    except KeyError:
        return False
    return True


@needs_root
def test_a_refused_user_cannot_exhaust_the_connection_limit(open_base: Path) -> None:
    port = free_port()
    agent = AgentProcess(open_base, service("api", port), 'control_socket_mode = "0666"')
    hold = (
        "import socket, sys, time\n"
        "socks = []\n"
        f"for _ in range({MAX_CONNECTIONS}):\n"
        "    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); socks.append(s)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    with agent:
        holder = subprocess.Popen(
            as_nobody([python_for_nobody(), "-c", hold, agent.socket]),
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            result = svctl(agent.socket, "status")
            assert result.returncode == 0, result.stderr
        finally:
            holder.kill()
            holder.wait(10)


@needs_root
def test_a_read_only_tcp_caller_does_not_get_the_etcd_password(tmp_path: Path, pki: Path) -> None:
    agent = AgentProcess(tmp_path, "", _tcp_control(pki, free_port()), _registry_with_password())
    with agent:
        reply = _registry_info_over_tls(agent, pki, "reader-1")
        assert reply.endpoints  # the read role may learn where etcd is...
        assert reply.password == ""  # ...but not how to write to it
        # admins and the unix socket (svctl discover) keep the credentials
        assert _registry_info_over_tls(agent, pki, "admin-1").password == PASSWORD
        with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
            raw = unary(
                channel, "/svcd.v1.Agent/RegistryInfo", pb.RegistryInfoRequest().SerializeToString()
            )
        assert pb.RegistryInfoResponse.FromString(raw).password == PASSWORD


PASSWORD = "s3cret-etcd-password"


def _registry_with_password() -> str:
    # nothing listens there: the registry stays disconnected, which is all we need
    return f"""
[registry]
endpoints = ["http://127.0.0.1:{free_port()}"]
ttl = 5
username = "svcd"
password = "s3cret-etcd-password"
"""


def _tcp_control(pki: Path, port: int) -> str:
    return f"""
control_address = "127.0.0.1:{port}"
tls_cert = "{pki / 'server.pem'}"
tls_key = "{pki / 'server.key'}"
tls_ca = "{pki / 'ca.pem'}"
roles = {{ "admin-1" = "admin", "reader-1" = "read" }}
"""


def _tls_channel(agent: AgentProcess, pki: Path, client: str) -> grpc.Channel:
    port = _config_port(agent, "control_address")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / f"{client}.key").read_bytes(),
        certificate_chain=(pki / f"{client}.pem").read_bytes(),
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


def _config_port(agent: AgentProcess, key: str) -> int:
    for line in agent.config.read_text().splitlines():
        if line.strip().startswith(f"{key} ="):
            return int(line.split(":")[-1].strip().strip('"'))
    raise KeyError(key)


def _registry_info_over_tls(agent: AgentProcess, pki: Path, client: str) -> pb.RegistryInfoResponse:
    with _tls_channel(agent, pki, client) as channel:
        raw = unary(
            channel, "/svcd.v1.Agent/RegistryInfo", pb.RegistryInfoRequest().SerializeToString()
        )
    return pb.RegistryInfoResponse.FromString(raw)


#: Client certificates: name -> signed by our CA?
CLIENTS = {"admin-1": True, "reader-1": True, "stranger": False}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1, client certificates; one foreign CA."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    where = tmp_path_factory.mktemp("pki")
    (where / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True, timeout=60)

    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", f"/CN={ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.pem")  # fmt: skip
    for name, ours in {"server": True, **CLIENTS}.items():
        ca = "ca" if ours else "other-ca"
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
                f"{ca}.key", "-CAcreateserial", "-days", "2", "-extfile", "san.cnf",
                "-out", f"{name}.pem")  # fmt: skip
    return where


def test_tcp_control_from_the_config_is_mtls_with_roles(tmp_path: Path, pki: Path) -> None:
    """`control_address` + TLS files + roles in svcd.toml give an mTLS listener where the
    read role sees and the admin role acts; no certificate, no access."""
    port = free_port()
    agent = AgentProcess(tmp_path, service("api", port), _tcp_control(pki, free_port()))
    with agent:
        tcp = _config_port(agent, "control_address")
        wait_for_sync(lambda: _connectable(tcp), WAIT, "the TCP control listener")
        with _tls_channel(agent, pki, "reader-1") as channel:
            assert status_over(channel).agent.name == "test-agent"
            with pytest.raises(grpc.RpcError) as info:
                unary(channel, "/svcd.v1.Agent/Stop",
                      pb.ServiceRequest(service="api").SerializeToString())  # fmt: skip
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert agent.status()["services"][0]["state"] == "running"
        with _tls_channel(agent, pki, "admin-1") as channel:
            unary(channel, "/svcd.v1.Agent/Stop",
                  pb.ServiceRequest(service="api").SerializeToString())  # fmt: skip
        assert agent.status()["services"][0]["state"] == "stopped"
        # plaintext and foreign certificates never get an answer
        with grpc.insecure_channel(f"127.0.0.1:{tcp}") as plain, pytest.raises(grpc.RpcError):
            status_over(plain)
        with _tls_channel(agent, pki, "stranger") as channel, pytest.raises(grpc.RpcError):
            status_over(channel)


def _connectable(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


def test_hostile_grpc_input_on_the_control_socket(tmp_path: Path) -> None:
    """Oversized, undecodable and unknown requests get a gRPC status; the agent lives."""
    port = free_port()
    with AgentProcess(tmp_path, service("api", port)) as agent, grpc.insecure_channel(
        f"unix:{agent.socket}"
    ) as channel:
        pid = agent.proc.pid  # type: ignore[union-attr]
        cases = {
            "oversized": ("/svcd.v1.Agent/Status",
                          pb.StatusRequest(service="x" * MAX_RECEIVE_BYTES).SerializeToString()),
            "undecodable": ("/svcd.v1.Agent/Scale", b"\xff\xff\xff\xff"),
            "unknown method": ("/svcd.v1.Agent/Exec", b""),
            "unknown service": ("/svcd.v1.Admin/Shell", b""),
            "scale bomb": ("/svcd.v1.Agent/Scale",
                           pb.ScaleRequest(service="api", count=10**9).SerializeToString()),
        }  # fmt: skip
        codes = {}
        for name, (method, body) in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                unary(channel, method, body)
            codes[name] = info.value.code()
        assert codes == {
            "oversized": grpc.StatusCode.RESOURCE_EXHAUSTED,
            # grpc's Python server answers a request it cannot parse with UNKNOWN
            "undecodable": grpc.StatusCode.UNKNOWN,
            "unknown method": grpc.StatusCode.UNIMPLEMENTED,
            "unknown service": grpc.StatusCode.UNIMPLEMENTED,
            "scale bomb": grpc.StatusCode.INVALID_ARGUMENT,
        }
        reply = status_over(channel)
        assert reply.agent.pid == pid and reply.services[0].desired == 1
        assert len(agent.worker_pids("api")) == 1


def test_probe_port_answers_health_and_nothing_else(tmp_path: Path) -> None:
    port, probe = free_port(), free_port()
    extra = f'probe_address = "127.0.0.1:{probe}"'
    with AgentProcess(tmp_path, service("api", port), extra) as agent, grpc.insecure_channel(
        f"127.0.0.1:{probe}"
    ) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "liveness", "readiness", "api"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=RPC_TIMEOUT)
            assert reply.status == SERVING, name
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="\x00" * 1000), timeout=RPC_TIMEOUT)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        for method, body in (
            ("/svcd.v1.Agent/Status", pb.StatusRequest().SerializeToString()),
            ("/svcd.v1.Agent/Stop", pb.ServiceRequest(service="api").SerializeToString()),
            ("/svcd.v1.Agent/RegistryInfo", b""),
        ):
            with pytest.raises(grpc.RpcError) as info:
                unary(channel, method, body)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
        # no reflection either: the probe port tells nothing about the control API
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as info:
            list(reflection.ServerReflectionInfo(iter([request]), timeout=RPC_TIMEOUT))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert agent.status()["services"][0]["state"] == "running"


# ---------------------------------------------------------------- worker identity


@needs_root
def test_worker_runs_as_the_configured_user_with_umask_rlimits_and_clean_env(
    open_base: Path,
) -> None:
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    port = free_port()
    command = json.dumps([python_for_nobody(), str(HTTP_WORKER)])
    extra = f"""
user = "nobody"
group = "{group}"
cwd = "/"
umask = "0027"
rlimits = {{ nofile = 1234, nproc = 4321 }}
env = {{ APP_MODE = "$(id)" }}
"""
    agent = AgentProcess(open_base, service("api", port, command=command, extra=extra))
    # the agent's own service-manager protocol variables must never reach a worker
    leaky = {"NOTIFY_SOCKET_X": "", "LISTEN_FDS": "7", "LISTEN_PID": "1", "LISTEN_FDNAMES": "x",
             "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "INVOCATION_ID": "abc",
             "_SVCD_UID": "0"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in leaky}
    os.environ.update(leaky)
    try:
        agent.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    with contextlib.closing(_Stopper(agent)):
        (pid,) = agent.worker_pids("api")
        st = proc_status(pid)
        assert st["Uid"].split() == [str(nobody.pw_uid)] * 4
        assert st["Gid"].split() == [str(nobody.pw_gid)] * 4
        assert st["Groups"].split() in ([], [str(nobody.pw_gid)])  # never root's groups
        assert st["CapEff"] == st["CapPrm"] == "0000000000000000"
        assert st["Umask"] == "0027"
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert _limit(limits, "Max open files") == ("1234", "1234")
        assert _limit(limits, "Max processes") == ("4321", "4321")
        env = proc_environ(pid)
        assert env["USER"] == "nobody" and env["HOME"] == nobody.pw_dir
        assert env["APP_MODE"] == "$(id)"  # a value, never expanded
        assert env["SVCD_SERVICE"] == "api" and env["SVCD_WORKER"] == "0"
        assert env["LISTEN_PID"] == str(pid) and env["LISTEN_FDS"] == "1"
        assert env["NOTIFY_SOCKET"].endswith(".notify")
        for key in ("WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID", "_SVCD_UID"):
            assert key not in env, key
        # the worker's notify socket is its own: owned by nobody, 0600
        notify = os.stat(env["NOTIFY_SOCKET"])
        assert notify.st_uid == nobody.pw_uid and stat.S_IMODE(notify.st_mode) == 0o600
        # and a worker running as nobody cannot reach the control socket
        probe = subprocess.run(
            as_nobody([python_for_nobody(), "-c",
                       "import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
                       agent.socket]),
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert probe.returncode != 0 and "PermissionError" in probe.stderr


def _limit(text: str, name: str) -> tuple[str, str]:
    for line in text.splitlines():
        if line.startswith(name):
            soft, hard = line[len(name) :].split()[:2]
            return soft, hard
    raise KeyError(name)


class _Stopper:
    """contextlib.closing adapter: stop the agent when the block ends."""

    def __init__(self, agent: AgentProcess) -> None:
        self.agent = agent

    def close(self) -> None:
        self.agent.stop()


def test_commands_are_argv_never_a_shell(tmp_path: Path) -> None:
    markers = [tmp_path / f"pwned-{i}" for i in range(5)]
    m = [str(x) for x in markers]
    text = (
        f'/bin/echo "$(touch {m[0]})" `touch {m[1]}` ";" touch {m[2]} "&&" touch {m[3]} '
        f'"|" touch {m[4]} $HOME'
    )
    services = f"""
[services.shellish]
command = {json.dumps(text)}
ready = "started"
restart = "never"
"""
    agent = AgentProcess(tmp_path, services)
    agent.start(wait_ready=False)
    try:

        def logged() -> str:
            out = agent.svctl("logs", "shellish", "-n", "5")
            return out.stdout if "touch" in out.stdout else ""

        line = wait_for_sync(logged, WAIT, "the echoed line")
        assert "$(touch" in line and "`touch" in line and "$HOME" in line
        for marker in markers:
            assert not marker.exists(), marker
    finally:
        agent.stop()


# ---------------------------------------------------------------- limits on input


def test_oversized_config_is_rejected_and_the_running_agent_keeps_its_config(
    tmp_path: Path,
) -> None:
    port = free_port()
    with AgentProcess(tmp_path, service("api", port)) as agent:
        before = agent.worker_pids("api")
        good = agent.config.read_text()
        agent.config.write_text(good + "# " + "x" * (2 * 1024 * 1024) + "\n")
        result = agent.svctl("reload")
        assert result.returncode == 1  # the reload failed; nothing changed
        assert "file too large" in result.stdout + result.stderr
        checked = subprocess.run(
            [sys.executable, "-m", "agent", "check-config", str(agent.config)],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert checked.returncode == 2 and "file too large" in checked.stdout + checked.stderr
        assert agent.worker_pids("api") == before


def test_a_worker_writing_endless_lines_is_cut_and_the_agent_lives(tmp_path: Path) -> None:
    """40 MB without a newline, then binary junk: lines are cut at max_line, the file and
    the ring stay bounded, the agent keeps answering."""
    code = (
        "import os, sys, time\n"
        "chunk = b'A' * 65536\n"
        "for _ in range(640): os.write(1, chunk)\n"
        "os.write(1, bytes(range(256)) * 64 + b'\\n')\n"
        "os.write(2, b'done\\n')\n"
        "time.sleep(3600)\n"
    )
    services = f"""
[services.noisy]
command = {json.dumps([sys.executable, "-c", code])}
ready = "started"
graceful_timeout = 2
[services.noisy.logs]
max_line = "4KiB"
max_size = "1MiB"
backups = 1
ring_lines = 100
"""
    agent = AgentProcess(tmp_path, services)
    agent.start(wait_ready=False)
    try:

        def finished() -> bool:
            out = agent.svctl("logs", "noisy", "-n", "100", "--json")
            return out.returncode == 0 and '"done"' in out.stdout

        wait_for_sync(finished, 60, "the flood to be captured")
        out = agent.svctl("logs", "noisy", "-n", "100", "--json")
        lines = [json.loads(x)["line"] for x in out.stdout.splitlines() if x.strip()]
        # characters: undecodable bytes become U+FFFD, one per byte
        assert lines and max(len(x) for x in lines) <= 4 * 1024 + len(CUT_MARK)
        assert any(x.endswith(CUT_MARK) for x in lines)
        files = list((tmp_path / "logs").glob("noisy.log*"))
        assert files and sum(f.stat().st_size for f in files) <= 3 * 1024 * 1024
        assert agent.status()["services"][0]["workers"][0]["state"] == "running"
    finally:
        agent.stop()


def test_a_notify_flood_is_absorbed_and_the_agent_stays_responsive(tmp_path: Path) -> None:
    """A worker sends sd_notify datagrams as fast as the kernel lets it (valid stats,
    garbage, oversized) for a while: the agent keeps answering, another service keeps
    serving, and the flooder's last stats value arrives (merged, not lost)."""
    flood_seconds = 5.0
    code = (
        "import json, os, socket, time\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "s.connect(os.environ['NOTIFY_SOCKET'])\n"
        "s.send(b'READY=1')\n"
        "junk = [b'\\xff\\xfe', b'=', b'X_SVCD_STATS={', b'STATUS=' + b'x' * 70000]\n"
        f"end = time.monotonic() + {flood_seconds}\n"
        "i = 0\n"
        "while time.monotonic() < end:\n"
        "    i += 1\n"
        "    msg = junk[i % 4] if i % 5 == 0 else "
        "('X_SVCD_STATS=' + json.dumps({'requests': i})).encode()\n"
        "    try: s.send(msg)\n"
        "    except OSError: pass\n"
        "s.send(('X_SVCD_STATS=' + json.dumps({'requests': 424242})).encode())\n"
        "s.send(b'STATUS=flood over')\n"
        "time.sleep(3600)\n"
    )
    port = free_port()
    services = service("api", port) + f"""
[services.flood]
command = {json.dumps([sys.executable, "-c", code])}
graceful_timeout = 2
"""
    with AgentProcess(tmp_path, services) as agent:
        started = time.monotonic()
        answered = 0
        while time.monotonic() - started < flood_seconds:
            assert agent.svctl("probe", "live", timeout=RPC_TIMEOUT).returncode == 0
            with urllib_open(port) as body:
                assert body.strip().isdigit()
            answered += 1
        assert answered > 0

        def flood_over() -> bool:
            svc = {s["name"]: s for s in agent.status()["services"]}["flood"]
            return bool(svc["workers"][0]["requests"] == 424242)

        wait_for_sync(flood_over, WAIT, "the flooder's last stats")
        api = {s["name"]: s for s in agent.status()["services"]}["api"]
        assert api["ready"] == 1 and api["workers"][0]["restarts"] == 0


@contextlib.contextmanager
def urllib_open(port: int) -> Iterator[str]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=RPC_TIMEOUT) as resp:
        yield resp.read().decode()


def test_an_env_file_swapped_for_a_fifo_does_not_hang_the_agent(tmp_path: Path) -> None:
    """env_file is often owned by the application's user, who may replace it."""
    env_file = tmp_path / "app.env"
    env_file.write_text("A=1\n")
    port = free_port()
    extra = f'env_file = "{env_file}"\nrestart = "always"'
    with AgentProcess(tmp_path, service("api", port, extra=extra)) as agent:
        (pid,) = agent.worker_pids("api")
        env_file.unlink()
        os.mkfifo(env_file)
        os.kill(pid, signal.SIGKILL)  # the restart reads env_file again
        try:
            result = agent.svctl("--timeout", "5", "probe", "live", timeout=30)
            assert result.returncode == 0, result.stderr
            # the restart fails like any spawn failure, with the reason in the events
            wait_for_sync(
                lambda: "not a regular file" in agent.svctl("events").stdout, WAIT, "spawn failed"
            )
        finally:
            # unblock an agent stuck in open(): a writer that closes at once
            fd = os.open(env_file, os.O_WRONLY | os.O_NONBLOCK) if _has_reader(env_file) else -1
            if fd >= 0:
                os.close(fd)


def _has_reader(fifo: Path) -> bool:
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        return False
    return True


def test_agent_killed_leaves_no_worker_running_as_another_user(open_base: Path) -> None:
    """PR_SET_PDEATHSIG survives the switch to another uid: no orphan keeps running."""
    if not is_root:
        pytest.skip("needs root to switch users")
    port = free_port()
    command = json.dumps([python_for_nobody(), str(HTTP_WORKER)])
    extra = 'user = "nobody"\ncwd = "/"'
    agent = AgentProcess(open_base, service("api", port, count=2, command=command, extra=extra))
    agent.start()
    pids = agent.worker_pids("api")
    agent.stop(signal.SIGKILL)
    wait_for_sync(lambda: all(gone(p) for p in pids), WAIT, "workers gone with the agent")
