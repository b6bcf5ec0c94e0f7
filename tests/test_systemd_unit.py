"""systemd/svcd.service as systemd itself judges it, and its agreement with the config.

`systemd-analyze verify` needs the ExecStart/ExecReload binaries to exist, so the unit
is copied to a temp dir with those two paths pointed at real executables; everything
else is checked exactly as shipped. Debian package for CI: `systemd`.
"""

from __future__ import annotations

import getpass
import grp
import json
import os
import pwd
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "svcd.service"
EXAMPLE = ROOT / "systemd" / "svcd-example.toml"

INSTALLED_SVCD = "/opt/svcd/bin/svcd"
INSTALLED_SVCTL = "/opt/svcd/bin/svctl"
STUB = "/bin/true"
ANALYZE_TIMEOUT = 60
# `systemd-analyze security` scores 0 (locked down) .. 10 (wide open), threshold in
# tenths. The unit scores 3.2 ("OK"); fail if a change drifts past "OK".
EXPOSURE_THRESHOLD = 40
# What the agent needs to exit on its own after SIGTERM beyond drain + graceful.
STOP_MARGIN_S = 5
DEFAULT_GRACEFUL_TIMEOUT_S = 30
# %t in a system unit is /run.
SYSTEM_RUNTIME_DIR = "/run"

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value in order (systemd allows repeated keys)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment outside a section: {raw!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section][key]
    assert len(values) == 1, f"{section}.{key} set {len(values)} times"
    return values[0]


def seconds(value: str) -> float:
    """A systemd time span such as `60s`, `1min 30s`, `2min` or a bare number."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def stubbed_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with the installed binaries pointed at an executable that exists."""
    text = UNIT.read_text() if text is None else text
    assert INSTALLED_SVCD in text and INSTALLED_SVCTL in text
    path = tmp_path / "svcd.service"
    path.write_text(text.replace(INSTALLED_SVCD, STUB).replace(INSTALLED_SVCTL, STUB))
    return path


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, *args], capture_output=True, text=True, timeout=ANALYZE_TIMEOUT, check=False
    )


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    result = analyze("verify", str(stubbed_copy(tmp_path)))
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    # verify reports unknown keys and bad values as warnings with exit 0: any line fails.
    assert output == "", output


@needs_analyze
def test_verify_would_catch_a_bad_line(tmp_path: Path) -> None:
    """The check above can fail: a typo in the unit shows up in verify's output."""
    broken = UNIT.read_text().replace("KillMode=mixed", "KillMode=mixed\nKilMode=mixed")
    result = analyze("verify", str(stubbed_copy(tmp_path, broken)))
    assert "KilMode" in result.stdout + result.stderr


@needs_analyze
def test_security_exposure_stays_low(tmp_path: Path) -> None:
    result = analyze(
        "security", "--offline=true", f"--threshold={EXPOSURE_THRESHOLD}",
        "--no-pager", str(stubbed_copy(tmp_path)),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def test_unit_speaks_the_agent_protocols(unit: dict[str, dict[str, list[str]]]) -> None:
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert seconds(one(unit, "Service", "WatchdogSec")) > 0
    assert one(unit, "Service", "KillMode") == "mixed"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "RuntimeDirectory") == "svcd"
    assert one(unit, "Service", "RuntimeDirectoryMode") == "0700"
    assert one(unit, "Service", "ExecStart").split() == [
        INSTALLED_SVCD, "--config", "/etc/svcd/svcd.toml",
    ]
    reload = one(unit, "Service", "ExecReload").split()
    assert reload[0] == INSTALLED_SVCTL and reload[-1] == "reload"
    assert "multi-user.target" in one(unit, "Install", "WantedBy")


