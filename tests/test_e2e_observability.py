"""End to end, issue 7: metrics, status, events and logs of a real svcd, seen from outside.

Each test starts `svcd --config FILE` (tests/agent_proc.py) with real workers (the
stdlib tests/programs/http_worker.py, the server_core examples/hello.py, the output
generator tests/programs/log_flood.py) and reads only what an operator reads: `/metrics`
on `metrics_address`, `svctl status [--json]`, `svctl events --json [-f]` and `svctl
logs`. The renderers and stores are unit-tested elsewhere (test_metrics.py,
test_cli.py, test_logs.py); these check that a running agent wires them together.

Bounds use deadlines, never fixed sleeps; latency bounds are generous (a loaded 2-core
machine) and the measured figures are printed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.agent_proc import (
    ROOT,
    AgentProcess,
    agent_status,
    api_service,
    argv,
    running,
    svctl,
    worker_command,
    worker_pids,
)
from tests.conftest import free_port
from tests.test_metrics import (  # SPEC.md's names, and one parser of the exposition
    SPEC_SERVICE_SERIES,
    SPEC_WORKER_SERIES,
    Samples,
    parse,
    value,
)
from tests.waiting import wait_for_sync

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

HELLO = ROOT / "examples" / "hello.py"
LOG_FLOOD = ROOT / "tests" / "programs" / "log_flood.py"
#: Generous deadline for conditions that need a worker (re)spawned and ready.
WAIT = 30.0
#: Per-request bound of the HTTP clients.
HTTP_TIMEOUT = 5.0
SPEC_COUNTERS = ("svcd_worker_restarts_total", "svcd_worker_requests_total", "svcd_reloads_total")


# ---------------------------------------------------------------- helpers


def http_get(port: int, path: str = "/") -> str:
    url = f"http://127.0.0.1:{port}{path}"
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as resp:
        return str(resp.read().decode())


def kill_and_wait_replaced(agent: AgentProcess, name: str) -> int:
    """SIGKILL worker `name` of service api; its pid, once both workers are ready again
    and it is not among them."""
    victim: int = worker(agent, "api", name)["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for_sync(
        lambda: service_status(agent, "api")["ready"] == 2
        and victim not in worker_pids(agent, "api"),
        WAIT, f"{name} replaced",
    )
    return victim


def scrape(port: int) -> Samples:
    return parse(http_get(port, "/metrics"))


def series_of(samples: Samples, **labels: str) -> list[str]:
    """Names of the series carrying these label values."""
    want = set(labels.items())
    return [name for name, lbl in samples if want <= set(lbl)]


def service_status(agent: AgentProcess, service: str) -> dict[str, Any]:
    for svc in agent_status(agent)["services"]:
        if svc["name"] == service:
            return svc  # type: ignore[no-any-return]
    raise KeyError(service)


def worker(agent: AgentProcess, service: str, name: str) -> dict[str, Any]:
    for w in service_status(agent, service)["workers"]:
        if w["worker"] == name:
            return w  # type: ignore[no-any-return]
    raise KeyError(name)


def positions(evts: list[dict[str, Any]], match: Callable[[dict[str, Any]], bool]) -> list[int]:
    return [i for i, e in enumerate(evts) if match(e)]


# ---------------------------------------------------------------- metrics


def test_metrics_of_a_running_agent(tmp_path: Path) -> None:
    """Every SPEC.md series from the first scrape (a service that never gets ready
    included, counters at 0, registry 0), restarts after kill -9, the server_core
    worker's own counter with its labels, and series of scaled-down workers gone."""
    metrics_port, hello_port = free_port(), free_port()
    services = f"""
[services.hello]
command = {argv(HELLO)}
count = 2
listen = ["tcp://127.0.0.1:{hello_port}"]
graceful_timeout = 5

[services.late]
command = {worker_command("--never-ready")}
ready_timeout = 600
graceful_timeout = 5
"""
    extra = f'metrics_address = "127.0.0.1:{metrics_port}"'
    with running(tmp_path, services, extra, wait_ready=False) as agent:
        # the first scrape that answers already has every series of every service
        s = wait_for_sync(lambda: scrape(metrics_port), WAIT, "/metrics answering")
        assert value(s, "svcd_registry_connected") == 0
        for svc, desired in (("hello", 2), ("late", 1)):
            for name in SPEC_SERVICE_SERIES:
                assert (name, (("service", svc),)) in s, (name, svc)
            assert value(s, "svcd_service_desired_workers", service=svc) == desired
            assert value(s, "svcd_reloads_total", service=svc) == 0
            for index in range(desired):
                labels = {"service": svc, "worker": f"{svc}:{index}"}
                for name in SPEC_WORKER_SERIES:
                    assert (name, tuple(sorted(labels.items()))) in s, (name, labels)
                for name in ("svcd_worker_restarts_total", "svcd_worker_requests_total"):
                    assert value(s, name, **labels) == 0, (name, labels)
        late = {"service": "late", "worker": "late:0"}
        assert value(s, "svcd_worker_ready", **late) == 0
        assert value(s, "svcd_service_ready_workers", service="late") == 0

        wait_for_sync(lambda: svctl(agent, "probe", "ready", "hello").returncode == 0, WAIT,
                      "hello ready")
        s = scrape(metrics_port)
        for w in ("hello:0", "hello:1"):
            assert value(s, "svcd_worker_up", service="hello", worker=w) == 1
            assert value(s, "svcd_worker_ready", service="hello", worker=w) == 1
        assert value(s, "svcd_service_ready_workers", service="hello") == 2
        assert value(s, "svcd_worker_ready", **late) == 0  # still starting, still exported

        # the worker's own counter: svcd_app_<name>{route, service, worker}
        requests = 20
        for _ in range(requests):
            assert http_get(hello_port) == "hello"

        def app_counts() -> dict[str, float]:
            s = scrape(metrics_port)
            return {
                w: value(s, "svcd_app_hello_requests_total", route="hello",
                         service="hello", worker=w)
                for w in ("hello:0", "hello:1")
                if ("svcd_app_hello_requests_total",
                    (("route", "hello"), ("service", "hello"), ("worker", w))) in s
            }

        wait_for_sync(lambda: sum(app_counts().values()) == requests, WAIT,
                      f"svcd_app_hello_requests_total summing to {requests}")
        s = scrape(metrics_port)
        served = sum(value(s, "svcd_worker_requests_total", service="hello", worker=w)
                     for w in ("hello:0", "hello:1"))
        assert served >= requests

        # kill -9: the restart is counted, the slot is up again
        victim = worker(agent, "hello", "hello:0")["pid"]
        os.kill(victim, signal.SIGKILL)
        hello0 = {"service": "hello", "worker": "hello:0"}

        def restarted() -> bool:
            s = scrape(metrics_port)
            return (value(s, "svcd_worker_restarts_total", **hello0) == 1
                    and value(s, "svcd_worker_up", **hello0) == 1
                    and value(s, "svcd_worker_pid", **hello0) not in (0, victim))

        wait_for_sync(restarted, WAIT, "restart of hello:0 counted")
        s = scrape(metrics_port)
        assert value(s, "svcd_worker_restarts_total", service="hello", worker="hello:1") == 0

        # scale down: every series of hello:1 disappears, the rest stays
        assert series_of(s, worker="hello:1")
        assert svctl(agent, "scale", "hello", "1").returncode == 0

        def gone() -> Samples | None:
            s = scrape(metrics_port)
            return None if series_of(s, worker="hello:1") else s

        s = wait_for_sync(gone, WAIT, "hello:1 series gone")  # type: ignore[arg-type]
        assert value(s, "svcd_service_desired_workers", service="hello") == 1
        assert value(s, "svcd_worker_up", **hello0) == 1
        assert series_of(s, worker="late:0")


