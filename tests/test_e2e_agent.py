"""End to end: a real svcd process, real workers, real svctl, as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.agent_proc import ROOT, AgentProcess, api_service, worker_command
from tests.conftest import free_port
from tests.waiting import wait_for_sync

pytestmark = pytest.mark.slow

WORKER_FIELDS: dict[str, type | tuple[type, ...]] = {
    "worker": str,
    "index": int,
    "pid": int,
    "generation": int,
    "state": str,
    "ready": bool,
    "health": str,
    "restarts": int,
    "uptime_s": (int, float),
    "rss_bytes": (int, float),
    "cpu_percent": (int, float),
    "connections": int,
    "requests": int,
    "qps": (int, float),
}


def http_get(port: int, path: str = "/") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        body: bytes = resp.read()
    return body.decode().strip()


def test_status_json_contract_and_crash_restart(tmp_path: Path) -> None:
    port = free_port()
    with AgentProcess(tmp_path, api_service(port)) as agent:
        status = agent.status()
        assert set(status["agent"]) >= {"name", "version", "pid", "uptime_s", "registry"}
        assert status["agent"]["name"] == "test-agent"
        assert status["agent"]["registry"] == "disabled"
        assert status["agent"]["pid"] == agent.proc.pid  # type: ignore[union-attr]
        (svc,) = status["services"]
        assert svc["name"] == "api" and svc["state"] == "running"
        assert svc["desired"] == 2 and svc["ready"] == 2 and isinstance(svc["generation"], int)
        assert [w["worker"] for w in svc["workers"]] == ["api:0", "api:1"]
        for w in svc["workers"]:
            for key, typ in WORKER_FIELDS.items():
                assert isinstance(w[key], typ), (key, w[key])
            assert w["state"] == "running" and w["ready"] is True
            assert w["health"] in ("passing", "failing", "unknown")

        served = {http_get(port) for _ in range(20)}
        assert served <= {str(p) for p in agent.worker_pids("api")}

        victim = agent.worker_pids("api")[0]
        os.kill(victim, signal.SIGKILL)
        wait_for_sync(
            lambda: victim not in agent.worker_pids("api")
            and len(agent.worker_pids("api")) == 2
            and agent.status()["services"][0]["ready"] == 2,
            15,
            "replacement worker ready",
        )
        restarts = {w["worker"]: w["restarts"] for w in agent.status()["services"][0]["workers"]}
        assert sum(restarts.values()) == 1
        events = agent.svctl("events", "--json")
        assert events.returncode == 0, events.stderr
        kinds = [json.loads(line) for line in events.stdout.splitlines() if line.strip()]
        assert any(e["type"] == "exited" and e["pid"] == victim for e in kinds)
        for e in kinds:
            assert {"time", "type", "service", "worker", "pid"} <= set(e)
    assert agent.proc is not None and agent.proc.returncode == 0


def test_sigterm_drains_every_worker(tmp_path: Path) -> None:
    port = free_port()
    agent = AgentProcess(tmp_path, api_service(port)).start()
    pids = agent.worker_pids("api")
    assert agent.stop(signal.SIGTERM) == 0
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_agent_sigkill_leaves_no_worker_behind(tmp_path: Path) -> None:
    port = free_port()
    agent = AgentProcess(tmp_path, api_service(port)).start()
    pids = agent.worker_pids("api")
    assert len(pids) == 2
    agent.stop(signal.SIGKILL)

    def all_gone() -> bool:
        return all(
            not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE
            for p in pids
        )

    wait_for_sync(all_gone, 10, "workers to die with the agent (PR_SET_PDEATHSIG)")


def test_svctl_exit_codes(tmp_path: Path) -> None:
    port = free_port()
    dead = f"""
