"""svctl: parsing, exit codes, output formats, and what its hot path imports.

Three rigs:
- no agent at all: usage errors and "agent unreachable" (exit 3, one line);
- an in-process agent (real AgentCore + Supervisor + workers + ControlServer) with
  `agent.cli.run()` called in a thread (a child process would have its exit status
  taken by the supervisor's waitpid(-1) reaper in this process);
- a real `svcd` process and `svctl` processes (slow): the JSON contract, the import
  budget of `status --json`, following streams and Ctrl-C.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent import cli, cli_render, cli_table
from agent.control import ControlServer
from agent.core import AgentCore
from tests.agent_proc import ROOT, AgentProcess, api_service
from tests.conftest import free_port
from tests.etcd_fixture import EtcdServer
from tests.test_control import make_core, running
from tests.waiting import wait_for_sync

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 20.0
#: Modules `svctl status` (table or --json) must not import (STYLE.md: svctl never
#: imports supervisor/; the table is drawn without rich; etcd only for discover).
FORBIDDEN_ON_HOT_PATH = ("rich", "supervisor", "etcd3aio", "psutil", "agent.core", "agent.config")


def svctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )


# ---------------------------------------------------------------- parsing


def test_parser_accepts_json_before_and_after_the_command() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["--json", "status"]).json is True
    assert parser.parse_args(["status", "--json"]).json is True
    assert parser.parse_args(["status"]).json is False
    args = parser.parse_args(["reload", "api", "--dry-run", "--no-wait"])
    assert (args.service, args.dry_run, args.no_wait, args.previous) == ("api", True, True, False)
    args = parser.parse_args(["logs", "api", "-f", "-n", "5", "--worker", "1"])
    assert (args.follow, args.lines, args.worker) == (True, 5, 1)
    args = parser.parse_args(["discover", "api", "--etcd", "http://a:1,http://b:2", "--watch"])
    assert args.etcd == "http://a:1,http://b:2" and args.watch


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["scale", "api"],
        ["scale", "api", "-1"],
        ["scale", "api", "many"],
        ["probe", "dead"],
        ["logs"],
        ["start"],
        ["status", "--interval", "0"],
    ],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info, redirect_stderr(io.StringIO()):
        cli.run(argv)
    assert info.value.code == 2


# ---------------------------------------------------------------- the table (no agent)


class Tty(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def worker_status(index: int, **fields: Any) -> dict[str, Any]:
    base = {"worker": f"api:{index}", "index": index, "pid": 1000 + index, "generation": 1,
            "state": "running", "ready": True, "health": "passing", "restarts": 0,
            "uptime_s": 65.0, "rss_bytes": 21.5 * 2**20, "cpu_percent": 0.5,
            "connections": 3, "requests": 1234, "qps": 5.0, "send_fail": 0, "timers": 1,
            "exit_counts": {}, "last_exit": "", "last_exit_reason": "", "health_reason": ""}
    return {**base, **fields}


def sample_status() -> dict[str, Any]:
    crashed = worker_status(
        1, pid=0, state="backoff", ready=False, health="failing", restarts=2,
        last_exit="signal SIGKILL", last_exit_reason="killed by SIGKILL",
        health_reason="connection refused", exit_counts={"signal SIGKILL": 2, "code 1": 1},
    )
    return {
        "agent": {"name": "web-1", "version": "0.1.0", "pid": 41, "uptime_s": 12.5,
                  "registry": "disabled"},
        "services": [{"name": "api", "state": "running", "desired": 2, "ready": 1,
                      "generation": 1, "listen": ["tcp://127.0.0.1:8080"],
                      "workers": [worker_status(0), crashed]}],
    }


def test_status_table_lines() -> None:
    lines = cli_render.status_lines(sample_status())
    assert lines[0].startswith("svcd web-1  v0.1.0  pid 41  up 12s  registry disabled")
    assert "workers 1/2 ready" in lines[0]
    assert lines[2] == "api  running  1/2 ready  generation 1  tcp://127.0.0.1:8080"
    header = lines[3].split()
    assert header == list(cli_render.COLUMNS)
    assert set(lines[4]) == {"\u2500"} and len(lines[4]) == max(len(line) for line in lines[3:9])
    rows = {line.split()[0]: line for line in lines[5:7]}
    assert rows["api:0"].split() == ["api:0", "1000", "running", "passing", "0", "1m05s",
                                     "21.5M", "0.5%", "3", "1234", "5.0", "0", "1"]
    # not ready: a star; no process: dashes; how it ended and why the check fails
    assert rows["api:1*"].split()[:6] == ["api:1*", "-", "backoff", "(signal", "SIGKILL)",
                                          "failing"]
    assert "connection refused" in rows["api:1*"]
    assert set(lines[7]) == {"\u2500"}
    assert lines[8].split()[:5] == ["total", "1/2", "up", "1", "failing"]
    assert lines[9] == "api:1 last ended: killed by SIGKILL"
    exits = lines[lines.index("exit status") + 3:]
    assert [line.split() for line in exits] == [["api", "code", "1", "1"],
                                                ["api", "signal", "SIGKILL", "2"]]
    for line in lines:
        assert line == line.rstrip(), repr(line)  # no trailing spaces
    # right-aligned numbers: every cell of a column ends where its header ends
    pid_end = lines[3].index("pid") + len("pid")
    assert rows["api:0"][pid_end - 4:pid_end] == "1000"


def test_status_table_without_services() -> None:
    status = {**sample_status(), "services": []}
    assert cli_render.status_lines(status)[1:] == ["no services configured"]


def test_colour_only_on_a_terminal_that_allows_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert cli_table.use_color(Tty()) and not cli_table.use_color(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not cli_table.use_color(Tty())
    monkeypatch.setenv("NO_COLOR", "")  # no-color.org: empty means unset
    assert cli_table.use_color(Tty())
    monkeypatch.setenv("TERM", "dumb")
    assert not cli_table.use_color(Tty())


def test_colour_changes_no_visible_character() -> None:
    plain = cli_render.status_lines(sample_status(), color=False)
    coloured = cli_render.status_lines(sample_status(), color=True)
    assert plain != coloured
    strip = re.compile(r"\x1b\[[0-9;]*m")
    assert [strip.sub("", line) for line in coloured] == plain
    assert "\x1b[1;31mfailing" in "".join(coloured)  # bold red


def test_rule_falls_back_to_ascii() -> None:
    assert cli_table.rule_char(io.TextIOWrapper(io.BytesIO(), encoding="utf-8")) == "\u2500"
    assert cli_table.rule_char(io.TextIOWrapper(io.BytesIO(), encoding="ascii")) == "-"
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    cli_render.print_status(sample_status(), out)  # no UnicodeEncodeError
    out.flush()


def test_table_rejects_a_row_of_the_wrong_width() -> None:
    table = cli_table.Table(("a", "b"))
    with pytest.raises(ValueError, match="1 cells for 2 columns"):
        table.add_row(["x"])


def test_watch_redraws_in_place_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    out = Tty()
    cli_render.watch_status(sample_status, interval=0.01, count=2, out=out)
    frames = out.getvalue().split(cli_render.HOME)
    assert frames[0] == "" and len(frames) == 3
    assert all(f.endswith(cli_render.CLEAR_BELOW) and "api:0" in f for f in frames[1:])
    piped = io.StringIO()
    cli_render.watch_status(sample_status, interval=0.01, count=2, out=piped)
    assert "\x1b" not in piped.getvalue() and piped.getvalue().count("svcd web-1") == 2


# ---------------------------------------------------------------- unreachable


def test_missing_socket_is_exit_3_with_one_line(tmp_path: Path) -> None:
    result = svctl("--socket", str(tmp_path / "nope.sock"), "status")
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("svctl: no svcd control socket at ")


def test_default_socket_comes_from_the_environment(tmp_path: Path) -> None:
    env = {**os.environ, "SVCD_SOCKET": str(tmp_path / "env.sock")}
    result = svctl("status", "--json", env=env)
    assert result.returncode == 3
    assert str(tmp_path / "env.sock") in result.stderr


def test_dead_socket_is_exit_3(tmp_path: Path) -> None:
    """A socket file nobody listens on (a SIGKILLed agent leaves one)."""
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    result = svctl("--socket", str(path), "status")
    assert result.returncode == 3, result
    assert result.stderr.startswith("svctl: cannot reach svcd at unix:")
    assert result.stderr.count("\n") == 1


def test_not_a_socket_is_exit_3(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    result = svctl("--socket", str(path), "probe", "live")
    assert result.returncode == 3 and "not a socket" in result.stderr


def test_agent_that_never_answers_is_exit_3(tmp_path: Path) -> None:
    """Connected but silent (a hung agent): the query deadline turns it into exit 3."""
    path = tmp_path / "hung.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen(8)  # the kernel accepts; nobody ever answers
        result = svctl("--socket", str(path), "--timeout", "1", "status", "--json")
    assert result.returncode == 3, result
    assert result.stderr.count("\n") == 1


# ---------------------------------------------------------------- in-process agent


@dataclass
class Agent:
    core: AgentCore
    socket: Path
    config: Path
    port: int

    async def run(self, *args: str) -> tuple[int, str, str]:
        """`svctl --socket S ARGS` in a thread: (exit code, stdout, stderr)."""

        def call() -> tuple[int, str, str]:
            out, err = io.StringIO(), io.StringIO()
            with redirect_stdout(out), redirect_stderr(err):
                try:
                    code = cli.run(["--socket", str(self.socket), *args])
                except SystemExit as exc:
                    code = int(exc.code or 0)
            return code, out.getvalue(), err.getvalue()

        return await asyncio.to_thread(call)

    async def status(self) -> dict[str, Any]:
        code, out, err = await self.run("status", "--json")
        assert code == 0, err
        return json.loads(out)  # type: ignore[no-any-return]


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    port = free_port()
    core = make_core(tmp_path, api_service(port))
    await core.supervisor.start()
    control = ControlServer(core, tmp_path / "run" / "svcd.sock")
    try:
        async with running(core):
            await core.start_services()
            async with asyncio.timeout(TIMEOUT):
                await core.wait_ready()
            await control.start()
            yield Agent(core, control.socket_path, tmp_path / "svcd.toml", port)
    finally:
        await control.stop(grace=0)
        await core.supervisor.close()
        await core.supervisor.close_reaper()


async def test_status_table(agent: Agent) -> None:
    code, out, err = await agent.run("status")
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.split()[:2] == ["worker", "pid"])
    for column in ("worker", "pid", "state", "health", "restarts", "uptime", "memory", "cpu",
                   "connections", "requests", "qps", "send_fail", "timers"):
        assert column in header, (column, header)
    assert "svcd test-agent" in out
    assert out.count("api:0") == 1 and out.count("api:1") == 1
    assert "total" in out
    # one service only; an unknown one is exit 2
    code, out, _ = await agent.run("status", "api")
    assert code == 0 and "api:0" in out
    code, out, err = await agent.run("status", "nope")
    assert code == 2 and out == "" and err == "svctl: no service named 'nope'\n"


async def test_status_watch_json_prints_one_object_per_refresh(agent: Agent) -> None:
    code, out, err = await agent.run("status", "--watch", "--json", "--count", "2",
                                     "--interval", "0.1")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    assert all(json.loads(line)["agent"]["name"] == "test-agent" for line in lines)


async def test_status_watch_table(agent: Agent) -> None:
    code, out, err = await agent.run("status", "--watch", "--count", "2", "--interval", "0.1")
    assert code == 0, err
    assert "api:0" in out


async def test_actions_and_their_exit_codes(agent: Agent) -> None:
    assert await agent.run("stop", "api") == (0, "api: stopped\n", "")
    assert (await agent.status())["services"][0]["state"] == "stopped"
    assert (await agent.run("probe", "ready", "api"))[0] == 1
    assert await agent.run("start", "api") == (0, "api: started (2/2 ready)\n", "")
    assert (await agent.run("probe", "ready", "api"))[0] == 0  # start waited for it
    code, out, _ = await agent.run("restart", "api", "--json")
    assert code == 0 and json.loads(out) == {"ok": True, "message": "api: restarted (2/2 ready)"}
    for command in ("start", "stop", "restart"):
        code, out, err = await agent.run(command, "nope")
        assert (code, out) == (2, ""), command
        assert err == "svctl: no service named 'nope'\n"
    assert (await agent.run("scale", "nope", "1"))[0] == 2
    assert await agent.run("scale", "api", "1") == (0, "api: scaled to 1\n", "")
    assert (await agent.status())["services"][0]["desired"] == 1


async def test_probe_exit_codes(agent: Agent) -> None:
    code, out, _ = await agent.run("probe", "live")
    assert code == 0 and out.startswith("live: ok")
    code, out, _ = await agent.run("probe", "ready", "--json")
    assert code == 0 and json.loads(out)["ok"] is True
    assert (await agent.run("probe", "ready", "nope"))[0] == 2


async def test_reload_shows_progress_and_waits(agent: Agent) -> None:
    before = {w["pid"] for w in (await agent.status())["services"][0]["workers"]}
    code, out, err = await agent.run("reload", "api")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) >= 3 and lines[-1].startswith("api: reloaded")
    after = {w["pid"] for w in (await agent.status())["services"][0]["workers"]}
    assert len(after) == 2 and not before & after  # it waited: new workers serve


async def test_reload_dry_run_prints_the_plan(agent: Agent) -> None:
    agent.config.write_text(agent.config.read_text().replace("count = 2", "count = 3"))
    code, out, err = await agent.run("reload", "--dry-run")
    assert code == 0, err
    assert any(line.startswith("~ api") for line in out.splitlines()), out
    code, out, _ = await agent.run("reload", "--dry-run", "--json")
    result = json.loads(out)
    assert result["ok"] is True and result["plan"]
    assert (await agent.status())["services"][0]["desired"] == 2


async def test_reload_of_a_broken_config_is_exit_1_and_lists_problems(agent: Agent) -> None:
    agent.config.write_text(agent.config.read_text().replace("count = 2", "count = 0") + "x = 1\n")
    code, out, err = await agent.run("reload")
    assert code == 1, (out, err)  # SPEC: 1 = the action failed (nothing changed)
    assert err.startswith("svctl: config rejected:\n")
    assert "services.api.count" in err and len(err.splitlines()) >= 3


async def test_a_rejected_config_is_an_event_unless_it_was_a_dry_run(agent: Agent) -> None:
    agent.config.write_text(agent.config.read_text() + "x = 1\n")

    def rejections() -> int:
        return sum(e.type == "config_rejected" for e in agent.core.events_history())

    assert (await agent.run("reload", "--dry-run"))[0] == 1
    assert rejections() == 0
    assert (await agent.run("reload"))[0] == 1
    assert rejections() == 1


async def test_reload_rolled_back_is_exit_1(agent: Agent) -> None:
    text = agent.config.read_text().split("[services.api]")[0]
    agent.config.write_text(text + api_service(agent.port, args=("--exit-code", "1")))
    code, out, err = await agent.run("reload")
    assert code == 1, (out, err)
    assert "api" in out.splitlines()[-1]
    assert (await agent.status())["services"][0]["ready"] == 2


async def test_reload_is_done_when_added_services_are_ready_and_fails_if_one_gives_up(
    agent: Agent,
) -> None:
    """Like `svctl start`: a reload that adds a service returns once it is ready, and
    exit 1 with the reason when it goes fatal (it stays configured, as after a start)."""
    base = agent.config.read_text()
    extra = api_service(free_port()).replace("[services.api]", "[services.extra]")
    agent.config.write_text(base + extra)
    code, out, err = await agent.run("reload")
    assert code == 0, (out, err)
    (svc,) = [s for s in (await agent.status())["services"] if s["name"] == "extra"]
    assert svc["ready"] == 2, svc
    broken = api_service(free_port(), count=1, args=("--exit-code", "1"))
    agent.config.write_text(base + extra + broken.replace("[services.api]", "[services.bad]"))
    code, out, err = await agent.run("reload")
    assert code == 1, (out, err)
    assert "bad: gave up (fatal)" in out.splitlines()[-1], out


async def test_reload_previous_without_history_is_exit_1(agent: Agent) -> None:
    code, _, err = await agent.run("reload", "--previous")
    assert code == 1 and "previous" in err
    code, out, _ = await agent.run("reload", "--previous", "--json")  # errors as JSON too
    error = err.removeprefix("svctl: ").strip()
    assert code == 1 and json.loads(out) == {"ok": False, "exit_code": 1, "error": error}
    code, _, err = await agent.run("reload", "api", "--previous")  # not one service's
    assert code == 2 and "give no SERVICE" in err


async def test_connection_flags_also_follow_the_command(agent: Agent, tmp_path: Path) -> None:
    def call(*argv: str) -> tuple[int, str]:
        out = io.StringIO()
        with redirect_stdout(out), redirect_stderr(io.StringIO()):
            try:
                code = cli.run(list(argv))
            except SystemExit as exc:
                code = int(exc.code or 0)
        return code, out.getvalue()

    code, out = await asyncio.to_thread(call, "status", "--json", "--socket", str(agent.socket))
    assert code == 0 and json.loads(out)["agent"]["name"] == "test-agent"
    # given after the command, it wins over the one before it
    code, _ = await asyncio.to_thread(
        call, "--socket", str(tmp_path / "none.sock"), "probe", "live", "--socket",
        str(agent.socket))
    assert code == 0
    code, out = await asyncio.to_thread(call, "--version")
    assert code == 0 and out.startswith("svctl ")


async def test_logs_and_events(agent: Agent) -> None:
    code, out, err = await agent.run("logs", "api", "-n", "5")
    assert code == 0, err
    assert all(line.startswith("api:") for line in out.splitlines())
    code, out, _ = await agent.run("logs", "api", "-n", "5", "--json")
    for line in out.splitlines():
        assert set(json.loads(line)) >= {"time", "service", "worker", "pid", "stream", "line"}
    assert (await agent.run("logs", "nope"))[0] == 2

    code, out, err = await agent.run("events", "--json")
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events and all(
        set(e) >= {"time", "type", "service", "worker", "pid"} for e in events
    )
    assert {"started", "ready"} <= {e["type"] for e in events}
    code, out, _ = await agent.run("events", "-n", "1")
    assert code == 0 and len(out.splitlines()) == 1


async def test_discover_without_registry_is_a_usage_error(agent: Agent) -> None:
    env_before = os.environ.pop("SVCD_ETCD", None)
    try:
        code, _, err = await agent.run("discover", "api")
    finally:
        if env_before is not None:
            os.environ["SVCD_ETCD"] = env_before
    assert code == 2 and "no registry" in err


# ---------------------------------------------------------------- a real svcd (slow)


@pytest.fixture
def svcd(tmp_path: Path) -> Iterator[AgentProcess]:
    with AgentProcess(tmp_path, api_service(free_port())) as proc:
        yield proc


@pytest.mark.slow
@pytest.mark.parametrize("extra", [("--json",), ()], ids=["json", "table"])
def test_status_hot_path_imports(svcd: AgentProcess, extra: tuple[str, ...]) -> None:
    """`svctl status` pays for grpc and the messages, not for rich or supervisor/; the
    table does not load json either."""
    forbidden = FORBIDDEN_ON_HOT_PATH + (() if extra else ("json",))
    script = textwrap.dedent(
        f"""
        import sys
        from agent import cli
        code = cli.run(["--socket", {svcd.socket!r}, "status", *{extra!r}])
        loaded = sorted(m for m in sys.modules
                        if any(m == f or m.startswith(f + ".") for f in {forbidden!r}))
        sys.stderr.write(repr((code, loaded)))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.stderr == repr((0, [])), result.stderr