# ---------------------------------------------------------------- status


def test_status_json_and_table_of_a_running_agent(tmp_path: Path) -> None:
    """`svctl status --json`: agent and per-service summary fields agree with the
    workers; `svctl status`: Workerman's columns, a row per worker with its real pid,
    the service total row, the host line and the exit table after a kill -9."""
    port = free_port()
    with running(tmp_path, api_service(port)) as agent:
        kill_and_wait_replaced(agent, "api:0")
        # Requests go after the kill: counts served by the killed worker die with it.
        for _ in range(10):
            http_get(port)
        wait_for_sync(  # stats arrive with the workers' next report
            lambda: sum(w["requests"] for w in service_status(agent, "api")["workers"]) > 0,
            WAIT, "requests reported",
        )

        status = agent_status(agent)
        info = status["agent"]
        assert info["name"] == "test-agent" and info["registry"] == "disabled"
        assert info["pid"] == agent.proc.pid  # type: ignore[union-attr]
        assert info["uptime_s"] > 0 and info["version"]
        (svc,) = status["services"]
        workers = svc["workers"]
        assert svc["state"] == "running" and svc["desired"] == 2
        assert svc["ready"] == sum(1 for w in workers if w["ready"]) == 2
        assert all(w["generation"] == svc["generation"] for w in workers)
        by_name = {w["worker"]: w for w in workers}
        assert by_name["api:0"]["restarts"] == 1 and by_name["api:1"]["restarts"] == 0
        assert by_name["api:0"]["last_exit"] == "signal SIGKILL"
        assert by_name["api:0"]["exit_counts"] == {"signal SIGKILL": 1}
        for w in workers:
            assert psutil.Process(w["pid"]).ppid() == info["pid"]
            assert w["uptime_s"] > 0

        out = svctl(agent, "status")
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        header = next(line for line in lines if line.split()[:2] == ["worker", "pid"])
        columns = header.split()
        for column in ("worker", "pid", "state", "health", "restarts", "uptime", "memory",
                       "cpu", "connections", "requests", "qps", "send_fail", "timers"):
            assert column in columns, (column, header)
        for name, w in by_name.items():
            row = next(line.split() for line in lines if line.split()[:1] == [name])
            cells = dict(zip(columns, row, strict=False))
            assert cells["pid"] == str(w["pid"]) and cells["state"] == "running", row
            assert cells["restarts"] == str(w["restarts"]), row
        total = next(line.split() for line in lines if line.split()[:1] == ["total"])
        assert "2/2" in total and "1" in total, total  # workers up, restarts
        host = next(line for line in lines if line.startswith("svcd test-agent"))
        assert f"pid {info['pid']}" in host and "workers 2/2 ready" in host, host
        assert "registry disabled" in host, host
        exit_row = next(line.split() for line in lines if line.split()[:1] == ["api"]
                        and "SIGKILL" in line)
        assert exit_row[-1] == "1", exit_row
        assert f"127.0.0.1:{port}" in out.stdout  # the listening address


