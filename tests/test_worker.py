"""One worker slot with real processes: restart, backoff, fatal, stop, isolation, limits."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from pathlib import Path

import psutil
import pytest

from supervisor.environment import MAX_ENV_FILE_BYTES, read_env_file
from supervisor.events import Event, EventBus
from supervisor.spec import BackoffSpec, HealthSpec
from supervisor.states import WorkerState
from supervisor.stats import TreeSampler, WorkerStats
from supervisor.supervisor import Supervisor
from tests.programs.harness import (
    FAST_BACKOFF,
    events_of,
    http_get,
    port_of,
    running,
    worker_spec,
)
from tests.waiting import wait_for

TEST_TIMEOUT = 30


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def environ_of(pid: int) -> dict[str, str]:
    return psutil.Process(pid).environ()  # type: ignore[no-any-return]


async def test_crash_restarts_with_new_pid(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("web")
        svc = await sup.add_service(spec)
        await svc.wait_ready(10)
        worker = svc.workers[0]
        first = worker.pid
        assert (await http_get(port_of(spec)))[1] == str(first)
        os.kill(first, signal.SIGKILL)
        await wait_for(lambda: worker.ready and worker.pid != first, 10, "a new ready pid")
        assert worker.restarts == 1
        assert (await http_get(port_of(spec)))[1] == str(worker.pid)
        exited = events_of(sup.events, "exited", "web:0")
        assert exited[0].pid == first and exited[0].fields["signal"] == "SIGKILL"
        again = [e for e in events_of(sup.events, "started", "web:0") if e.fields["restart"]]
        assert again[0].pid == worker.pid
        assert worker.status().last_exit == "signal SIGKILL"


async def test_backoff_delays_grow(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("bad", "--exit-code", "1", backoff=dataclasses.replace(
            FAST_BACKOFF, first_delay=0.05, factor=2.0, max=0.4, start_limit=50))
        await sup.add_service(spec)
        await wait_for(lambda: len(events_of(sup.events, "backoff")) >= 5, 20, "5 backoffs")
        delays = [e.fields["delay"] for e in events_of(sup.events, "backoff")[:5]]
        # the first restart is immediate (no backoff event), then doubling up to max
        assert delays == [0.05, 0.1, 0.2, 0.4, 0.4]


async def test_backoff_resets_after_stable_run(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        # each run lasts 0.4 s, longer than stable_after: every restart is immediate
        spec = worker_spec("flaky", "--crash-after", "0.4", backoff=dataclasses.replace(
            FAST_BACKOFF, first_delay=5.0, stable_after=0.2))
        svc = await sup.add_service(spec)
        worker = svc.workers[0]
        await wait_for(lambda: worker.restarts >= 3, 15, "three restarts")
        assert events_of(sup.events, "backoff") == []


async def test_start_limit_fatal_then_slow_retry(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        backoff = BackoffSpec(initial=0.0, first_delay=0.01, max=0.05, jitter=0.0,
                              start_limit=3, fatal_retry=0.5, stable_after=5.0)
        svc = await sup.add_service(worker_spec("bad", "--exit-code", "2", backoff=backoff))
        worker = svc.workers[0]
        await wait_for(lambda: worker.state is WorkerState.FATAL, 10, "fatal")
        fatal = events_of(sup.events, "fatal")[0]
        assert "start limit" in fatal.message and fatal.fields["retry_in"] == 0.5
        assert svc.status().state == "fatal"
        restarts = worker.restarts
        assert restarts == 2  # three quick failures: the first start and two restarts
        # the slow retry happens, fails quickly, and is fatal again at once
        await wait_for(lambda: len(events_of(sup.events, "fatal")) >= 2, 10, "second fatal")
        assert worker.restarts == restarts + 1
        # an explicit start retries at once
        await svc.start()
        await wait_for(lambda: worker.restarts >= restarts + 2, 5, "start retries at once")


async def test_exit_78_is_fatal_at_once(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        svc = await sup.add_service(worker_spec("cfg", "--exit-code", "78"))
        worker = svc.workers[0]
        await wait_for(lambda: worker.state is WorkerState.FATAL, 10, "fatal")
        assert worker.restarts == 0
        assert "EX_CONFIG" in events_of(sup.events, "fatal")[0].message
        assert events_of(sup.events, "backoff") == []
        # stopping a slot that has no process: `stopped`, not a second `exited` of the pid
        (exited,) = events_of(sup.events, "exited", "cfg:0")
        assert (exited.fields["code"], exited.fields["signal"]) == (78, None)  # null, not ""
        await svc.stop()
        assert len(events_of(sup.events, "exited", "cfg:0")) == 1
        assert len(events_of(sup.events, "stopped", "cfg:0")) == 1


async def test_restart_policies(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        never = await sup.add_service(worker_spec("never", "--exit-code", "1", restart="never"))
        clean = await sup.add_service(
            worker_spec("clean", "--exit-code", "0", restart="on-failure"))
        failing = await sup.add_service(
            worker_spec("failing", "--exit-code", "3", restart="on-failure"))
        await wait_for(lambda: not never.workers[0].supervising, 10, "never: done")
        await wait_for(lambda: not clean.workers[0].supervising, 10, "on-failure 0: done")
        await wait_for(lambda: failing.workers[0].restarts >= 2, 10, "on-failure 3: restarts")
        assert never.workers[0].state is WorkerState.EXITED
        assert never.workers[0].restarts == 0 and clean.workers[0].restarts == 0
        assert never.status().state == "stopped"


@pytest.mark.parametrize(("sig", "restarted"), [(signal.SIGTERM, False), (signal.SIGKILL, True)])
async def test_on_failure_treats_the_clean_signals_as_systemd_does(
    tmp_path: Path, sig: signal.Signals, restarted: bool
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("sleeper", restart="on-failure", ready="started",
                           command=("sleep", "60"))
        svc = await sup.add_service(spec)
        await svc.wait_ready(10)
        worker = svc.workers[0]
        os.kill(worker.pid, sig)  # from outside, not a stop the agent asked for
        if restarted:
            await wait_for(lambda: worker.restarts == 1, 10, "restart after SIGKILL")
        else:
            await wait_for(lambda: not worker.supervising, 10, "a clean end after SIGTERM")
            assert worker.restarts == 0 and worker.state is WorkerState.EXITED


async def test_sigterm_ignored_gets_sigkill(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        svc = await sup.add_service(
            worker_spec("stubborn", "--ignore-term", graceful_timeout=0.5))
        await svc.wait_ready(10)
        pid = svc.workers[0].pid
        await svc.stop()
        assert gone(pid)
        exited = events_of(sup.events, "exited", "stubborn:0")[-1]
        assert exited.fields["signal"] == "SIGKILL" and exited.fields["expected"]
        assert any(e.fields.get("kill") for e in events_of(sup.events, "stopping"))
        assert svc.status().state == "stopped"


async def test_a_stopped_worker_is_woken_to_drain_not_killed(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        svc = await sup.add_service(worker_spec("frozen", graceful_timeout=30))
        await svc.wait_ready(10)
        pid = svc.workers[0].pid
        os.kill(pid, signal.SIGSTOP)
        await svc.stop()
        assert gone(pid)
        exited = events_of(sup.events, "exited", "frozen:0")[-1]
        assert exited.fields.get("signal") != "SIGKILL"  # SIGCONT let it act on SIGTERM
        assert not any(e.fields.get("kill") for e in events_of(sup.events, "stopping"))


async def test_socket_survives_restart_client_is_queued(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("web")
        svc = await sup.add_service(spec)
        await svc.wait_ready(10)
        old = svc.workers[0].pid
        await svc.stop()
        assert not any(w.pid for w in svc.workers)
        # nobody accepts now: the agent's socket queues the client instead of refusing it
        pending = asyncio.create_task(http_get(port_of(spec)))
        await asyncio.sleep(0)  # let it connect while no worker runs
        await svc.start()
        status, body = await pending
        assert status == 200 and int(body) != old


def exec_env(pid: int) -> dict[str, str]:
    """The environment of `pid` once the trampoline exec'd the worker (else {})."""
    env = environ_of(pid)
    return env if "LISTEN_PID" in env else {}


