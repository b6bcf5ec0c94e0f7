"""kill -9 of a worker -> a replacement answers on the port (issue 2). Goal: median <= 100 ms.

Every supervisor runs ONE worker, so that what answers after the kill can only be the
replacement. t0 is taken just before `kill(pid, SIGKILL)`; from then on a new connection
is opened every 5 ms (concurrently, up to 200 pending) until one gets a 200 from a
process other than the victim: t1 (workers answer their pid; server_core's hello answers
"hello", and svctl confirms the new pid). Peers with a shared socket (svcd, gunicorn,
circus) queue those connections in the listen backlog; those whose worker binds the port
itself (supervisord, PM2 fork) refuse them until it is back. Concurrent probes matter:
PM2 cluster mode accepts a connection during the gap and never answers it, which would
stall a single sequential client; such connections are counted as `hung` (still
unanswered 3 s after the first new answer), resets and closes as `broken`.

The targets are measured round-robin (round i kills every target once), so the noise of
this 2-core machine falls on all of them alike. Each target rests SETTLE seconds between
its kills, longer than every peer's "stable run" threshold (svcd's `stable_after`, set
to 1 s here; supervisord's startsecs 1; PM2's min_uptime 1 s), so each kill is a first
crash after a stable run rather than a crash loop under backoff.

Two references without any supervisor: a fresh `python` of the same worker started by
this script until it answers (`bare-spawn-*`): the floor for every supervisor that
execs a new interpreter.

Run: .venv/bin/python bench/supervisor/bench_kill.py [--rounds 20] [--only svcd,gunicorn]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common import (
    PYTHON,
    STDLIB_WORKER,
    TINY_HTTP,
    BenchError,
    Procs,
    Svcd,
    first_answer,
    free_port,
    hello_command,
    http_get,
    machine,
    peers,
    probe_new_answer,
    run_dir,
    stdlib_command,
    summary,
    svcd_service,
    write_result,
)
from peers import Circus, Gunicorn, Peer, Pm2, Supervisord

SETTLE = 2.0  # seconds a target rests between two kills (> every stable-run threshold)
ANSWER_WITHIN = 20.0  # seconds for a replacement to answer before the round is a failure
GOAL_MS = 100.0


@dataclass
class Target:
    name: str
    port: int
    victim: Callable[[], int]  # pid of the worker to kill now
    answers_pid: bool = True  # GET / answers the worker's pid
    check_new: Callable[[int], bool] | None = None  # for targets that don't answer their pid
    samples: list[float] = field(default_factory=list)
    kills: list[tuple[int, float]] = field(default_factory=list)  # (pid, wall time of kill)
    last_answer: float = 0.0
    refused: int = 0  # connections opened during the gap that were refused
    broken: int = 0  # ... reset or closed unanswered
    hung: int = 0  # ... accepted and never answered (LINGER s after the first answer)
    failures: list[str] = field(default_factory=list)


def kill_once(t: Target) -> None:
    rest = SETTLE - (time.monotonic() - t.last_answer)
    if rest > 0:
        time.sleep(rest)
    pid = t.victim()
    wall = time.time()
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    try:
        probe = probe_new_answer(t.port, ANSWER_WITHIN, exclude=str(pid) if t.answers_pid else None)
    except BenchError as exc:
        t.failures.append(str(exc))
        t.last_answer = time.monotonic()
        return
    assert probe.answered_at is not None
    t1, body = probe.answered_at, probe.body
    t.last_answer = time.monotonic()
    t.refused += probe.refused
    t.broken += probe.broken
    t.hung += probe.hung
    if t.check_new is not None and not t.check_new(pid):
        t.failures.append(f"pid {pid} still serving after answer {body!r}")
        return
    t.samples.append((t1 - t0) * 1000)
    t.kills.append((pid, wall))


def bare_spawn(procs: Procs, argv_for: Callable[[int], list[str]]) -> float:
    """ms from Popen of a fresh worker (binding its own port) to its first answer."""
    port = free_port()
    t0 = time.monotonic()
    proc = procs.spawn("bare", argv_for(port))
    try:
        t1, _ = first_answer(port, ANSWER_WITHIN)
    finally:
        proc.kill()
        proc.wait(10)
    return (t1 - t0) * 1000


def svcd_breakdown(agent: Svcd, service: str, kills: list[tuple[int, float]]) -> dict[str, Any]:
    """From svctl events: kill -> exited seen, exited -> respawned, respawned -> READY."""
    events = [e for e in agent.events() if e.get("service") == service]
    detect: list[float] = []
    spawn: list[float] = []
    ready: list[float] = []
    for pid, wall in kills:
        exited = next((e for e in events if e["type"] == "exited" and e["pid"] == pid), None)
        if exited is None:
            continue
        after = [e for e in events if e["time"] >= exited["time"] and e["pid"] != pid]
        started = next((e for e in after if e["type"] == "started"), None)
        became = next((e for e in after if e["type"] == "ready"), None)
        detect.append((exited["time"] - wall) * 1000)
        if started is not None:
            spawn.append((started["time"] - exited["time"]) * 1000)
            if became is not None:
                ready.append((became["time"] - started["time"]) * 1000)
    return {"kill_to_exited_ms": summary(detect), "exited_to_spawned_ms": summary(spawn),
            "spawned_to_ready_ms": summary(ready)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=1, help="rounds measured but not counted")
    parser.add_argument("--only", default="", help="comma-separated target name prefixes")
    args = parser.parse_args()
    only = [s for s in args.only.split(",") if s]

    def wanted(name: str) -> bool:
        return not only or any(name.startswith(o) for o in only)

    tools = peers()
    info = machine(load_and_memory=True)
    procs = Procs()
    targets: list[Target] = []
    started: dict[str, Peer] = {}
    agent: Svcd | None = None
    skipped: dict[str, str] = {}
    result: dict[str, Any] = {"machine": info, "command": " ".join(sys.argv), "targets": {}}
    with run_dir("sb-kill-") as tmp:
        try:
            if wanted("svcd"):
                hello_port, stdlib_port, preload_port = free_port(), free_port(), free_port()
                services = svcd_service("hello", hello_command(hello_port), hello_port, 1)
                services += svcd_service("stdlib", stdlib_command(), stdlib_port, 1)
                services += svcd_service("preload", hello_command(preload_port), preload_port, 1,
                                         extra="preload = true")
                agent = Svcd(procs, tmp, services).start()
                svcd = agent

                def preload_victim() -> int:
                    return svcd.worker_pid("preload")

                def preload_replaced(old: int) -> bool:
                    return svcd.worker_pid("preload") != old

                targets.append(Target("svcd-preload", preload_port, preload_victim,
                                      answers_pid=False, check_new=preload_replaced))

                def hello_victim() -> int:
                    return svcd.worker_pid("hello")

                def hello_replaced(old: int) -> bool:
                    return svcd.worker_pid("hello") != old

                targets.append(Target("svcd-hello", hello_port, hello_victim, answers_pid=False,
                                      check_new=hello_replaced))
                targets.append(Target("svcd-stdlib", stdlib_port,
                                      lambda p=stdlib_port: int(http_get(p))))  # type: ignore[misc]
            peer_classes: list[tuple[str, Callable[[], Peer]]] = [
                ("supervisord", lambda: Supervisord(procs, tmp, tools, 1)),
                ("gunicorn", lambda: Gunicorn(procs, tmp, tools, 1)),
                ("circus", lambda: Circus(procs, tmp, tools, 1)),
                ("pm2-fork", lambda: Pm2(procs, tmp, tools, 1, mode="fork")),
                ("pm2-cluster", lambda: Pm2(procs, tmp, tools, 1, mode="cluster")),
            ]
            needs = {"supervisord": "supervisord", "gunicorn": "gunicorn", "circus": "circusd",
                     "pm2-fork": "pm2", "pm2-cluster": "pm2"}
            for name, make in peer_classes:
                if not wanted(name):
                    continue
                if needs[name] not in tools:
                    skipped[name] = "not installed (bench/peers/install.sh)"
                    continue
                try:
                    peer = make().start()
                except BenchError as exc:
                    skipped[name] = f"failed to start: {exc}"
                    continue
                started[name] = peer
                port = peer.ports[0]
                targets.append(Target(name, port, lambda p=port: int(http_get(p))))  # type: ignore[misc]
            procs.remember_tree()

            bare: dict[str, list[float]] = {"bare-spawn-stdlib": [], "bare-spawn-hello": []}
            total = args.warmup + args.rounds
            for rnd in range(total):
                for t in targets:
                    before = len(t.samples)
                    kill_once(t)
                    if rnd < args.warmup and len(t.samples) > before:
                        t.samples.pop()
                        t.kills.pop()
                if rnd >= args.warmup and wanted("bare"):
                    bare["bare-spawn-stdlib"].append(
                        bare_spawn(procs, lambda p: [PYTHON, str(TINY_HTTP), "--port", str(p)]))
                    bare["bare-spawn-hello"].append(
                        bare_spawn(procs, lambda p: hello_command(p)))
                line = "  ".join(f"{t.name} {t.samples[-1]:.0f}" for t in targets if t.samples)
                print(f"round {rnd + 1}/{total}: {line}", flush=True)

            base = None
            for t in targets:
                s = summary(t.samples)
                entry: dict[str, Any] = {
                    "ms": s, "failures": t.failures,
                    "gap_connections": {"refused": t.refused, "broken": t.broken,
                                        "hung": t.hung},
                }
                if t.name == "svcd-stdlib":
                    base = s.get("median")
                if t.name.startswith("svcd") and agent is not None:
                    entry["breakdown"] = svcd_breakdown(
                        agent, t.name.removeprefix("svcd-"), t.kills)
                result["targets"][t.name] = entry
            for name, values in bare.items():
                if values:
                    result["targets"][name] = {"ms": summary(values), "failures": []}
            if base:
                for entry in result["targets"].values():
                    med = entry["ms"].get("median")
                    if med:
                        entry["ratio_to_svcd_stdlib"] = round(med / base, 2)
            result["skipped"] = skipped
            result["settle_s"] = SETTLE
            result["goal_ms"] = GOAL_MS
            result["workers"] = {"svcd-stdlib": str(STDLIB_WORKER),
                                 "svcd-hello": "examples/hello.py",
                                 "svcd-preload": "examples/hello.py, preload = true",
                                 "peers": str(TINY_HTTP)}
        finally:
            if agent is not None:
                agent.stop()
            procs.close()
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    path = write_result("kill", result)
    print(json.dumps(result["targets"], indent=1))
    if skipped:
        print("skipped:", skipped)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