# ---------------------------------------------------------------- events


def test_events_across_a_kill_and_a_reload_are_in_order(tmp_path: Path) -> None:
    """The killed slot: exited (SIGKILL, unexpected) -> [backoff] -> restarted -> ready;
    the reload: reload_started -> for each slot the new generation ready before the old
    one exits -> reloaded; history in time order, and `events -f` saw the same."""
    port = free_port()
    with running(tmp_path, api_service(port)) as agent:
        follow_out = tmp_path / "follow.jsonl"
        with open(follow_out, "wb") as sink:
            follower = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "--socket", agent.socket,
                 "events", "-f", "--json"],
                stdout=sink, stderr=subprocess.DEVNULL, cwd=ROOT,
            )
        try:
            victim = kill_and_wait_replaced(agent, "api:0")
            reload = svctl(agent, "reload", "api")
            assert reload.returncode == 0, reload.stdout + reload.stderr
            evts = agent.events()
            wait_for_sync(lambda: follow_out.read_text().count("\n") and any(
                json.loads(x)["type"] == "reloaded" for x in follow_out.read_text().splitlines()
            ), WAIT, "the follower to see the reload")
        finally:
            follower.send_signal(signal.SIGINT)
            try:
                follower.wait(10)
            except subprocess.TimeoutExpired:
                follower.kill()
                follower.wait(5)

    times = [e["time"] for e in evts]
    assert times == sorted(times), "history not in time order"
    for e in evts:
        assert {"time", "type", "service", "worker", "pid"} <= set(e)

    # the killed slot
    kill = positions(evts, lambda e: e["type"] == "exited" and e["pid"] == victim)
    assert len(kill) == 1
    exited = evts[kill[0]]
    assert exited["signal"] == "SIGKILL" and exited["expected"] is False, exited
    after = [e for e in evts[kill[0] + 1:] if e["worker"] == "api:0"]
    kinds = [e["type"] for e in after]
    if kinds[0] == "backoff":
        kinds.pop(0)
    assert kinds[:2] == ["started", "ready"], kinds
    replacement = next(e for e in after if e["type"] == "started")
    assert replacement["pid"] != victim and replacement["restarts"] == 1
    assert replacement["restart"] is True

    # the reload
    (start,) = positions(evts, lambda e: e["type"] == "reload_started")
    (done,) = positions(evts, lambda e: e["type"] == "reloaded")
    assert start < done
    old_gen, new_gen = evts[start]["generation"] - 1, evts[start]["generation"]
    assert evts[done]["generation"] == new_gen
    during = evts[start:done]
    for slot in ("api:0", "api:1"):
        new_ready = positions(during, lambda e, s=slot: e["worker"] == s  # type: ignore[misc]
                              and e["type"] == "ready" and e["generation"] == new_gen)
        old_exit = positions(during, lambda e, s=slot: e["worker"] == s  # type: ignore[misc]
                             and e["type"] == "exited" and e["generation"] == old_gen)
        new_start = positions(during, lambda e, s=slot: e["worker"] == s  # type: ignore[misc]
                              and e["type"] == "started"
                              and e["generation"] == new_gen)
        assert len(new_start) == len(new_ready) == len(old_exit) == 1, (slot, during)
        assert new_start[0] < new_ready[0] < old_exit[0], (slot, during)
        assert during[old_exit[0]]["expected"] is True

    # the live stream told the same story in the same order
    streamed = [json.loads(x) for x in follow_out.read_text().splitlines() if x.strip()]
    key = [(e["type"], e["worker"], e["pid"], e["time"]) for e in evts
           if e["time"] >= streamed[0]["time"]]
    got = [(e["type"], e["worker"], e["pid"], e["time"]) for e in streamed]
    assert got[: len(key)] == key