@pytest.mark.slow
def test_status_json_contract_from_svctl(svcd: AgentProcess) -> None:
    result = svcd.svctl("status", "--json")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1  # one object, one line
    data = json.loads(result.stdout)
    assert data["agent"]["pid"] == svcd.proc.pid  # type: ignore[union-attr]
    (svc,) = data["services"]
    assert svc["name"] == "api" and svc["ready"] == 2
    assert {type(v) for v in (svc["desired"], svc["generation"])} == {int}
    for w in svc["workers"]:
        assert isinstance(w["rss_bytes"], float) and isinstance(w["requests"], int)
        assert isinstance(w["ready"], bool)


@pytest.mark.slow
def test_follow_events_until_interrupted(svcd: AgentProcess) -> None:
    follower = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--socket", svcd.socket, "events", "-f", "--json",
         "-n", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        stream = follower.stdout
        assert stream is not None
        json.loads(stream.readline())  # the replayed one
        assert svcd.svctl("stop", "api").returncode == 0

        def next_is_exited() -> bool:
            return bool(json.loads(stream.readline())["type"] == "exited")

        wait_for_sync(next_is_exited, TIMEOUT, "an exited event on the followed stream")
        follower.send_signal(signal.SIGINT)
        assert follower.wait(TIMEOUT) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(TIMEOUT)