def test_hardening_keeps_what_running_workers_as_other_users_needs(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    service = unit["Service"]
    assert "User" not in service, "the agent must be root to start workers as their users"
    assert "PrivateUsers" not in service
    caps = set(one(unit, "Service", "CapabilityBoundingSet").split())
    assert not any(c.startswith("~") for c in caps), "an allow list, not a deny list"
    for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_CHOWN"):
        assert cap in caps, cap
    assert "CAP_SYS_ADMIN" not in caps
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert one(unit, "Service", "PrivateTmp") == "yes"
    # Workers running as other users reach their notify sockets under the state dir
    # (notify/, 0711): the state dir must let them pass (search), not list.
    state_mode = int(one(unit, "Service", "StateDirectoryMode"), 8)
    assert state_mode & 0o001 and not state_mode & 0o066, oct(state_mode)
    # Under ProtectSystem=strict the agent can write only where systemd says:
    for key in ("RuntimeDirectory", "StateDirectory", "LogsDirectory"):
        assert one(unit, "Service", key) == "svcd"


def test_example_config_fits_the_unit(unit: dict[str, dict[str, list[str]]]) -> None:
    config = tomllib.loads(EXAMPLE.read_text())
    agent = config["agent"]
    socket_in_reload = one(unit, "Service", "ExecReload").replace("%t", SYSTEM_RUNTIME_DIR)
    assert f"--socket {agent['control_socket']} " in socket_in_reload
    assert agent["log_dir"] == "/var/log/svcd"  # LogsDirectory=svcd
    drain = float(agent.get("drain_delay", 0))
    longest = max(
        float(s.get("graceful_timeout", DEFAULT_GRACEFUL_TIMEOUT_S))
        for s in config["services"].values()
    )
    stop = seconds(one(unit, "Service", "TimeoutStopSec"))
    assert stop >= drain + longest + STOP_MARGIN_S, (stop, drain, longest)
    # The watchdog must leave the agent room for at least two pings per period.
    assert seconds(one(unit, "Service", "WatchdogSec")) >= 2


def test_example_config_passes_check_config(tmp_path: Path) -> None:
    """The example as an operator would adapt it: users, paths and command made local."""
    pytest.importorskip("agent.config", reason="agent.config not written yet")
    me = getpass.getuser()
    group = grp.getgrgid(os.getgid()).gr_name
    text = (
        EXAMPLE.read_text()
        .replace('"/srv/api/venv/bin/python"', f'"{sys.executable}"')
        .replace('cwd = "/srv/api"', f'cwd = "{tmp_path}"')
        .replace('user = "api"', f'user = "{me}"')
        .replace('group = "api"', f'group = "{group}"')
        .replace('log_dir = "/var/log/svcd"', f'log_dir = "{tmp_path / "logs"}"')
        .replace('"/run/svcd/svcd.sock"', f'"{tmp_path / "run" / "svcd.sock"}"')
    )
    config = tmp_path / "svcd.toml"
    config.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", str(config)],
        capture_output=True, text=True, timeout=ANALYZE_TIMEOUT, cwd=ROOT, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------- the agent inside the unit's privilege limits

AGENT_TIMEOUT = 30.0
HTTP_WORKER = ROOT / "tests" / "programs" / "http_worker.py"
# Ports below this need CAP_NET_BIND_SERVICE.
FIRST_UNPRIVILEGED_PORT = 1024
PRIVILEGED_PORT_TRIES = 50
# Between two `svctl status` polls while the agent starts (bounded by AGENT_TIMEOUT).
STATUS_POLL = 0.1


def free_privileged_port() -> int:
    """A free port below 1024 on 127.0.0.1 (the test binds as root)."""
    for _ in range(PRIVILEGED_PORT_TRIES):
        port = random.randrange(600, FIRST_UNPRIVILEGED_PORT)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024")


def world_executable(path: str) -> bool:
    """Whether any user can exec `path`: o+x on the file and every directory above it
    (the venv's interpreter may live under root's 0700 home)."""
    real = Path(os.path.realpath(path))
    return all(os.stat(p).st_mode & 0o001 for p in (real, *real.parents))


def python_for_other_users() -> str | None:
    """A Python ≥ 3.11 that `nobody` can run (the test worker is stdlib-only)."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and world_executable(candidate):
            return candidate
    return None


def setpriv_args(unit: dict[str, dict[str, list[str]]]) -> list[str]:
    """setpriv flags giving a root process exactly the unit's capability bounding set and
    NoNewPrivileges (what systemd applies before it execs ExecStart)."""
    setpriv = shutil.which("setpriv")
    assert setpriv is not None
    caps = one(unit, "Service", "CapabilityBoundingSet").split()
    wanted = ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)
    args = [setpriv, f"--bounding-set=-all,{wanted}", "--inh-caps=-all"]
    if one(unit, "Service", "NoNewPrivileges") == "yes":
        args.append("--no-new-privs")
    return args


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)
def test_agent_runs_workers_as_another_user_within_the_units_capabilities(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    """The hardening still lets svcd do its job: with only the unit's capabilities and
    no_new_privs, the agent binds a port below 1024, starts a worker as `nobody`, sees it
    ready (notify socket reachable through the 0711 state dir), and drains it."""
    python = python_for_other_users()
    if python is None:
        pytest.skip("no Python interpreter that other users can execute")
    nobody = pwd.getpwnam("nobody")
    # Not under pytest's 0700 tmp dir: the worker (nobody) must reach its notify socket.
    base = Path(tempfile.mkdtemp(prefix="svcd-unit-test-"))
    try:
        base.chmod(0o711)
        state = base / "state"
        state.mkdir(mode=0o711)
        state.chmod(int(one(unit, "Service", "StateDirectoryMode"), 8))
        control = base / "run" / "svcd.sock"
        config = base / "svcd.toml"
        config.write_text(
            f"""
[agent]
name = "unit-caps-test"
control_socket = "{control}"
log_dir = "{base / 'logs'}"
state_dir = "{state}"

[services.w]
command = {json.dumps([python, str(HTTP_WORKER)])}
user = "{nobody.pw_name}"
group = "{grp.getgrgid(nobody.pw_gid).gr_name}"
cwd = "/"
listen = ["tcp://127.0.0.1:{free_privileged_port()}"]
graceful_timeout = 5
"""
        )
        stderr = base / "svcd.stderr"
        with open(stderr, "wb") as err:
            agent = subprocess.Popen(
                [*setpriv_args(unit), sys.executable, "-m", "agent", "--config", str(config)],
                stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT,
            )
        try:
            status = wait_status_ready(agent, control, stderr)
            worker = status["services"][0]["workers"][0]
            assert psutil.Process(worker["pid"]).uids().real == nobody.pw_uid
            agent.terminate()
            assert agent.wait(timeout=AGENT_TIMEOUT) == 0, stderr.read_text(errors="replace")
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait(timeout=AGENT_TIMEOUT)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def wait_status_ready(
    agent: subprocess.Popen[bytes], control: Path, stderr: Path
) -> dict[str, Any]:
    """`svctl status --json` once every service is ready; fails if the agent dies."""
    deadline = time.monotonic() + AGENT_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise AssertionError(f"svcd exited {agent.returncode}: {stderr.read_text()[-3000:]}")
        result = subprocess.run(
            [sys.executable, "-m", "agent.cli", "--socket", str(control), "status", "--json"],
            capture_output=True, text=True, timeout=AGENT_TIMEOUT, cwd=ROOT, check=False,
        )
        last = result.stdout + result.stderr
        if result.returncode == 0:
            status: dict[str, Any] = json.loads(result.stdout)
            if all(s["ready"] >= s["desired"] > 0 for s in status["services"]):
                return status
        time.sleep(STATUS_POLL)
    raise AssertionError(f"not ready within {AGENT_TIMEOUT}s: {last}; {stderr.read_text()[-3000:]}")
