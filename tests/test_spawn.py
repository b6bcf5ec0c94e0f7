"""supervisor.spawn and the exec trampoline, with real processes.

Each test starts real children through `spawn()` and reads what they report about
themselves (environment, fds, session, limits) as JSON on a pipe.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.spawn import (
    EXIT_EXEC_FAILED,
    EXIT_PARENT_GONE,
    EXIT_SETUP_FAILED,
    TRAMPOLINE,
    SpawnError,
    SpawnRequest,
    clean_environ,
    fd_actions,
    spawn,
)
from tests.waiting import wait_for_sync

WAIT = 10.0  # seconds: generous bound for a child to finish
ROOT = os.geteuid() == 0
CLASSIC_SIGNALS = (1 << 31) - 1  # bits of signals 1..31 in /proc/PID/status masks

# A child that reports what it sees about itself as one JSON object on stdout.
REPORT = textwrap.dedent(
    """
    import json, os, resource, socket, sys
    nfds = int(os.environ.get("LISTEN_FDS", "0"))
    out = {
        "pid": os.getpid(),
        "env": dict(os.environ),
        "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")),
        "sid": os.getsid(0),
        "pgid": os.getpgid(0),
        "cwd": os.getcwd(),
        "umask": os.umask(0),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
        "stdin": os.readlink("/proc/self/fd/0"),
        "socknames": [list(socket.socket(fileno=os.dup(3 + i)).getsockname()[:2])
                      for i in range(nfds)],
    }
    status = open("/proc/self/status").read()
    out["sigign"] = status.split("SigIgn:")[1].split()[0]
    out["sigblk"] = status.split("SigBlk:")[1].split()[0]
    print(json.dumps(out), flush=True)
    """
)


#: wait statuses of children reaped by _reaped(), until the test takes them
_STATUSES: dict[int, int] = {}


def _reaped(pid: int) -> bool:
    got, status = os.waitpid(pid, os.WNOHANG)
    if got == pid:
        _STATUSES[pid] = status
        return True
    return False


def run(req: SpawnRequest, timeout: float = WAIT) -> tuple[int, str, str]:
    """Spawn `req` with stdout/stderr pipes; return (exit code, stdout, stderr)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    req.stdout, req.stderr = out_w, err_w
    try:
        pid = spawn(req)
    finally:
        os.close(out_w)
        os.close(err_w)
    with os.fdopen(out_r, "rb") as out, os.fdopen(err_r, "rb") as err:
        stdout = out.read().decode()
        stderr = err.read().decode()
    wait_for_sync(lambda: _reaped(pid), timeout, f"exit of pid {pid}")
    status = _STATUSES.pop(pid)
    return os.waitstatus_to_exitcode(status), stdout, stderr


def report(**kwargs: object) -> tuple[dict[str, object], int]:
    """Spawn the REPORT child with SpawnRequest(**kwargs); return (its report, its pid)."""
    kwargs.setdefault("env", clean_environ(os.environ))
    req = SpawnRequest(argv=[sys.executable, "-c", REPORT], **kwargs)  # type: ignore[arg-type]
    code, stdout, stderr = run(req)
    assert code == 0, stderr
    data = json.loads(stdout)
    return data, int(data["pid"])


@pytest.fixture
def listeners() -> Iterator[list[socket.socket]]:
    socks = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        socks.append(s)
    yield socks
    for s in socks:
        s.close()


def test_socket_activation_environment_and_fds(listeners: list[socket.socket]) -> None:
    a, b = listeners
    stray = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(stray, True)  # an fd some library forgot to mark O_CLOEXEC
    try:
        data, pid = report(fds=[a.fileno(), b.fileno()], fd_names=["api", "svcd-health"])
    finally:
        os.close(stray)
    env = data["env"]
    assert isinstance(env, dict)
    assert env["LISTEN_PID"] == str(pid)  # the worker's own pid, not the trampoline's parent
    assert env["LISTEN_FDS"] == "2"
    assert env["LISTEN_FDNAMES"] == "api:svcd-health"
    assert data["socknames"] == [list(a.getsockname()), list(b.getsockname())]
    # nothing else inherited: 0,1,2, the two sockets, and the fd of the listdir itself
    fds = data["fds"]
    assert isinstance(fds, list)
    assert fds[:5] == [0, 1, 2, 3, 4] and len(fds) <= 6
    assert not any(k.startswith("_SVCD_") for k in env)


