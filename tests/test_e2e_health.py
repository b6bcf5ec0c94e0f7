"""End to end, issue 5: health checks, liveness vs readiness and probes, through a real svcd.

Each test starts `svcd --config FILE` (tests/agent_proc.py) with misbehaving workers and
looks only from outside, as an operator or a kubelet would: `svctl status/events/probe`,
and the stock grpc.health.v1 client (grpcio-health-checking) on `probe_address`. The
unit tests (test_health.py, test_worker.py, test_control.py) cover each piece alone;
these check that the config reaches the pieces and that the pieces agree.

Timing bounds are measured from the agent's own event timestamps (`svctl events
--json`), with an explicit slack for a loaded 2-core machine (spawning Python there
takes up to a second); waits use deadlines, never fixed sleeps.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent._pb import agent_pb2 as pb
from tests.agent_proc import (
    ROOT,
    AgentProcess,
    agent_status,
    argv,
    running,
    svctl,
    worker_command,
    worker_pids,
)
from tests.conftest import free_port
from tests.waiting import GiveUp, wait_for_sync

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PROGRAMS = ROOT / "tests" / "programs"
SILENT_WORKER = PROGRAMS / "silent_worker.py"
PER_WORKER = PROGRAMS / "per_worker.py"
HTTP_WORKER = PROGRAMS / "http_worker.py"

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
#: Per-RPC bound of the health client.
RPC_TIMEOUT = 20.0
#: Scheduling slack on a loaded 2-core machine, added to every computed bound: one
#: Python spawn (import + bind) plus the agent's loop latency under load.
SLACK = 3.0
#: Generous deadline for conditions that need a worker (re)spawned and ready.
WAIT = 30.0
#: Health settings shared by the tests (seconds / counts): fast, yet a timeout long
#: enough that a healthy worker does not fail three in a row on a loaded machine.
INTERVAL = 1.0
TIMEOUT = 0.8
FALL = 3
RISE = 2
START_PERIOD = 20.0


def health_table(service: str, **overrides: Any) -> str:
    settings: dict[str, Any] = {
        "kind": "http",
        "path": "/healthz",
        "interval": INTERVAL,
        "timeout": TIMEOUT,
        "rise": RISE,
        "fall": FALL,
        # the grace ends at the first passing check: only start-up is protected
        "start_period": START_PERIOD,
    }
    settings.update(overrides)
    lines = [f"[services.{service}.health]"] + [
        f"{key} = {json.dumps(value)}" for key, value in settings.items()
    ]
    return "\n".join(lines) + "\n"


def wait_events(
    agent: AgentProcess, done: Callable[[list[dict[str, Any]]], bool], what: str
) -> list[dict[str, Any]]:
    """The event history once `done(history)` holds (within WAIT seconds)."""
    seen: list[list[dict[str, Any]]] = []

    def holds() -> bool:
        seen[:] = [agent.events()]
        return done(seen[0])

    wait_for_sync(holds, WAIT, what)
    return seen[0]


def count(evts: list[dict[str, Any]], kind: str, name: str) -> int:
    return sum(1 for e in evts if e["type"] == kind and e["worker"] == name)


def restarts(evts: list[dict[str, Any]], name: str) -> int:
    """`started` events of a slot's later processes (its first start excluded)."""
    return sum(1 for e in evts if e["type"] == "started" and e["worker"] == name
               and e.get("restart"))


def worker(agent: AgentProcess, service: str, name: str) -> dict[str, Any]:
    for svc in agent_status(agent)["services"]:
        if svc["name"] == service:
            for w in svc["workers"]:
                if w["worker"] == name:
                    return w  # type: ignore[no-any-return]
    raise KeyError(name)


def service_status(agent: AgentProcess, service: str) -> dict[str, Any]:
    for svc in agent_status(agent)["services"]:
        if svc["name"] == service:
            return svc  # type: ignore[no-any-return]
    raise KeyError(service)