# ---------------------------------------------------------------- logs


def chatty_service(go: Path, **logs: Any) -> str:
    """Worker 1 writes LINES_EACH numbered lines once `go` exists, worker 0 QUIET_LINES
    at once."""
    command = argv(LOG_FLOOD, "--wait-file", str(go), "--lines", str(LINES_EACH),
                   "--line-bytes", str(LINE_BYTES), "--quiet-worker", "0")
    table = "".join(f"{key} = {json.dumps(v)}\n" for key, v in logs.items())
    return f"""
[services.chatty]
command = {command}
count = 2
ready = "started"
graceful_timeout = 2
[services.chatty.logs]
{table}"""


LINES_EACH = 5000
LINE_BYTES = 200
QUIET_LINES = 10  # tests/programs/log_flood.py


def wait_flood_done(agent: AgentProcess, *workers: int) -> None:
    """These workers wrote `flood done` (as far as the ring or the log files tell)."""

    def written(index: int) -> bool:
        line = f"flood done w{index}"
        ring = svctl(agent, "logs", "chatty", "-n", "3", "--worker", str(index)).stdout
        files = (Path(agent.tmp) / "logs").glob("chatty.log*")
        return line in ring or any(line in f.read_text() for f in files)

    wait_for_sync(lambda: all(map(written, workers)), WAIT, f"workers {workers} done writing")