def test_child_can_accept_on_fd_3(listeners: list[socket.socket]) -> None:
    a, _ = listeners
    code = textwrap.dedent(
        """
        import os, socket
        assert os.environ["LISTEN_PID"] == str(os.getpid())
        s = socket.socket(fileno=3)
        c, _ = s.accept()
        c.sendall(b"hello from " + os.environ["LISTEN_FDNAMES"].encode())
        c.close()
        """
    )
    out_r, out_w = os.pipe()
    pid = spawn(
        SpawnRequest(
            [sys.executable, "-c", code], clean_environ(os.environ),
            fds=[a.fileno()], fd_names=["web"], stderr=out_w,
        )
    )
    os.close(out_w)
    try:
        with socket.create_connection(a.getsockname(), timeout=WAIT) as c:
            assert c.recv(100) == b"hello from web"
    finally:
        wait_for_sync(lambda: _reaped(pid), WAIT, "child exit")
        status = _STATUSES.pop(pid)
        with os.fdopen(out_r) as err:
            assert os.waitstatus_to_exitcode(status) == 0, err.read()


def test_fds_in_swapped_order_land_in_request_order(listeners: list[socket.socket]) -> None:
    a, b = listeners
    data, _ = report(fds=[b.fileno(), a.fileno()], fd_names=["b", "a"])
    assert data["socknames"] == [list(b.getsockname()), list(a.getsockname())]


def test_no_listen_variables_without_fds() -> None:
    env = {**clean_environ(os.environ), "LISTEN_FDS": "7", "LISTEN_PID": "1"}
    data, _ = report(env=env)
    child_env = data["env"]
    assert isinstance(child_env, dict)
    assert "LISTEN_FDS" not in child_env and "LISTEN_PID" not in child_env


def test_watchdog_pid_is_the_workers_own() -> None:
    env = {**clean_environ(os.environ), "WATCHDOG_USEC": "2000000"}
    data, pid = report(env=env)
    child_env = data["env"]
    assert isinstance(child_env, dict)
    assert child_env["WATCHDOG_PID"] == str(pid)


def test_agent_environment_does_not_leak() -> None:
    agent_env = {
        **os.environ,
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "1000000",
        "WATCHDOG_PID": "1",
        "LISTEN_FDS": "3",
        "LISTEN_PID": "1",
        "LISTEN_FDNAMES": "x",
        "INVOCATION_ID": "abc",
        "KEEP_ME": "yes",
    }
    data, _ = report(env=clean_environ(agent_env))
    env = data["env"]
    assert isinstance(env, dict)
    for leaked in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                   "LISTEN_PID", "LISTEN_FDNAMES", "INVOCATION_ID"):
        assert leaked not in env
    assert env["KEEP_ME"] == "yes"


def test_own_session_stdin_devnull_and_default_signals(tmp_path: Path) -> None:
    data, pid = report(cwd=str(tmp_path), umask=0o027)
    assert data["sid"] == pid and data["pgid"] == pid
    assert data["stdin"] == "/dev/null"
    assert data["cwd"] == str(tmp_path)
    assert data["umask"] == 0o027
    assert data["sigblk"] == "0000000000000000"


def test_signal_dispositions_are_reset() -> None:
    # a non-Python child shows the dispositions it got across exec (Python re-ignores
    # SIGPIPE itself); the agent, a Python process, ignores SIGPIPE and SIGXFSZ
    code, out, err = run(
        SpawnRequest(["sh", "-c", "grep SigIgn /proc/self/status"], clean_environ(os.environ))
    )
    assert code == 0, err
    label, mask = out.split()
    # glibc's posix_spawn leaves its two internal signals (32, 33) ignored; glibc
    # re-installs its own handlers for them, and sigaction() cannot touch them
    assert label == "SigIgn:" and int(mask, 16) & CLASSIC_SIGNALS == 0


