"""Daemon memory: svcd against supervisord, circusd and PM2 (issue 2). Goal: svcd <= 45 MiB
RSS with 2 workers.

One run, everything alive at once: svcd with one service of 2 workers, svcd with 10
services x 4 workers, and supervisord, circusd and PM2 (fork mode) with 2 workers each;
every supervisor runs the same stdlib worker (tests/programs/http_worker.py, or
bench/supervisor/tiny_http.py wrapping it for the peers). Once all workers answer, each
daemon's status command runs once (so the control path has been used, as it is in
production), then SETTLE seconds pass, then RSS and USS of the daemon process alone (not
its workers; for PM2 its God daemon) are read SAMPLES times a second apart: the median
is reported.

Run: .venv/bin/python bench/supervisor/bench_rss.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import psutil
from common import (
    MIB,
    PYTHON,
    REPO,
    Procs,
    Svcd,
    free_port,
    machine,
    peers,
    run_dir,
    stdlib_command,
    svcd_service,
    wait_until,
    write_result,
)
from peers import Circus, Peer, Pm2, Supervisord

GOAL_MIB = 45.0
SETTLE = 5.0  # seconds between the last status call and the first reading
SAMPLES = 5
BIG_SERVICES, BIG_WORKERS = 10, 4
REFERENCE_LIFETIME = 900  # seconds a reference process sleeps at most (close() ends it)

# References in the same run, to tell svcd's own memory from what its libraries cost.
GRPC_HEALTH_SERVER = """
import asyncio, sys, grpc
from grpc_health.v1 import health, health_pb2_grpc
async def main():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port("unix:" + sys.argv[1])
    await server.start()
    await asyncio.sleep(float(sys.argv[2]))
asyncio.run(main())
"""
AGENT_IMPORTS = """
import sys, time
import agent.__main__, agent.daemon, agent.api, agent.control, agent.metrics
time.sleep(float(sys.argv[1]))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args()
    tools = peers()
    result: dict[str, Any] = {"machine": machine(load_and_memory=True),
                              "command": " ".join(sys.argv)}
    procs = Procs()
    agents: list[Svcd] = []
    with run_dir("sb-rss-") as tmp:
        try:
            daemons: dict[str, tuple[int, list[str], dict[str, str]]] = {}
            small_dir, big_dir = tmp / "svcd-2", tmp / "svcd-40"
            small_dir.mkdir()
            big_dir.mkdir()
            port = free_port()
            small = Svcd(procs, small_dir, svcd_service("api", stdlib_command(), port, 2)).start()
            agents.append(small)
            daemons["svcd, 1 service x 2 workers"] = (
                small.pid, ["svctl", "--socket", small.socket, "status"], {})
            services = "".join(
                svcd_service(f"s{i}", stdlib_command(), free_port(), BIG_WORKERS)
                for i in range(BIG_SERVICES)
            )
            big = Svcd(procs, big_dir, services).start(ready_within=600)
            agents.append(big)
            daemons[f"svcd, {BIG_SERVICES} services x {BIG_WORKERS} workers"] = (
                big.pid, ["svctl", "--socket", big.socket, "status"], {})
            peer_list: list[tuple[str, str, type[Peer]]] = [
                ("supervisord, 2 programs", "supervisord", Supervisord),
                ("circusd, 1 watcher x 2", "circusd", Circus),
                ("PM2 God daemon, 2 apps (fork)", "pm2", Pm2),
            ]
            skipped = {}
            for label, tool, cls in peer_list:
                if tool not in tools:
                    skipped[label] = "not installed"
                    continue
                peer = cls(procs, tmp, tools, 2).start()
                daemons[label] = (peer.daemon_pid, peer.status_argv,
                                  {**os.environ, **peer.status_env})
            grpc_ref = procs.spawn("grpc-ref", [PYTHON, "-c", GRPC_HEALTH_SERVER,
                                                str(tmp / "grpc-ref.sock"),
                                                str(REFERENCE_LIFETIME)])
            imports_ref = procs.spawn("imports-ref", [PYTHON, "-c", AGENT_IMPORTS,
                                                      str(REFERENCE_LIFETIME)], cwd=REPO)
            wait_until(lambda: (tmp / "grpc-ref.sock").exists(), 60, "grpc reference server")
            references = {
                "reference: bare grpc.aio server + health": grpc_ref.pid,
                "reference: python with svcd's agent modules imported": imports_ref.pid,
            }
            procs.remember_tree()
            for label, (_, argv, env) in daemons.items():
                if not argv:
                    continue
                if argv[0] == "svctl":
                    agent = small if "x 2 workers" in label else big
                    out = agent.svctl(*argv[3:])
                else:
                    out = subprocess.run(argv, capture_output=True, text=True, env=env or None,
                                         timeout=60)
                if out.returncode != 0:
                    skipped[label] = f"status failed: {out.stderr[-300:]}"
            time.sleep(SETTLE)
            for label, pid in references.items():
                daemons[label] = (pid, [], {})
            readings: dict[str, dict[str, list[float]]] = {
                label: {"rss": [], "uss": [], "threads": []} for label in daemons
            }
            for i in range(SAMPLES):
                if i:
                    time.sleep(1.0)
                for label, (pid, _, _) in daemons.items():
                    proc = psutil.Process(pid)
                    info = proc.memory_full_info()
                    readings[label]["rss"].append(info.rss / MIB)
                    readings[label]["uss"].append(info.uss / MIB)
                    readings[label]["threads"].append(proc.num_threads())
            figures: dict[str, Any] = {}
            for label, r in readings.items():
                figures[label] = {
                    "rss_mib": round(statistics.median(r["rss"]), 1),
                    "uss_mib": round(statistics.median(r["uss"]), 1),
                    "threads": int(statistics.median(r["threads"])),
                    "cmdline": " ".join(psutil.Process(daemons[label][0]).cmdline())[:160],
                }
            result["daemons"] = figures
            result["skipped"] = skipped
            result["goal_rss_mib"] = GOAL_MIB
        finally:
            for agent in agents:
                agent.stop()
            procs.close()
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    path = write_result("rss", result)
    for label, f in result["daemons"].items():
        print(f"{label:44s} RSS {f['rss_mib']:6.1f} MiB  USS {f['uss_mib']:6.1f} MiB  "
              f"threads {f['threads']}")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
