"""`preload = true`: a real agent forks server_core workers from a template process.

Checked from outside, with real processes: the workers are the agent's children in
their own process groups with their own environment, forked (not exec'd) from the
generation's template; a crashed worker is forked again from the same template; a
reload makes a new template and retires the old one; a broken new generation is rolled
back; a program that does not speak the protocol fails like a crashing worker; nothing
outlives the agent, whether it stops or is SIGKILLed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from tests.agent_proc import ROOT, AgentProcess, worker_command
from tests.conftest import free_port
from tests.waiting import wait_for_sync

APP = ROOT / "tests" / "programs" / "preload_app.py"
WAIT = 30.0


def services(port: int, fail_flag: Path, extra: str = "", env: str = "") -> str:
    """The preloaded `api` service; `env`: more `KEY = "value"` pairs for its env."""
    return f"""
[services.api]
command = {json.dumps([sys.executable, str(APP)])}
count = 2
listen = ["tcp://127.0.0.1:{port}"]
preload = true
graceful_timeout = 5
ready_timeout = 10
env = {{ FAIL_IF_EXISTS = "{fail_flag}"{", " + env if env else ""} }}
{extra}
"""


def ask(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
    return answer


def workers(agent: AgentProcess) -> list[dict[str, Any]]:
    (svc,) = agent.status()["services"]
    return list(svc["workers"])


def templates(agent: AgentProcess) -> list[psutil.Process]:
    """The agent's children that are not workers: the preload templates."""
    worker_pids = {w["pid"] for w in workers(agent)}
    return [p for p in agent.descendants() if p.pid not in worker_pids]


def all_ready(agent: AgentProcess, generation: int) -> bool:
    ws = workers(agent)
    return len(ws) == 2 and all(w["ready"] and w["generation"] == generation for w in ws)


def test_preloaded_workers_are_forked_children_of_the_agent(tmp_path: Path) -> None:
    port = free_port()
    with AgentProcess(tmp_path, services(port, tmp_path / "fail")) as agent:
        (template,) = templates(agent)
        assert template.ppid() == agent.proc.pid  # type: ignore[union-attr]
        assert f"preload template  pid {template.pid}  generation 1" in agent.svctl("status").stdout
        slot_of = {}
        for w in workers(agent):
            assert psutil.Process(w["pid"]).ppid() == agent.proc.pid  # type: ignore[union-attr]
            assert os.getpgid(w["pid"]) == w["pid"] == os.getsid(w["pid"])
            slot_of[w["pid"]] = w["worker"].split(":")[1]
        # (/proc/PID/environ shows the template's exec-time environment; ask the worker)
        for _ in range(20):
            answer = ask(port)
            assert answer["imported_in"] == template.pid  # forked, not exec'd
            assert answer["worker"] == slot_of[answer["pid"]]  # its own environment
            assert answer["generation"] == "1"

        # a crash: the replacement is forked from the same template
        victim = workers(agent)[0]
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for_sync(
            lambda: all_ready(agent, 1) and victim["pid"] not in agent.worker_pids("api"),
            WAIT, "the killed worker replaced",
        )
        assert [t.pid for t in templates(agent)] == [template.pid]
        replaced = next(w for w in workers(agent) if w["worker"] == victim["worker"])
        assert replaced["restarts"] == 1
        assert psutil.Process(replaced["pid"]).ppid() == agent.proc.pid  # type: ignore[union-attr]


def test_reload_forks_from_a_new_template_and_retires_the_old(tmp_path: Path) -> None:
    port = free_port()
    fail = tmp_path / "fail"
    with AgentProcess(tmp_path, services(port, fail)) as agent:
        (old_template,) = templates(agent)
        old_pids = set(agent.worker_pids("api"))
        out = agent.svctl("reload", "api")
        assert out.returncode == 0, out.stderr
        wait_for_sync(lambda: all_ready(agent, 2), WAIT, "generation 2 ready")
        wait_for_sync(lambda: not old_template.is_running(), WAIT, "old template gone")
        (new_template,) = templates(agent)
        (shown,) = agent.status()["services"][0]["templates"]  # status shows the template
        assert (shown["pid"], shown["generation"], shown["forks"]) == (new_template.pid, 2, 2)
        assert shown["rss_bytes"] > 0
        assert not old_pids & set(agent.worker_pids("api"))
        answers = {ask(port)["imported_in"] for _ in range(10)}
        assert answers == {new_template.pid}

        # a broken deploy: the new template cannot import; the reload rolls back
        fail.touch()
        out = agent.svctl("reload", "api")
        assert out.returncode == 1, out.stdout
        assert "preload" in out.stdout + out.stderr
        assert all_ready(agent, 2)
        assert [t.pid for t in templates(agent)] == [new_template.pid]
        log = (tmp_path / "logs" / "api.log").read_text()
        assert "broken on purpose" in log  # the template's stderr reaches the service log

        # the serving generation still forks: a crash is repaired from its template
        victim = agent.worker_pids("api")[0]
        os.kill(victim, signal.SIGKILL)
        wait_for_sync(
            lambda: all_ready(agent, 2) and victim not in agent.worker_pids("api"),
            WAIT, "the killed worker replaced",
        )
        assert {ask(port)["imported_in"] for _ in range(10)} == {new_template.pid}