@pytest.mark.slow
@pytest.mark.parametrize("command", [("events", "-f"), ("logs", "api", "-f")],
                         ids=["events", "logs"])
def test_followers_end_cleanly_when_the_agent_stops(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """A graceful agent stop ends `-f` streams like `docker logs -f` ends: exit 0, the
    last lines delivered (the workers' `stopped` events), no "cannot reach" error."""
    with AgentProcess(tmp_path, api_service(free_port())) as proc:
        follower = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "--socket", proc.socket, *command, "-n", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        try:
            assert follower.stdout is not None
            assert follower.stdout.readline()  # the replayed line: the stream is open
            assert proc.stop() == 0
            out, err = follower.communicate(timeout=TIMEOUT)
            assert follower.returncode == 0, err
            assert err == ""
            if command[0] == "events":
                assert "stopped" in out
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait(TIMEOUT)


@pytest.mark.slow
def test_a_lost_agent_ends_a_json_stream_with_exit_3_and_nothing_but_events(
    tmp_path: Path,
) -> None:
    """The `{"ok": false, ...}` error object is for one-answer commands; a stream's
    reader gets only events on stdout (the reason goes to stderr)."""
    with AgentProcess(tmp_path, api_service(free_port())) as proc:
        follower = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "--socket", proc.socket, "events", "-f",
             "--json", "-n", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        try:
            assert follower.stdout is not None
            first = follower.stdout.readline()
            assert proc.stop(signal.SIGKILL) == -signal.SIGKILL
            out, err = follower.communicate(timeout=TIMEOUT)
            assert follower.returncode == 3, err
            assert "cannot reach svcd" in err
            assert all("type" in json.loads(line) for line in [first, *out.splitlines()])
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait(TIMEOUT)


@pytest.mark.slow
def test_discover_reads_etcd(tmp_path: Path, etcd: EtcdServer) -> None:
    """Endpoints come from etcd: through the agent's RegistryInfo, or from --etcd."""
    port = free_port()
    registry = f'\n[registry]\nendpoints = ["{etcd.endpoint}"]\nprefix = "/svcd-cli"\nttl = 5\n'
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    with AgentProcess(agent_dir, api_service(port), registry=registry) as proc:
        expected = {"addr": f"127.0.0.1:{port}", "agent": "test-agent", "workers": 2,
                    "health": "unknown"}

        def discovered(*extra: str) -> dict[str, Any] | None:
            result = proc.svctl("discover", "api", "--json", *extra)
            assert result.returncode == 0, result.stderr
            data: dict[str, Any] = json.loads(result.stdout)
            return data if data["endpoints"] and data["endpoints"][0]["workers"] == 2 else None

        via_agent = wait_for_sync(discovered, TIMEOUT, "api's endpoint in etcd")
        assert via_agent == {"service": "api", "endpoints": [expected]}
        direct = discovered("--etcd", etcd.endpoint, "--prefix", "/svcd-cli")
        assert direct == via_agent
        table = proc.svctl("discover", "api")
        assert table.returncode == 0 and f"127.0.0.1:{port}" in table.stdout
        assert proc.svctl("discover", "nope", "--json").stdout.strip() == (
            '{"service": "nope", "endpoints": []}'
        )