async def test_worker_cannot_send_ready_for_another(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent_own = "/tmp/agent-own-notify-socket"
    monkeypatch.setenv("NOTIFY_SOCKET", agent_own)  # the agent's own: must not leak
    monkeypatch.setenv("WATCHDOG_USEC", "1000")
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        victim = await sup.add_service(worker_spec("victim", "--never-ready"))
        vworker = victim.workers[0]
        await wait_for(lambda: vworker.pid, 5, "victim pid")
        victim_env = await wait_for(lambda: exec_env(vworker.pid), 5, "victim env")
        path = victim_env["NOTIFY_SOCKET"]
        assert path != agent_own and "WATCHDOG_USEC" not in victim_env
        assert victim_env["SVCD_SERVICE"] == "victim" and victim_env["SVCD_WORKER"] == "0"
        graceful = victim.spec.graceful_timeout
        assert 0 < float(victim_env["SVCD_DRAIN_TIMEOUT"]) < graceful  # drains before SIGKILL
        liar = await sup.add_service(worker_spec("liar", "--notify-to", path))
        lworker = liar.workers[0]
        await wait_for(lambda: lworker.pid, 5, "liar pid")
        liar_env = await wait_for(lambda: exec_env(lworker.pid), 5, "liar env")
        assert liar_env["NOTIFY_SOCKET"] not in (path, agent_own)
        # the liar's READY=1 reaches the victim's socket and is refused there
        refused = f"ignoring a notify message from pid {lworker.pid}"
        await wait_for(lambda: refused in caplog.text, 10, "the refused READY=1")
        assert vworker.state is WorkerState.STARTING and not vworker.ready
        assert lworker.state is WorkerState.STARTING


async def test_whole_group_killed_when_worker_forked(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        svc = await sup.add_service(worker_spec("forker", "--fork-child"))
        await svc.wait_ready(10)
        worker = svc.workers[0]
        child = int(await wait_for(lambda: worker.status_text.partition("=")[2], 5, "child"))
        assert psutil.pid_exists(child)
        # the main process dies: its helper (which ignores SIGTERM) goes with it
        os.kill(worker.pid, signal.SIGKILL)
        await wait_for(lambda: gone(child), 5, "forked child gone")
        await wait_for(lambda: worker.ready, 10, "replacement ready")
        child2 = int(await wait_for(
            lambda: worker.status_text.partition("=")[2] != str(child)
            and worker.status_text.partition("=")[2], 5, "second child"))
        # a graceful stop also ends the helper
        await svc.stop()
        assert gone(child2)


async def test_not_ready_in_time_is_replaced(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        svc = await sup.add_service(worker_spec("slow", "--never-ready", ready_timeout=0.3))
        worker = svc.workers[0]
        await wait_for(lambda: worker.restarts >= 2, 10, "replacements")
        stopping = events_of(sup.events, "stopping", "slow:0")
        assert "not ready within 0.3s" in stopping[0].message


async def test_ready_started_mode(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        svc = await sup.add_service(worker_spec("s", "--never-ready", ready="started"))
        await svc.wait_ready(5)


async def test_watchdog_missed_replaces(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        good = await sup.add_service(worker_spec("good", watchdog=0.3))
        bad = await sup.add_service(worker_spec("mute", "--no-watchdog", watchdog=0.3))
        await good.wait_ready(10)
        env = await wait_for(lambda: exec_env(good.workers[0].pid), 5, "env")
        assert env["WATCHDOG_USEC"] == "300000"
        await wait_for(lambda: bad.workers[0].restarts >= 1, 10, "watchdog replacement")
        assert "watchdog" in events_of(sup.events, "stopping", "mute:0")[0].message
        assert good.workers[0].restarts == 0


async def test_max_memory_replaces_gracefully(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        svc = await sup.add_service(
            worker_spec("fat", "--alloc-mb", "80", max_memory=40 * 1024 * 1024))
        worker = svc.workers[0]
        await svc.wait_ready(10)
        first = worker.pid
        await wait_for(lambda: events_of(sup.events, "oom"), 15, "oom event")
        oom = events_of(sup.events, "oom")[0]
        assert oom.pid == first and "max_memory" in oom.message
        await wait_for(lambda: worker.pid != first and worker.ready, 10, "replacement")
        exited = next(e for e in events_of(sup.events, "exited") if e.pid == first)
        assert exited.fields["code"] == 0  # drained with SIGTERM, not killed


async def test_a_ready_worker_has_its_memory_sampled_already(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        svc = await sup.add_service(worker_spec("web"))
        await svc.wait_ready(10)
        assert svc.workers[0].status().rss_bytes > 1e6  # not 0 until the first interval


async def test_stats_from_psutil_and_reports(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("web")
        svc = await sup.add_service(spec)
        await svc.wait_ready(10)
        for _ in range(5):
            await http_get(port_of(spec))
        worker = svc.workers[0]
        await wait_for(lambda: worker.status().requests >= 5, 5, "requests reported")
        await wait_for(lambda: worker.status().rss_bytes > 1e6, 5, "rss sampled")
        status = worker.status()
        assert status.num_threads >= 1 and status.num_fds >= 3 and status.uptime_s > 0


def health(**kw: object) -> HealthSpec:
    base = HealthSpec(kind="http", path="/healthz", interval=0.1, timeout=1.0, rise=1, fall=2)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


async def test_health_failure_restarts(tmp_path: Path) -> None:
    flag = tmp_path / "fail"
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        svc = await sup.add_service(
            worker_spec("h", "--health-fail-file", str(flag), health=health()))
        await svc.wait_ready(10)
        worker = svc.workers[0]
        env = await wait_for(lambda: exec_env(worker.pid), 5, "env")
        assert env["LISTEN_FDNAMES"] == "h:svcd-health" and env["LISTEN_FDS"] == "2"
        await wait_for(lambda: worker.health == "passing", 5, "passing")
        first = worker.pid
        flag.touch()
        await wait_for(lambda: worker.pid != first, 10, "replaced")
        assert "health check failing" in events_of(sup.events, "stopping", "h:0")[0].message
        assert events_of(sup.events, "unhealthy", "h:0")


async def test_failing_checks_replace_a_worker_but_never_make_it_fatal(tmp_path: Path) -> None:
    """A shared dependency down: every replacement is paced by the backoff, but a worker
    that started fine is not a failed start, so the slot never gives up, and it serves
    again as soon as its check passes."""
    flag = tmp_path / "fail"
    flag.touch()
    limit = 3
    backoff = dataclasses.replace(FAST_BACKOFF, start_limit=limit, max=0.2)
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        svc = await sup.add_service(worker_spec(
            "h", "--health-fail-file", str(flag), health=health(), backoff=backoff))

        def replaced() -> int:
            return sum("health check failing" in e.message
                       for e in events_of(sup.events, "stopping", "h:0"))

        await wait_for(lambda: replaced() > limit + 1, 30, "replacements beyond start_limit")
        assert not events_of(sup.events, "fatal", "h:0")
        flag.unlink()
        worker = svc.workers[0]
        await wait_for(lambda: worker.health == "passing" and worker.ready, 15, "serving again")


async def test_health_failure_unready_then_ready(tmp_path: Path) -> None:
    flag = tmp_path / "fail"
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        svc = await sup.add_service(worker_spec(
            "u", "--health-fail-file", str(flag), health=health(on_failure="unready")))
        await svc.wait_ready(10)
        worker = svc.workers[0]
        pid = worker.pid
        await wait_for(lambda: worker.health == "passing", 5, "passing")
        flag.touch()
        await wait_for(lambda: not worker.ready, 5, "unready")
        assert worker.state is WorkerState.RUNNING and worker.pid == pid
        service = svc.status()  # running short of ready workers, not "starting"
        assert (service.state, service.ready) == ("running", 0)
        flag.unlink()
        await wait_for(lambda: worker.ready, 5, "ready again")
        assert worker.pid == pid and worker.restarts == 0


async def test_ready_by_health(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        svc = await sup.add_service(
            worker_spec("rh", "--never-ready", ready="health", health=health(rise=3)))
        await svc.wait_ready(10)
        ready = events_of(sup.events, "ready", "rh:0")[0]
        assert ready.message == "first passing health check"


async def test_spawn_failure_is_fatal_not_a_crash_of_the_agent(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("nouser", user="no-such-user-svcd")
        svc = await sup.add_service(spec)
        await wait_for(lambda: svc.workers[0].state is WorkerState.FATAL, 5, "fatal")
        assert "unknown user" in events_of(sup.events, "fatal")[0].message
        missing = await sup.add_service(
            dataclasses.replace(worker_spec("missing"), command=("/nonexistent/x",)))
        await wait_for(lambda: missing.workers[0].restarts >= 1, 5, "exec failure restarts")


def _types(events: list[Event]) -> list[str]:
    return [e.type for e in events]


async def test_every_state_change_is_an_event(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        svc = await sup.add_service(worker_spec("web"))
        await svc.wait_ready(10)
        await svc.stop()
        mine = [e for e in sup.events.history() if e.worker == "web:0"]
        assert _types(mine) == ["started", "ready", "stopping", "exited", "stopped"]
        assert [e.fields["state"] for e in mine[:4]] == [
            "starting", "running", "stopping", "exited"]


@pytest.mark.parametrize("sig", ["SIGINT", "INT"])
async def test_stop_signal_by_name(tmp_path: Path, sig: str) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        svc = await sup.add_service(worker_spec("web", stop_signal=sig, graceful_timeout=3))
        await svc.wait_ready(10)
        await svc.stop()
        # the test worker does not handle SIGINT: Python raises KeyboardInterrupt
        exited = events_of(sup.events, "exited", "web:0")[-1]
        assert exited.fields["code"] != 0 or exited.fields["signal"] == "SIGINT"


async def test_supervisor_fixture_closes(tmp_path: Path) -> None:
    sup_events = EventBus()
    sup = Supervisor(sup_events, tmp_path / "logs")
    await sup.start()
    svc = await sup.add_service(worker_spec("web", count=2))
    await svc.wait_ready(10)
    pids = [w.pid for w in svc.workers]
    await sup.close()
    await sup.close_reaper()
    assert all(gone(p) for p in pids)
    assert events_of(sup_events, "stopped")


async def test_deregister_delay_keeps_serving_while_stopping(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("web", deregister_delay=2.0)
        svc = await sup.add_service(spec)
        await svc.wait_ready(10)
        worker = svc.workers[0]
        pid = worker.pid
        stopping = asyncio.create_task(svc.stop())
        await wait_for(lambda: worker.state is WorkerState.STOPPING, 5, "stopping")
        assert not worker.ready  # the registry has dropped it already...
        status, body = await http_get(port_of(spec))
        assert (status, body) == (200, str(pid))  # ...but it still serves until signalled
        await stopping
        assert gone(pid)


def test_stats_reports_and_qps() -> None:
    stats = WorkerStats()
    stats.apply_report({"connections": 3, "requests": 100}, now=10.0)
    assert (stats.connections, stats.requests, stats.qps) == (3, 100, 0.0)
    stats.apply_report({"requests": 150}, now=10.5)  # under the window: qps unchanged
    assert stats.qps == 0.0
    stats.apply_report(
        {"requests": 300, "send_fail": 2, "timers": 4, "bytes": {"in": 10, "out": 20},
         "metrics": [{"name": "jobs", "type": "counter", "value": 5}, "junk"]},
        now=12.0,
    )
    assert stats.qps == 100.0
    assert (stats.send_fail, stats.timers, stats.bytes_in, stats.bytes_out) == (2, 4, 10, 20)
    assert stats.metrics == [{"name": "jobs", "type": "counter", "value": 5}]
    stats.apply_report({"requests": 5, "connections": "bad"}, now=13.0)  # counter restarted
    assert stats.requests == 5 and stats.connections == 0
    stats.apply_report(
        {"connections": float("inf"), "requests": 10**30,
         "metrics": [{"name": "big", "value": 10**400}, {"name": "nan", "value": float("nan")},
                     {"name": 1, "value": 1}, {"name": "ok", "value": 1.5}]},
        now=14.0,
    )
    assert stats.connections == 0 and stats.requests == 0
    assert stats.metrics == [{"name": "ok", "value": 1.5}]


def test_tree_sampler_sums_children() -> None:
    clock = [100.0]
    sampler = TreeSampler(os.getpid(), clock=lambda: clock[0])
    first = sampler.sample()
    assert first is not None and first.rss_bytes > 0 and first.processes >= 1
    clock[0] += 1.0
    second = sampler.sample()
    assert second is not None and second.cpu_seconds >= first.cpu_seconds
    assert TreeSampler(2**22 + 12345).sample() is None  # no such process


async def test_health_judges_a_notify_worker_once_it_is_ready(tmp_path: Path) -> None:
    flag = tmp_path / "fail"
    flag.touch()
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        svc = await sup.add_service(worker_spec(
            "late", "--health-fail-file", str(flag), "--ready-delay", "1.0",
            health=health(on_failure="unready")))
        worker = svc.workers[0]
        await wait_for(lambda: worker.state is WorkerState.RUNNING, 10, "READY=1")
        assert worker.health == "unknown"  # nothing was counted while it was loading
        await wait_for(lambda: worker.health == "failing", 10, "failing once running")
        await wait_for(lambda: not worker.ready, 10, "unready")
        assert "health check failing" in events_of(sup.events, "unready", "late:0")[0].message
        flag.unlink()
        await wait_for(lambda: worker.ready, 5, "ready once passing")


# ---------------------------------------------------------------- env_file


def test_read_env_file_parses_systemd_style_lines(tmp_path: Path) -> None:
    path = tmp_path / "app.env"
    path.write_text("# comment\n; comment\nA=1\r\nexport B = 'two words'\nC=\"x\"\n\n")
    link = tmp_path / "link.env"
    link.symlink_to(path)  # a link to an env file is normal: followed
    assert read_env_file(str(link)) == {"A": "1", "B": "two words", "C": "x"}
    path.write_text("A=1\nnot a pair\n")
    with pytest.raises(ValueError, match=r"app\.env:2: not KEY=VALUE"):
        read_env_file(str(path))
    path.write_bytes(b"A=\xff\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_env_file(str(path))


def test_read_env_file_refuses_what_is_not_a_small_regular_file(tmp_path: Path) -> None:
    """A FIFO would hang the agent's loop, /dev/zero would fill its memory."""
    fifo = tmp_path / "fifo.env"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero", str(tmp_path)):
        with pytest.raises(ValueError, match="not a regular file"):
            read_env_file(path)
    at_limit = tmp_path / "at-limit.env"
    at_limit.write_bytes(b"A=" + b"x" * (MAX_ENV_FILE_BYTES - 3) + b"\n")
    assert len(read_env_file(str(at_limit))["A"]) == MAX_ENV_FILE_BYTES - 3
    too_big = tmp_path / "big.env"
    too_big.write_bytes(b"A=" + b"x" * MAX_ENV_FILE_BYTES)
    with pytest.raises(ValueError, match="larger than"):
        read_env_file(str(too_big))


async def test_an_env_file_that_is_a_fifo_fails_the_spawn_not_the_agent(tmp_path: Path) -> None:
    fifo = tmp_path / "app.env"
    os.mkfifo(fifo)
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        svc = await sup.add_service(worker_spec("fifo", env_file=str(fifo)))
        worker = svc.workers[0]
        await wait_for(lambda: worker.state is WorkerState.FATAL, 5, "fatal")
        assert "not a regular file" in events_of(sup.events, "fatal", "fifo:0")[0].message
        ok = await sup.add_service(worker_spec("ok"))  # the loop is free: others start
        await ok.wait_ready(10)