def test_log_rotation_keeps_the_configured_count_and_svctl_logs_filters(
    tmp_path: Path,
) -> None:
    """A worker writes 1 MB into a service with max_bytes 64 KiB, backups 2: at most 3
    files, each bounded, holding the newest lines with none lost at a rotation; `svctl
    logs -n N` gives the last N lines, `--worker` only that worker's."""
    go = tmp_path / "go"
    max_bytes = 64 * 1024
    with running(tmp_path, chatty_service(go, max_bytes=max_bytes, backups=2)) as agent:
        go.touch()
        wait_flood_done(agent, 1)
        files = sorted((tmp_path / "logs").glob("chatty.log*"))
        names = [f.name for f in files]
        assert names == ["chatty.log", "chatty.log.1", "chatty.log.2"], names
        sizes = [f.stat().st_size for f in files]
        print(f"log files {dict(zip(names, sizes, strict=True))}")
        # a batch read in one wakeup is split at line boundaries: no file passes the limit
        assert all(size <= max_bytes for size in sizes), sizes
        # the files hold the newest part of the stream, oldest file first, no line lost
        # at a rotation: per worker, a run of consecutive numbers ending with its last
        kept = files[2].read_text() + files[1].read_text() + files[0].read_text()
        numbers: dict[str, list[int]] = {}
        for match in re.finditer(r"stdout: line (\d+) (w\d) ", kept):
            numbers.setdefault(match[2], []).append(int(match[1]))
        last = {"w0": QUIET_LINES, "w1": LINES_EACH}
        assert numbers.get("w1"), kept[:500]
        for who, seen in numbers.items():
            assert seen == list(range(last[who] - len(seen), last[who])), who
        assert len(numbers["w1"]) < LINES_EACH  # the oldest rotated away

        out = svctl(agent, "logs", "chatty", "-n", "7", "--json")
        assert out.returncode == 0, out.stderr
        tail = [json.loads(x) for x in out.stdout.splitlines() if x.strip()]
        assert len(tail) == 7
        assert {"time", "service", "worker", "pid", "stream", "line"} <= set(tail[0])
        times = [t["time"] for t in tail]
        assert times == sorted(times)

        out = svctl(agent, "logs", "chatty", "-n", "5", "--worker", "1", "--json")
        mine = [json.loads(x) for x in out.stdout.splitlines() if x.strip()]
        assert len(mine) == 5 and {(m["worker"], m["index"]) for m in mine} == {("chatty:1", 1)}
        assert {m["pid"] for m in mine} == {worker(agent, "chatty", "chatty:1")["pid"]}
        numbered = [int(m["line"].split()[1]) for m in mine if m["stream"] == "stdout"]
        assert numbered == list(range(LINES_EACH - len(numbered), LINES_EACH)), numbered
        assert any(m["stream"] == "stderr" and m["line"] == "flood done w1" for m in mine)

        text = svctl(agent, "logs", "chatty", "-n", "3", "--worker", "1")
        assert text.returncode == 0
        rows = text.stdout.splitlines()
        assert len(rows) == 3 and all(r.startswith("chatty:1 | ") for r in rows), rows


def test_logs_of_a_quiet_worker_survive_a_chatty_sibling(tmp_path: Path) -> None:
    go = tmp_path / "go"
    with running(tmp_path, chatty_service(go)) as agent:
        wait_flood_done(agent, 0)  # the quiet worker writes at once, the chatty one on `go`
        go.touch()
        wait_flood_done(agent, 1)
        out = svctl(agent, "logs", "chatty", "-n", "5", "--worker", "0", "--json")
        assert out.returncode == 0, out.stderr
        quiet = [json.loads(x)["line"] for x in out.stdout.splitlines() if x.strip()]
        assert len(quiet) == 5 and quiet[-1] == "flood done w0", quiet


