"""Chaos suite: a real svcd under load while workers, etcd, the agent and the disk fail.

Slow (marker `slow`; CI runs it), loopback only, bounded: the SIGKILL loop lasts
$SVCD_CHAOS_DURATION seconds (default 60; CI may set 20 to save time, the assertions
scale with it), everything else a few TTLs. The scenarios live in bench/chaos/harness.py;
bench/chaos/run.py runs the long versions and prints the figures for bench/RESULTS.md.

What each asserts:
- SIGKILL a random worker every 2 s under keep-alive load: every failed request is
  explained by a kill (its connection's worker was killed, or a kill fell inside a
  request that never got an answer), and a kill costs at most the connections open at
  that moment; every killed worker is replaced (most before the next kill).
- SIGSTOP a worker: its http health check finds it within interval x fall + timeout
  (plus one interval for the phase, plus scheduling slack), and it is replaced.
- etcd frozen past the TTL, then wiped: no request fails, no worker is touched, every
  key comes back.
- svcd SIGKILLed: no orphan worker, the keys expire; restarted: keys back.
- The log directory full: supervision goes on (a killed worker is replaced), lines
  keep reaching the ring, the lost file lines are counted.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.chaos.harness import (
    CONNECTIONS_PER_KILL_BOUND,
    HEALTH_INTERVAL,
    KILL_BACKOFF,
    STOP_GRACEFUL,
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
from tests.waiting import wait_for_sync

DURATION = float(os.environ.get("SVCD_CHAOS_DURATION", "60"))
KILL_INTERVAL = 2.0
CONNECTIONS = 16
WORKERS = 4
TTL = 2
#: Scheduling slack on a loaded 2-core machine, on top of each computed bound.
SLACK = 1.5

pytestmark = [pytest.mark.slow, pytest.mark.timeout(DURATION + 120)]


def test_sigkill_a_random_worker_every_2s_under_load(tmp_path: Path) -> None:
    port = free_port()
    agent = AgentProcess(tmp_path, pid_service(port, count=WORKERS, extra=KILL_BACKOFF))
    try:
        agent.start()
        figures = kill_workers(
            agent, port, duration=DURATION, interval=KILL_INTERVAL, connections=CONNECTIONS
        )
        # every killed worker is replaced (most within the 2 s before the next kill)
        wait_for_sync(
            lambda: agent.status()["services"][0]["ready"] == WORKERS, 30, "all workers back"
        )
    finally:
        agent.stop()
    print(figures.row())
    assert figures.kills >= DURATION / KILL_INTERVAL - 1
    assert figures.ok > figures.failed and figures.sent >= figures.ok + figures.failed
    assert not figures.unexplained, figures.unexplained[:5]
    # only what was in flight on the killed worker fails: at most its connections
    assert figures.most_failures_per_kill <= CONNECTIONS_PER_KILL_BOUND * CONNECTIONS
    assert figures.failed <= figures.kills * CONNECTIONS
    assert len(figures.replaced) + figures.not_replaced_in_time == figures.kills
    assert len(figures.replaced) >= figures.kills / 2, figures.row()


def test_sigstop_worker_is_found_by_its_health_check_and_replaced(tmp_path: Path) -> None:
    port = free_port()
    agent = AgentProcess(tmp_path, health_checked_service(port))
    try:  # not `with`: AgentProcess.__enter__ leaves the agent running if start() fails
        agent.start()
        figures = stop_worker(agent)
    finally:
        agent.stop()
    print(figures.row())
    assert figures.detected is not None and figures.replaced is not None, figures
    assert figures.detected <= figures.detection_bound + HEALTH_INTERVAL + SLACK, figures
    # a stopped process cannot act on SIGTERM: it is SIGKILLed after graceful_timeout
    assert figures.replaced <= figures.detected + STOP_GRACEFUL + 5 + SLACK, figures
    assert figures.old_gone


def test_etcd_frozen_then_wiped_leaves_workers_alone(tmp_path: Path, etcd: EtcdServer) -> None:
    port = free_port()
    agent = AgentProcess(
        tmp_path, pid_service(port, count=2), registry=registry_toml(etcd.endpoint, TTL)
    )
    try:
        agent.start()
        figures = etcd_freeze_and_wipe(agent, etcd, port, ttl=TTL)
    finally:
        agent.stop()
    print(figures.row())
    assert figures.failed == 0 and figures.sent > 0
    assert figures.workers_untouched
    assert figures.back_after_freeze is not None and figures.back_after_wipe is not None


def test_agent_sigkilled_and_restarted(tmp_path: Path, etcd: EtcdServer) -> None:
    port = free_port()
    agent = AgentProcess(
        tmp_path, pid_service(port, count=2), registry=registry_toml(etcd.endpoint, TTL)
    )
    try:
        agent.start()
        figures = kill_agent(agent, etcd, ttl=TTL)
    finally:
        agent.stop()
    print(figures.row())
    assert figures.orphans == 0 and figures.workers_gone is not None
    assert figures.keys_gone is not None and figures.keys_gone <= TTL + SLACK + 1
    assert figures.keys_back is not None


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
async def test_log_dir_full(tmp_path: Path) -> None:
    try:
        mount = tmpfs("1m")
        log_dir = mount.__enter__()
    except OSError as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    try:
        figures = await log_dir_full(log_dir)
    finally:
        mount.__exit__(None, None, None)
    print(figures.row())
    assert figures.dropped > 0 and figures.lines > figures.dropped
    assert figures.replaced is not None and figures.ring_after