def test_a_program_without_preload_support_fails_like_a_crashing_worker(
    tmp_path: Path,
) -> None:
    port = free_port()
    toml = f"""
[services.api]
command = {worker_command()}
listen = ["tcp://127.0.0.1:{port}"]
preload = true
ready_timeout = 2
graceful_timeout = 2
"""
    agent = AgentProcess(tmp_path, toml)
    try:
        agent.start(wait_ready=False)  # it never gets ready

        def failed() -> dict[str, Any] | None:
            (w,) = workers(agent)
            return w if w["last_exit"].startswith("preload failed") else None

        w = wait_for_sync(failed, WAIT, "the preload failure reported")
        assert w is not None and not w["ready"]
        assert w["state"] in ("backoff", "starting", "exited", "fatal")
        assert agent.proc is not None and agent.proc.poll() is None  # the agent carries on
    finally:
        assert agent.stop() == 0


def test_nothing_outlives_the_agent(tmp_path: Path) -> None:
    port = free_port()
    with AgentProcess(tmp_path, services(port, tmp_path / "fail")) as agent:
        family = [p.pid for p in agent.descendants()]
        assert len(family) == 3  # the template and two workers
        agent.stop(signal.SIGKILL)

    def all_gone() -> bool:
        return not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                       for pid in family)

    wait_for_sync(all_gone, WAIT, "template and workers gone with the agent")


def test_forked_workers_exit_without_the_templates_atexit_handlers(tmp_path: Path) -> None:
    port = free_port()
    ran_atexit = tmp_path / "atexit.log"
    config = services(port, tmp_path / "fail", env=f'ATEXIT_LOG = "{ran_atexit}"')
    with AgentProcess(tmp_path, config) as agent:
        (template,) = templates(agent)
        forked = set(agent.worker_pids("api"))
        assert agent.svctl("stop", "api").returncode == 0
        wait_for_sync(lambda: not agent.descendants(), WAIT, "nothing left after stop")
        exits = [e for e in agent.events() if e["type"] == "exited" and e["pid"] in forked]
        assert sorted(e["message"] for e in exits) == ["exited with code 0"] * 2
    # the handler was registered in the template: it ran there only, not in each worker
    assert ran_atexit.read_text().split() == [str(template.pid)]


def test_stop_ends_template_and_workers(tmp_path: Path) -> None:
    port = free_port()
    with AgentProcess(tmp_path, services(port, tmp_path / "fail")) as agent:
        family = agent.descendants()
        out = agent.svctl("stop", "api")
        assert out.returncode == 0, out.stderr
        wait_for_sync(lambda: not agent.descendants(), WAIT, "nothing left after stop")
        assert not any(p.is_running() for p in family)
        out = agent.svctl("start", "api")
        assert out.returncode == 0, out.stderr
        wait_for_sync(lambda: all_ready(agent, 1), WAIT, "started again")
        assert len(templates(agent)) == 1


def test_a_dead_template_is_started_again_for_the_next_worker(tmp_path: Path) -> None:
    port = free_port()
    with AgentProcess(tmp_path, services(port, tmp_path / "fail")) as agent:
        (template,) = templates(agent)
        template.kill()  # an OOM kill, say: the workers serve on
        template.wait(10)
        assert all_ready(agent, 1)
        before = set(agent.worker_pids("api"))
        victim = sorted(before)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for_sync(
            lambda: all_ready(agent, 1) and victim not in agent.worker_pids("api"),
            WAIT, "the killed worker replaced",
        )
        (fresh,) = templates(agent)
        assert fresh.pid != template.pid
        (replacement,) = set(agent.worker_pids("api")) - before
        assert psutil.Process(replacement).ppid() == agent.proc.pid  # type: ignore[union-attr]

        def from_replacement() -> dict[str, Any] | None:
            answer = ask(port)
            return answer if answer["pid"] == replacement else None

        answer = wait_for_sync(from_replacement, WAIT, "an answer from the replacement")
        assert answer is not None and answer["imported_in"] == fresh.pid


def test_stop_does_not_wait_for_a_template_still_loading(tmp_path: Path) -> None:
    """The app needs 120 s to import: stop abandons the start instead of waiting."""
    port = free_port()
    toml = services(port, tmp_path / "fail").replace(
        'env = {', 'env = { SLOW_IMPORT = "120",'
    ).replace("ready_timeout = 10", "ready_timeout = 300")
    agent = AgentProcess(tmp_path, toml)
    try:
        agent.start(wait_ready=False)
        wait_for_sync(lambda: len(agent.descendants()) == 1, WAIT, "the template loading")
        (template,) = agent.descendants()
        out = agent.svctl("stop", "api")  # svctl's own deadline (30 s) is far below 120 s
        assert out.returncode == 0, out.stderr
        wait_for_sync(lambda: not template.is_running(), WAIT, "the template gone")
        assert not agent.descendants()
        (svc,) = agent.status()["services"]
        assert svc["state"] == "stopped" and not any(w["pid"] for w in svc["workers"])
    finally:
        assert agent.stop() == 0