def test_a_flood_of_output_leaves_the_agent_responsive(tmp_path: Path) -> None:
    """50 MB of lines in a burst, then a 10 MB line without a newline: the agent answers
    Health on its control socket and `svctl status` throughout, another service keeps
    serving, the agent's memory does not grow by the flood's size, the long line is cut."""
    go = tmp_path / "go"
    api_port = free_port()
    services = f"""
[services.flood]
command = {argv(LOG_FLOOD, "--wait-file", str(go), "--burst-mb", "50", "--long-line-mb", "10")}
ready = "started"
graceful_timeout = 2

[services.api]
command = {worker_command()}
listen = ["tcp://127.0.0.1:{api_port}"]
graceful_timeout = 5
"""
    status_bound = 10.0  # svctl is a new Python process each time: generous
    ping_bound = 5.0  # a loaded machine; a blocked loop would stall far longer
    with running(tmp_path, services) as agent:
        assert agent.proc is not None
        agent_proc = psutil.Process(agent.proc.pid)
        rss_before = agent_proc.memory_info().rss
        pings: list[tuple[float, float]] = []  # (wall-clock start, seconds)
        stop = threading.Event()

        def ping() -> None:
            with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while not stop.is_set():
                    wall, began = time.time(), time.monotonic()
                    reply = stub.Check(health_pb2.HealthCheckRequest(service="liveness"),
                                       timeout=30)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
                    pings.append((wall, time.monotonic() - began))
                    stop.wait(0.01)

        pinger = threading.Thread(target=ping, daemon=True)
        pinger.start()
        wait_for_sync(lambda: pings, WAIT, "first Health answer")
        began, flood_began = time.monotonic(), time.time()
        go.touch()
        status_times: list[float] = []
        status_starts: list[float] = []
        rss_peak = rss_before
        try:
            deadline = began + 120
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                status_starts.append(time.time())
                out = svctl(agent, "status", "--json")
                status_times.append(time.monotonic() - t0)
                assert out.returncode == 0, out.stderr
                assert http_get(api_port).strip().isdigit()
                rss_peak = max(rss_peak, agent_proc.memory_info().rss)
                logs = svctl(agent, "logs", "flood", "-n", "3", "--json")
                done = [json.loads(x) for x in logs.stdout.splitlines()
                        if "flood done" in x]
                if done:
                    flood_ended = done[0]["time"]
                    break
            else:
                raise AssertionError("the flood never finished")
        finally:
            stop.set()
            pinger.join(35)
        took = time.monotonic() - began
        during = [dt for wall, dt in pings if flood_began <= wall <= flood_ended]
        print(f"flood captured in {took:.1f}s; svctl status max {max(status_times):.2f}s "
              f"over {len(status_times)} calls; Health during the flood: max "
              f"{max(during, default=0) * 1000:.0f} ms over {len(during)} calls; "
              f"agent rss {rss_before >> 20} -> peak {rss_peak >> 20} MiB")
        # the probes really ran while the agent was swallowing the flood
        assert status_starts[0] < flood_ended and len(during) >= 3, (status_starts, during)
        assert max(status_times) <= status_bound
        assert max(dt for _, dt in pings) <= ping_bound
        assert rss_peak - rss_before < 50 * 1024 * 1024

        lines = [json.loads(x)["line"] for x in
                 svctl(agent, "logs", "flood", "-n", "5", "--json").stdout.splitlines()]
        cut = [x for x in lines if x.startswith("LLLL")]
        assert cut and all(len(x) <= 16 * 1024 + 64 for x in cut), [len(x) for x in cut]
        flood = worker(agent, "flood", "flood:0")
        assert flood["state"] == "running" and flood["restarts"] == 0
        api = service_status(agent, "api")
        assert api["ready"] == 1 and api["workers"][0]["restarts"] == 0