[services.dead]
command = {worker_command("--exit-code", "3")}
[services.dead.backoff]
first_delay = 0.05
max = 0.2
start_limit = 3
"""
    agent = AgentProcess(tmp_path, api_service(port, count=1) + dead)
    agent.start(wait_ready=False)  # `dead` never is
    try:
        wait_for_sync(lambda: agent.svctl("probe", "ready", "api").returncode == 0, 30, "api")
        assert agent.svctl("status", "nope").returncode == 2
        assert agent.svctl("stop", "nope").returncode == 2
        assert agent.svctl("probe", "live").returncode == 0
        assert agent.svctl("probe", "live", "api").returncode == 0
        assert agent.svctl("probe", "live", "nope").returncode == 2
        assert agent.svctl("stop", "api").returncode == 0
        assert agent.svctl("probe", "ready", "api").returncode == 1
        stopped = agent.status()["services"][0]
        assert stopped["state"] == "stopped"
        assert [(w["worker"], w["pid"], w["state"]) for w in stopped["workers"]] == [
            ("api:0", 0, "exited")]
        assert "api:0" in agent.svctl("status", "api").stdout  # the table keeps the row
        assert agent.svctl("reload", "api").returncode == 1  # nothing runs to reload
        # start waits for readiness, like `systemctl start` of a notify unit
        started = agent.svctl("start", "api")
        assert started.returncode == 0 and "1/1 ready" in started.stdout, started
        assert agent.svctl("probe", "ready", "api").returncode == 0
        restarted = agent.svctl("restart", "api")
        assert restarted.returncode == 0 and "1/1 ready" in restarted.stdout, restarted
        assert agent.svctl("probe", "ready", "api").returncode == 0

        # a service that gives up: live no, and start reports the failure (exit 1)
        wait_for_sync(lambda: agent.svctl("probe", "live", "dead").returncode == 1, 30, "fatal")
        failed = agent.svctl("start", "dead")
        assert failed.returncode == 1 and "gave up (fatal)" in failed.stderr, failed
        assert "code 3" in failed.stderr, failed
        assert agent.svctl("restart", "dead").returncode == 1
        assert agent.svctl("restart", "dead", "--no-wait").returncode == 0
    finally:
        agent.stop()
    unreachable = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--socket", str(tmp_path / "none.sock"), "status"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert unreachable.returncode == 3
    assert unreachable.stderr.strip() and len(unreachable.stderr.strip().splitlines()) == 1


def test_reload_rolls_and_broken_config_is_rejected(tmp_path: Path) -> None:
    port = free_port()
    with AgentProcess(tmp_path, api_service(port)) as agent:
        before = set(agent.worker_pids("api"))
        out = agent.svctl("reload", "api")
        assert out.returncode == 0, out.stdout + out.stderr
        after = set(agent.worker_pids("api"))
        assert len(after) == 2 and not (before & after)

        good = agent.config.read_text()
        agent.config.write_text(good.replace("count = 2", "count = 0\nbogus = 1"))
        rejected = agent.svctl("reload")
        assert rejected.returncode == 1
        assert "count" in rejected.stderr + rejected.stdout
        assert "bogus" in rejected.stderr + rejected.stdout
        assert set(agent.worker_pids("api")) == after  # nothing changed

        agent.config.write_text(good.replace("count = 2", "count = 3"))
        dry = agent.svctl("reload", "--dry-run")
        assert dry.returncode == 0 and "api" in dry.stdout
        assert len(agent.worker_pids("api")) == 2
        assert agent.svctl("reload").returncode == 0
        wait_for_sync(lambda: len(agent.worker_pids("api")) == 3, 15, "scaled to 3 by reload")

        # the operator undoes the deploy: the config before this one comes back
        undo = agent.svctl("reload", "--previous")
        assert undo.returncode == 0, undo.stdout + undo.stderr
        wait_for_sync(lambda: len(agent.worker_pids("api")) == 2, 15, "back to 2 workers")
        history = list((agent.tmp / "state" / "configs").glob("*.json"))
        assert len(history) >= 3
        outcomes = [json.loads(p.read_text())["outcome"] for p in history]
        assert "ok" in outcomes


def test_previous_outlives_a_restart_and_belongs_to_its_config_file(tmp_path: Path) -> None:
    shared = tmp_path / "state"  # as root's default state dir is, for every agent
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first = AgentProcess(tmp_path / "a", api_service(free_port(), count=1), state_dir=shared)
    with first:
        first.config.write_text(first.config.read_text().replace("count = 1", "count = 2"))
        assert first.svctl("reload").returncode == 0
    with first:  # restarted: the config applied before this run is still the previous one
        plan = first.svctl("reload", "--previous", "--dry-run")
        assert plan.returncode == 0 and "count 2 -> 1" in plan.stdout, plan
    with AgentProcess(tmp_path / "b", api_service(free_port(), count=1), state_dir=shared) as other:
        alien = other.svctl("reload", "--previous", "--dry-run")  # a's history is not b's
        assert alien.returncode == 1 and "no previous config" in alien.stderr, alien


def test_previous_after_a_restart_is_the_config_that_ran(tmp_path: Path) -> None:
    """The history keeps the applied config, not the main file's text: a change made only
    in an included file, and a rolled-back reload (which changed nothing), read back as
    they ran."""
    agent = AgentProcess(tmp_path, api_service(free_port(), count=1))
    agent.config.write_text('include = ["conf.d/*.toml"]\n' + agent.config.read_text())
    (tmp_path / "conf.d").mkdir()
    included = tmp_path / "conf.d" / "w.toml"
    w_service = api_service(free_port(), count=1).replace("[services.api]", "[services.w]")
    included.write_text(w_service + 'env = { V = "1" }\n')
    with agent:
        included.write_text(w_service + 'env = { V = "2" }\n')
        assert agent.svctl("reload").returncode == 0
        good = agent.config.read_text()
        agent.config.write_text(good.replace(worker_command(), worker_command("--exit-code", "1")))
        assert agent.svctl("reload").returncode == 1  # rolled back
        agent.config.write_text(good)
    with agent:  # restarted on V = "2": before it ran V = "1", with api as it is
        plan = agent.svctl("reload", "--previous", "--dry-run")
        assert plan.returncode == 0, plan
        lines = plan.stdout.splitlines()
        assert any(x.startswith("~ w") and "env changed (V)" in x for x in lines), lines
        assert not any(x.startswith(("- ", "~ api")) for x in lines), lines


def test_check_config_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        f'[services.api]\ncommand = ["true"]\nlisten = ["tcp://127.0.0.1:{free_port()}"]\n'
    )
    ok = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", str(good)],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[services.api]\ncommand = []\ncount = 0\nrestart = "sometimes"\n')
    out = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", str(bad)],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )
    assert out.returncode == 2
    text = out.stdout + out.stderr
    for key in ("services.api.command", "services.api.count", "services.api.restart"):
        assert key in text, text
    assert "bad.toml" in text


def test_second_agent_on_the_same_socket_is_refused_clearly(tmp_path: Path) -> None:
    port = free_port()
    with AgentProcess(tmp_path, api_service(port, count=1)) as agent:
        second = subprocess.run(
            [sys.executable, "-m", "agent", "--config", str(agent.config)],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )
        assert second.returncode == 1
        assert "another svcd is running" in second.stderr
        assert "Traceback" not in second.stderr
        assert agent.svctl("probe", "ready").returncode == 0  # the first one is untouched


def test_two_agents_sharing_a_state_dir_keep_their_notify_sockets_apart(tmp_path: Path) -> None:
    """root's default state dir is one for all agents; names like api-0-1 repeat in each."""
    shared = tmp_path / "state"
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    slow = AgentProcess(tmp_path / "a", api_service(free_port(), 1, ("--ready-delay", "3")),
                        state_dir=shared)
    slow.start(wait_ready=False)
    try:
        # b's worker is ready long before a's sends READY=1 to the socket it was given
        with AgentProcess(tmp_path / "b", api_service(free_port(), 1), state_dir=shared):
            wait_for_sync(lambda: slow.svctl("probe", "ready").returncode == 0, 30, "a ready")
        assert slow.status()["services"][0]["workers"][0]["restarts"] == 0
    finally:
        slow.stop()
    assert not list((shared / "notify").iterdir())  # each agent removed its own directory


def test_a_failed_start_leaves_no_agent_running(tmp_path: Path) -> None:
    """tests/agent_proc.py: when readiness never comes, `with` stops the agent itself."""
    agent = AgentProcess(tmp_path, api_service(free_port(), count=1, args=("--never-ready",)))
    agent.ready_wait = 1.0
    with pytest.raises(AssertionError, match="agent ready"), agent:
        raise AssertionError("unreachable: the agent never becomes ready")
    assert agent.proc is not None and agent.proc.poll() is not None
    assert agent._stderr is not None and agent._stderr.closed