def first(evts: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    for e in evts:
        if all(e.get(k) == v for k, v in match.items()):
            return e
    raise AssertionError(f"no event {match} in {[(e['type'], e['worker']) for e in evts]}")


def probe(agent: AgentProcess, *args: str) -> int:
    return svctl(agent, "probe", *args).returncode


def check(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
    return int(reply.status)


class Watcher:
    """A grpc.health.v1 Watch stream read by a thread: every status it delivered, in order."""

    def __init__(self, channel: grpc.Channel, service: str) -> None:
        self.service = service
        self.seen: list[int] = []
        self._call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service)
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for reply in self._call:
                self.seen.append(int(reply.status))

    def wait_last(self, status: int, what: str) -> None:
        wait_for_sync(lambda: self.seen and self.seen[-1] == status, WAIT, what)

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(RPC_TIMEOUT)


# ---------------------------------------------------------------- http check, replaced


def test_worker_that_accepts_but_never_answers_is_replaced_within_the_bound(
    tmp_path: Path,
) -> None:
    """Worker 1 stops answering on its svcd-health socket (it still accepts); worker 0
    is healthy on the same shared port. Only worker 1 is replaced, within interval x
    fall + timeout of going quiet (the check runs against each worker alone)."""
    port = free_port()
    quiet = tmp_path / "quiet"
    services = f"""
[services.api]
command = {argv(SILENT_WORKER, "--only-worker", "1", "--silent-file", str(quiet))}
count = 2
listen = ["tcp://127.0.0.1:{port}"]
graceful_timeout = 5
{health_table("api")}
"""
    bound = INTERVAL * FALL + TIMEOUT
    with running(tmp_path, services) as agent:
        wait_for_sync(
            lambda: all(w["health"] == "passing" for w in service_status(agent, "api")["workers"]),
            WAIT, "both workers passing",
        )
        pid = worker(agent, "api", "api:1")["pid"]
        went_quiet = time.time()
        quiet.touch()

        evts = wait_events(agent, lambda e: restarts(e, "api:1") >= 1, "api:1 replaced")
        unhealthy = first(evts, type="unhealthy", worker="api:1", pid=pid)
        stopping = first(evts, type="stopping", worker="api:1", pid=pid)
        exited = first(evts, type="exited", worker="api:1", pid=pid)
        restarted = first(evts, type="started", worker="api:1", restart=True)
        detected = unhealthy["time"] - went_quiet
        replacement = restarted["time"] - went_quiet
        print(f"bound {bound:.2f}s: unhealthy after {detected:.2f}s, "
              f"replacement spawned after {replacement:.2f}s")
        assert "timeout" in unhealthy["message"], unhealthy
        assert "health check failing" in stopping["message"], stopping
        assert exited["expected"] is True and exited["code"] == 0, exited
        assert restarted["pid"] != pid
        assert detected <= bound + SLACK, (detected, bound)
        assert replacement <= bound + SLACK, (replacement, bound)
        assert unhealthy["time"] <= exited["time"] <= restarted["time"]

        # the healthy worker on the same port was never touched
        healthy = worker(agent, "api", "api:0")
        assert healthy["restarts"] == 0 and healthy["state"] == "running", healthy
        assert healthy["health"] == "passing", healthy
        assert not any(e["worker"] == "api:0" and e["type"] in ("unhealthy", "exited")
                       for e in agent.events())


# ---------------------------------------------------------------- on_failure = "unready"


def test_unready_check_takes_the_worker_out_of_readiness_and_never_restarts_it(
    tmp_path: Path,
) -> None:
    """on_failure = "unready": the failing worker leaves readiness (status, svctl probe,
    grpc health per service with min_ready = count) but keeps its pid, and is ready again
    once `rise` checks pass. A service with min_ready = 1 stays ready meanwhile."""
    probe_port = free_port()
    flag = str(tmp_path / "fail-{service}-{worker}")
    command = argv(PER_WORKER, str(HTTP_WORKER), "--health-fail-file", flag)
    services = ""
    for name, min_ready in (("strict", None), ("relaxed", 1)):
        services += f"""
[services.{name}]
command = {command}
count = 2
listen = ["tcp://127.0.0.1:{free_port()}"]
graceful_timeout = 5
{"" if min_ready is None else f"min_ready = {min_ready}"}
{health_table(name, on_failure="unready")}
"""
    extra = f'probe_address = "127.0.0.1:{probe_port}"'
    with running(tmp_path, services, extra) as agent, grpc.insecure_channel(
        f"127.0.0.1:{probe_port}"
    ) as channel:
        for name in ("strict", "relaxed"):
            wait_for_sync(
                lambda n=name: all(  # type: ignore[misc]
                    w["health"] == "passing" for w in service_status(agent, n)["workers"]
                ),
                WAIT, f"{name} passing",
            )
        pids = {n: worker_pids(agent, n) for n in ("strict", "relaxed")}
        for name in ("strict", "relaxed"):
            (tmp_path / f"fail-{name}-1").touch()

        def out_of_rotation() -> bool:
            return all(
                not worker(agent, n, f"{n}:1")["ready"]
                and worker(agent, n, f"{n}:1")["health"] == "failing"
                for n in ("strict", "relaxed")
            )

        wait_for_sync(out_of_rotation, WAIT, "worker 1 of each service unready")
        w1 = worker(agent, "strict", "strict:1")
        assert w1["state"] == "running" and "HTTP 500" in w1["health_reason"], w1
        strict, relaxed = service_status(agent, "strict"), service_status(agent, "relaxed")
        assert (strict["ready"], relaxed["ready"]) == (1, 1)
        assert probe(agent, "ready", "strict") == 1
        assert probe(agent, "ready", "relaxed") == 0
        assert probe(agent, "ready") == 1
        assert probe(agent, "live") == 0
        wait_for_sync(lambda: check(channel, "strict") == NOT_SERVING, WAIT, "strict NOT_SERVING")
        assert check(channel, "readiness") == NOT_SERVING
        assert check(channel, "relaxed") == SERVING
        assert check(channel, "liveness") == SERVING and check(channel, "") == SERVING

        # kept running: several times fall x interval later, same pids, no restart
        since = time.monotonic()
        hold = 2 * FALL * INTERVAL

        def held() -> bool:
            for n in ("strict", "relaxed"):
                if worker_pids(agent, n) != pids[n]:
                    raise GiveUp(f"{n} restarted: {pids[n]} -> {worker_pids(agent, n)}")
            return time.monotonic() - since >= hold

        wait_for_sync(held, hold + WAIT, "unready workers kept running")
        evts = agent.events()
        assert not [e for e in evts if (e["type"] in ("stopping", "exited") or e.get("restart"))
                    and e["service"] in ("strict", "relaxed")], "an unready worker was stopped"
        assert all(w["restarts"] == 0 for n in ("strict", "relaxed")
                   for w in service_status(agent, n)["workers"])

        # back after `rise` passing checks
        for name in ("strict", "relaxed"):
            (tmp_path / f"fail-{name}-1").unlink()
        cleared = time.time()
        wait_for_sync(lambda: probe(agent, "ready", "strict") == 0, WAIT, "strict ready again")
        wait_for_sync(lambda: check(channel, "strict") == SERVING, WAIT, "strict SERVING")
        wait_for_sync(lambda: check(channel, "readiness") == SERVING, WAIT, "readiness SERVING")
        assert probe(agent, "ready") == 0
        assert {n: worker_pids(agent, n) for n in pids} == pids
        evts = agent.events()
        mine = [e for e in evts if e["worker"] == "strict:1"]
        kinds = [e["type"] for e in mine]
        order = [kinds.index("unhealthy"), kinds.index("unready")]
        back = next(i for i, e in enumerate(mine) if e["type"] == "ready" and i > order[1])
        assert order == sorted(order) and kinds.index("healthy", order[1]) < back
        came_back = mine[back]["time"] - cleared
        print(f"ready again {came_back:.2f}s after the check started passing")
        assert came_back <= RISE * INTERVAL + TIMEOUT + SLACK


# ---------------------------------------------------------------- watchdog and max_memory


def test_a_worker_that_stops_sending_watchdog_is_replaced(tmp_path: Path) -> None:
    """`watchdog = 1`: the worker that never pings is replaced within the watchdog period
    of becoming ready; the one that pings (WATCHDOG_USEC reached it) is left alone."""
    watchdog = 1.0
    services = f"""
[services.mute]
command = {worker_command("--no-watchdog")}
watchdog = {watchdog}
graceful_timeout = 5

[services.pinging]
command = {worker_command()}
watchdog = {watchdog}
graceful_timeout = 5
"""
    with running(tmp_path, services, wait_ready=False) as agent:
        evts = wait_events(
            agent, lambda e: restarts(e, "mute:0") >= 2, "mute:0 replaced twice"
        )
        ready = first(evts, type="ready", worker="mute:0")
        pid = ready["pid"]
        unhealthy = first(evts, type="unhealthy", worker="mute:0", pid=pid)
        exited = first(evts, type="exited", worker="mute:0", pid=pid)
        restarted = first(evts, type="started", worker="mute:0", restart=True)
        assert "WATCHDOG" in unhealthy["message"], unhealthy
        assert exited["expected"] is True and exited["code"] == 0, exited  # graceful
        assert restarted["pid"] != pid
        late = unhealthy["time"] - ready["time"]
        print(f"watchdog {watchdog}s: declared missing {late:.2f}s after ready")
        assert watchdog <= late + 0.05 and late <= watchdog + SLACK

        pinging = worker(agent, "pinging", "pinging:0")
        assert pinging["restarts"] == 0 and pinging["state"] == "running", pinging
        assert not any(e["worker"] == "pinging:0" and e["type"] in ("unhealthy", "exited")
                       for e in agent.events())


def test_max_memory_replaces_the_worker_gracefully(tmp_path: Path) -> None:
    """RSS above max_memory for a few samples: an `oom` event with the figures, a
    graceful stop (SIGTERM, exit 0) and a new process; a lean worker under the same
    limit is left alone."""
    limit_mib = 64
    services = f"""
[services.hog]
command = {worker_command("--alloc-mb", "128")}
max_memory = "{limit_mib}MiB"
graceful_timeout = 5

[services.lean]
command = {worker_command()}
max_memory = "{limit_mib}MiB"
graceful_timeout = 5
"""
    with running(tmp_path, services, wait_ready=False) as agent:
        evts = wait_events(agent, lambda e: restarts(e, "hog:0") >= 1, "hog:0 replaced")
        pid = first(evts, type="started", worker="hog:0")["pid"]
        oom = first(evts, type="oom", worker="hog:0", pid=pid)
        assert oom["max_memory"] == limit_mib * 1024 * 1024
        assert oom["rss_bytes"] > oom["max_memory"], oom
        stopping = first(evts, type="stopping", worker="hog:0", pid=pid)
        assert "max_memory" in stopping["message"], stopping
        exited = first(evts, type="exited", worker="hog:0", pid=pid)
        assert exited["expected"] is True and exited["code"] == 0, exited  # SIGTERM, drained
        assert first(evts, type="started", worker="hog:0", restart=True)["pid"] != pid
        lean = worker(agent, "lean", "lean:0")
        assert lean["restarts"] == 0 and lean["state"] == "running", lean


def test_max_memory_reason_shows_in_status(tmp_path: Path) -> None:
    services = f"""
[services.hog]
command = {worker_command("--alloc-mb", "128")}
max_memory = "64MiB"
graceful_timeout = 5
"""
    with running(tmp_path, services, wait_ready=False) as agent:
        wait_for_sync(lambda: worker(agent, "hog", "hog:0")["restarts"] >= 1, WAIT, "replaced")
        shown = json.dumps(worker(agent, "hog", "hog:0"))
        table = svctl(agent, "status", "hog").stdout
        assert "max_memory" in shown, shown
        assert "max_memory" in table, table


# ---------------------------------------------------------------- grpc health and probes


def test_stock_grpc_health_client_on_the_probe_port(tmp_path: Path) -> None:
    """Check and Watch on probe_address follow `svctl stop/start`; liveness stays SERVING
    while every worker of every service fails its health check (and gets replaced);
    svctl probe exit codes agree; the probe port serves no svcd.v1.Agent."""
    probe_port = free_port()
    sick = tmp_path / "all-sick"
    # a sick worker never passes: its grace (start_period) ends by time, then fall counts
    fast = {"interval": 0.5, "timeout": 0.45, "rise": 1, "fall": 2, "start_period": 2}
    services = f"""
[services.api]
command = {worker_command("--health-fail-file", str(sick))}
count = 2
listen = ["tcp://127.0.0.1:{free_port()}"]
graceful_timeout = 5
[services.api.backoff]
max = 0.5
{health_table("api", **fast)}
[services.web]
command = {worker_command("--health-fail-file", str(sick))}
listen = ["tcp://127.0.0.1:{free_port()}"]
graceful_timeout = 5
[services.web.backoff]
max = 0.5
{health_table("web", **fast)}
"""
    extra = f'probe_address = "127.0.0.1:{probe_port}"'
    watchers: list[Watcher] = []
    with running(tmp_path, services, extra) as agent, grpc.insecure_channel(
        f"127.0.0.1:{probe_port}"
    ) as channel:
        try:
            for name in ("", "liveness", "readiness", "api", "web"):
                assert check(channel, name) == SERVING, name
            watch = {name: Watcher(channel, name) for name in ("liveness", "readiness", "api")}
            watchers.extend(watch.values())
            for w in watch.values():
                w.wait_last(SERVING, f"Watch {w.service!r} starts SERVING")
            assert probe(agent, "live") == 0 and probe(agent, "ready") == 0
            assert probe(agent, "ready", "api") == 0 and probe(agent, "ready", "nope") == 2

            # stop: the service and readiness flip, liveness and the other service do not
            assert svctl(agent, "stop", "api").returncode == 0
            watch["api"].wait_last(NOT_SERVING, "Watch api NOT_SERVING after stop")
            watch["readiness"].wait_last(NOT_SERVING, "Watch readiness NOT_SERVING")
            assert check(channel, "api") == NOT_SERVING
            assert check(channel, "readiness") == NOT_SERVING
            assert check(channel, "web") == SERVING and check(channel, "liveness") == SERVING
            assert probe(agent, "ready", "api") == 1 and probe(agent, "ready") == 1
            assert probe(agent, "ready", "web") == 0 and probe(agent, "live") == 0

            # start: back to SERVING, through Check and Watch
            assert svctl(agent, "start", "api").returncode == 0
            watch["api"].wait_last(SERVING, "Watch api SERVING after start")
            watch["readiness"].wait_last(SERVING, "Watch readiness SERVING after start")
            assert check(channel, "api") == SERVING and check(channel, "readiness") == SERVING
            assert probe(agent, "ready", "api") == 0 and probe(agent, "ready") == 0
            assert watch["api"].seen[:3] == [SERVING, NOT_SERVING, SERVING], watch["api"].seen

            # every worker fails its check and is replaced, again and again: the agent
            # itself stays live (never "all workers healthy", or k8s restarts the pod)
            sick.touch()
            slots = [("api", "api:0"), ("api", "api:1"), ("web", "web:0")]

            def all_replaced_twice() -> bool:
                assert check(channel, "liveness") == SERVING
                assert check(channel, "") == SERVING
                return all(worker(agent, s, w)["restarts"] >= 2 for s, w in slots)

            wait_for_sync(all_replaced_twice, 2 * WAIT, "every worker replaced twice")
            assert probe(agent, "live") == 0
            failing = [e for e in agent.events() if e["type"] == "unhealthy"]
            assert {e["worker"] for e in failing} == {w for _, w in slots}
            assert set(watch["liveness"].seen) == {SERVING}, watch["liveness"].seen
            assert check(channel, "liveness") == SERVING and check(channel, "") == SERVING
            sick.unlink()

            # the probe port is Health only
            request = pb.StatusRequest().SerializeToString()
            status_call = channel.unary_unary("/svcd.v1.Agent/Status", None, None)
            with pytest.raises(grpc.RpcError) as info:
                status_call(request, timeout=RPC_TIMEOUT)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            for w in watchers:
                w.close()