def test_rlimits_are_applied() -> None:
    data, _ = report(rlimits={"nofile": 512})
    assert data["nofile"] == [512, 512]


def test_path_lookup_uses_the_child_environment(tmp_path: Path) -> None:
    tool = tmp_path / "only-here"
    tool.write_text("#!/bin/sh\necho found $0\n")
    tool.chmod(0o755)
    env = {**clean_environ(os.environ), "PATH": f"/nonexistent:{tmp_path}"}
    code, out, err = run(SpawnRequest(["only-here"], env))
    assert code == 0, err
    assert out.strip() == f"found {tool}"


def test_exec_failure_exits_127_with_a_message() -> None:
    code, _, err = run(SpawnRequest(["no-such-command-svcd"], clean_environ(os.environ)))
    assert code == EXIT_EXEC_FAILED
    assert "cannot execute 'no-such-command-svcd'" in err


def test_not_executable_exits_127(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    code, _, err = run(SpawnRequest([str(script)], clean_environ(os.environ)))
    assert code == EXIT_EXEC_FAILED
    assert "Permission denied" in err


def test_bad_cwd_is_a_setup_failure() -> None:
    code, _, err = run(SpawnRequest(["true"], clean_environ(os.environ), cwd="/nonexistent/x"))
    assert code == EXIT_SETUP_FAILED
    assert "/nonexistent/x" in err


def test_invalid_requests_raise() -> None:
    env = clean_environ(os.environ)
    with pytest.raises(SpawnError, match="empty command"):
        spawn(SpawnRequest([], env))
    with pytest.raises(SpawnError, match="unknown user"):
        spawn(SpawnRequest(["true"], env, user="no-such-user-svcd"))
    with pytest.raises(SpawnError, match="unknown group"):
        spawn(SpawnRequest(["true"], env, group="no-such-group-svcd"))
    with pytest.raises(SpawnError, match="unknown rlimit"):
        spawn(SpawnRequest(["true"], env, rlimits={"bogus": 1}))
    with pytest.raises(SpawnError, match="fd names"):
        spawn(SpawnRequest(["true"], env, fds=[0], fd_names=["a", "b"]))
    with pytest.raises(SpawnError, match="bad fd name"):
        spawn(SpawnRequest(["true"], env, fds=[0], fd_names=["a:b"]))


@pytest.mark.root
@pytest.mark.skipif(not ROOT, reason="needs root to switch users")
def test_drops_privileges_and_keeps_pdeathsig() -> None:
    code = textwrap.dedent(
        """
        import ctypes, json, os
        libc = ctypes.CDLL(None)
        sig = ctypes.c_int(0)
        libc.prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
        print(json.dumps({"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
                          "groups": os.getgroups(), "pdeathsig": sig.value,
                          "user": os.environ.get("USER"), "home": os.environ.get("HOME"),
                          "fds": sorted(int(f) for f in os.listdir("/proc/self/fd"))}))
        """
    )
    nobody = pwd.getpwnam("nobody")
    # the test's own interpreter may live where nobody cannot read (/root/...)
    python = shutil.which("python3", path="/usr/bin:/bin") or pytest.skip("no system python3")
    leak = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(leak, True)  # a careless library in the agent: must not leak either
    try:
        rc, out, err = run(
            SpawnRequest([python, "-c", code], clean_environ(os.environ), user="nobody")
        )
    finally:
        os.close(leak)
    assert rc == 0, err
    data = json.loads(out)
    assert data["uid"] == data["euid"] == nobody.pw_uid
    assert data["gid"] == nobody.pw_gid
    assert 0 not in data["groups"]
    assert data["pdeathsig"] == signal.SIGKILL  # set after setuid, which clears it
    assert data["user"] == "nobody" and data["home"] == nobody.pw_dir
    assert data["fds"][:3] == [0, 1, 2] and len(data["fds"]) <= 4  # + the listdir's own


def test_trampoline_exits_when_the_agent_is_already_gone() -> None:
    # the agent pid the trampoline expects is not its parent: it must not run the command
    env = {**clean_environ(os.environ), "_SVCD_PPID": "1", "_SVCD_PDEATHSIG": "1"}
    proc = subprocess.run(
        [sys.executable, "-I", "-S", TRAMPOLINE, "sh", "-c", "echo ran"],
        env=env, capture_output=True, timeout=WAIT, check=False,
    )
    assert proc.returncode == EXIT_PARENT_GONE
    assert b"ran" not in proc.stdout


# The intermediate "agent": spawns a long-running child through spawn(), prints its pid,
# then waits to be killed.
INTERMEDIATE = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    from supervisor.spawn import SpawnRequest, clean_environ, spawn
    pid = spawn(SpawnRequest(["sleep", "300"], clean_environ(os.environ),
                             pdeathsig={pdeathsig}))
    print(pid, flush=True)
    sys.stdin.read()  # until killed
    """
)


def _grandchild_after_killing_parent(pdeathsig: bool) -> psutil.Process:
    root = str(Path(__file__).resolve().parent.parent)
    agent = subprocess.Popen(
        [sys.executable, "-c", INTERMEDIATE.format(root=root, pdeathsig=pdeathsig)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        assert agent.stdout is not None
        child = psutil.Process(int(agent.stdout.readline()))
        # the trampoline has exec'd sleep once its pdeathsig is armed
        wait_for_sync(lambda: child.name() == "sleep", WAIT, "child to exec sleep")
        agent.kill()
        agent.wait(WAIT)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(WAIT)
        assert agent.stdin is not None
        agent.stdin.close()
        if agent.stdout is not None:
            agent.stdout.close()
    return child


def _gone(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def test_child_dies_when_the_agent_is_killed() -> None:
    child = _grandchild_after_killing_parent(pdeathsig=True)
    try:
        wait_for_sync(lambda: _gone(child), WAIT, "child killed by PR_SET_PDEATHSIG")
    finally:
        if not _gone(child):
            child.kill()


def test_without_pdeathsig_the_child_survives() -> None:
    child = _grandchild_after_killing_parent(pdeathsig=False)
    try:
        assert not _gone(child)  # the control case: it outlives its parent
    finally:
        child.kill()
        wait_for_sync(lambda: _gone(child), WAIT, "orphan killed")


# ---------------------------------------------------------------- fd_actions model


def apply_actions(table: dict[int, str], actions: list[tuple[int | str, ...]]) -> dict[int, str]:
    """Run posix_spawn file actions against a model fd table (fd -> open file)."""
    fds = dict(table)
    for action in actions:
        kind = action[0]
        if kind == os.POSIX_SPAWN_DUP2:
            src, dst = int(action[1]), int(action[2])
            assert src in fds, f"dup2 from closed fd {src}"
            fds[dst] = fds[src]
        elif kind == os.POSIX_SPAWN_CLOSE:
            fds.pop(int(action[1]), None)
        elif kind == os.POSIX_SPAWN_OPEN:
            fds[int(action[1])] = str(action[2])
    return fds


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=12), min_size=0, max_size=6, unique=True),
    st.one_of(st.none(), st.integers(min_value=0, max_value=12)),
    st.one_of(st.none(), st.integers(min_value=0, max_value=12)),
)
def test_fd_actions_place_every_fd_whatever_the_overlap(
    fds: list[int], stdout: int | None, stderr: int | None
) -> None:
    table = {fd: f"file{fd}" for fd in range(13)}
    result = apply_actions(table, fd_actions(fds, stdout, stderr))
    for i, fd in enumerate(fds):
        assert result[3 + i] == f"file{fd}"
    if stdout is not None:
        assert result[1] == f"file{stdout}"
    if stderr is not None:
        assert result[2] == f"file{stderr}"
    assert result[0] == os.devnull
