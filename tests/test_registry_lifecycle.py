"""A worker's etcd key through its life (SPEC.md "etcd layout"), with real processes.

`{prefix}/services/{service}/{agent}/{index}-{generation}` is written when a worker
starts, rewritten on every change of state/ready/health, and deleted only when the
worker stops for good. A crash or a failing health check (default on_failure =
"restart") rewrites the key (failing, stopping, the new pid) and never deletes it;
stop, scale down, removal and the old generation of a reload delete it, before the
process is signalled.

The in-process tests run a real Supervisor and a real Registry against a real etcd,
joined by the same feed as the agent's (`AgentCore.run_registry_feed`: one `publish`
of the full status after every event); the slow test runs the real `svcd`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.registry import Registry
from supervisor.spec import HealthSpec
from supervisor.supervisor import Supervisor
from tests.agent_proc import AgentProcess, worker_command
from tests.conftest import free_port
from tests.etcd_fixture import EtcdServer
from tests.programs.harness import FAST_BACKOFF, worker_spec
from tests.programs.harness import running as supervising
from tests.registry_helpers import (
    KeyChange,
    Reader,
    Settings,
    eventually,
    reader,
    running,
    watching,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

TEST_TIMEOUT = 60
#: Deadline for a worker to be (re)spawned and ready, or a key to change.
WAIT = 20.0
PREFIX = "/svcd/services/web/web-1/"
#: Restart delay after the second quick crash in a row: long enough to be seen in etcd.
CRASH_BACKOFF = 0.5
#: A restarted worker's time in STARTING (its key shows it, ready false).
READY_DELAY = 0.3
#: Fast checks: one failure is enough to replace the worker, one pass to trust it.
FAST_HEALTH = HealthSpec(kind="http", interval=0.2, timeout=0.15, rise=1, fall=1)


@contextlib.asynccontextmanager
async def registered(tmp_path: Path, endpoint: str) -> AsyncIterator[Supervisor]:
    """A Supervisor whose status is published to a Registry on `endpoint` after every
    event, as the agent's core does."""

    async def feed(sup: Supervisor, reg: Registry) -> None:
        sub = sup.events.subscribe()
        reg.publish(sup.status())
        try:
            async for _event in sub:
                reg.publish(sup.status())
        finally:
            sub.close()

    async with supervising(tmp_path) as sup, running(Settings((endpoint,))) as reg:
        task = asyncio.create_task(feed(sup, reg), name="registry feed")
        try:
            yield sup
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def puts(changes: list[KeyChange], key: str) -> list[dict[str, Any]]:
    return [c.value for c in changes if c.key == key and c.value is not None]


def deletes(changes: list[KeyChange], key: str) -> list[KeyChange]:
    return [c for c in changes if c.key == key and c.kind == "delete"]


def has_pid(changes: list[KeyChange], key: str, pred: Callable[[int], bool]) -> bool:
    """Whether some put of `key` shows a running, ready worker whose pid passes `pred`."""
    return any(
        v["state"] == "running" and v["ready"] and pred(v["pid"]) for v in puts(changes, key)
    )


async def test_health_failure_rewrites_the_key_and_never_deletes_it(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    fail = tmp_path / "fail"
    spec = worker_spec("web", "--health-fail-file", str(fail), health=FAST_HEALTH)
    key = PREFIX + "0-1"
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        reader(etcd.endpoint) as r,
        watching(r.client, PREFIX) as changes,
        registered(tmp_path, etcd.endpoint) as sup,
    ):
        svc = await sup.add_service(spec)
        await svc.wait_ready(WAIT)
        first = svc.workers[0].pid
        await wait_for(lambda: has_pid(changes, key, lambda p: p == first), WAIT, "first pid")
        fail.touch()
        # the failing worker is replaced; the new one fails too until the file goes
        await wait_for(lambda: svc.workers[0].pid not in (0, first), WAIT, "a new process")
        fail.unlink()
        await wait_for(lambda: has_pid(changes, key, lambda p: p != first), WAIT, "new pid")
        values = puts(changes, key)
        failing = [i for i, v in enumerate(values) if v["health"] == "failing"]
        assert failing, f"the key never showed health failing: {values}"
        assert values[failing[0]]["pid"] == first
        stopping = [v for v in values if v["state"] == "stopping"]
        assert stopping and all(not v["ready"] for v in stopping)
        assert stopping[0]["health"] == "failing"
        assert deletes(changes, key) == [], "the key was deleted while the slot restarted"
        assert [c.key for c in changes] == [key] * len(changes)  # one slot, one key


async def test_crashes_rewrite_the_key_through_backoff_and_never_delete_it(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    key = PREFIX + "0-1"
    # the first quick failure restarts at once, the second waits CRASH_BACKOFF in BACKOFF
    spec = worker_spec(
        "web",
        "--ready-delay",
        str(READY_DELAY),  # the key shows "starting" for a while, even on a busy machine
        backoff=dataclasses.replace(FAST_BACKOFF, first_delay=CRASH_BACKOFF),
    )
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        reader(etcd.endpoint) as r,
        watching(r.client, PREFIX) as changes,
        registered(tmp_path, etcd.endpoint) as sup,
    ):
        svc = await sup.add_service(spec)
        await svc.wait_ready(WAIT)
        pids = [svc.workers[0].pid]
        await wait_for(lambda: has_pid(changes, key, lambda p: p == pids[0]), WAIT, "first pid")
        seen = len(changes)
        for _ in range(2):
            os.kill(pids[-1], signal.SIGKILL)
            await wait_for(
                lambda: has_pid(changes, key, lambda p: p not in pids), WAIT, "a new ready pid"
            )
            pids.append(svc.workers[0].pid)
        after = puts(changes[seen:], key)
        restarting = [v for v in after if not v["ready"]]
        assert [v["state"] for v in restarting if v["state"] != "exited"] == [
            "starting",  # crash 1: restarted at once, the new pid written while it loads
            "backoff",  # crash 2: waiting, no process
            "starting",
        ], after
        assert [v["pid"] for v in restarting if v["state"] == "starting"] == pids[1:]
        assert [v["pid"] for v in restarting if v["state"] == "backoff"] == [0]
        assert deletes(changes, key) == [], "the key was deleted while the slot restarted"


async def test_a_crash_the_policy_does_not_restart_deletes_the_key(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        reader(etcd.endpoint) as r,
        registered(tmp_path, etcd.endpoint) as sup,
    ):
        svc = await sup.add_service(worker_spec("web", restart="never"))
        await svc.wait_ready(WAIT)
        await eventually(lambda: r.exactly(PREFIX, 1), WAIT, "the key")
        os.kill(svc.workers[0].pid, signal.SIGKILL)
        await eventually(lambda: _no_key(r), WAIT, "no key once it stays exited")
        assert svc.workers[0].status().leaving


async def test_stops_for_good_delete_keys_before_the_signal(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    # a long deregister_delay holds the stop signal: the key must go within it
    spec = worker_spec("web", count=2, deregister_delay=WAIT)
    async with (
        asyncio.timeout(TEST_TIMEOUT * 2),
        reader(etcd.endpoint) as r,
        registered(tmp_path, etcd.endpoint) as sup,
    ):
        svc = await sup.add_service(spec)
        await svc.wait_ready(WAIT)
        await eventually(lambda: r.exactly(PREFIX, 2), WAIT, "two keys")
        doomed = next(w for w in svc.workers if w.index == 1)
        pid = doomed.pid
        # scale down: key 1-1 goes while its process still runs (held by the delay)
        scaling = asyncio.create_task(svc.scale(1))
        await eventually(lambda: r.exactly(PREFIX, 1), WAIT, "key 1-1 deleted")
        assert psutil.pid_exists(pid) and doomed.state.value == "stopping"
        assert not scaling.done()
        os.kill(pid, signal.SIGKILL)  # spare the test the rest of the delay
        await scaling
        assert list(await r.keys(PREFIX)) == [PREFIX + "0-1"]

        # a reload: the old generation's key goes, the new one's stays
        await svc.apply_live(dataclasses.replace(svc.spec, deregister_delay=0.0))
        await svc.reload()
        keys: dict[str, dict[str, Any]] = await eventually(
            lambda: _only_key(r, PREFIX + "0-2"), WAIT, "only the new generation's key"
        )
        value = keys[PREFIX + "0-2"]
        assert value["ready"] and value["generation"] == 2

        # stop: no key left
        await svc.stop()
        await eventually(lambda: _no_key(r), WAIT, "no key after stop")


async def _only_key(r: Reader, key: str) -> dict[str, dict[str, Any]] | None:
    """The keys under PREFIX once `key` is the only one."""
    keys = await r.keys(PREFIX)
    return keys if list(keys) == [key] else None


async def _no_key(r: Reader) -> bool | None:
    return await r.keys(PREFIX) == {} or None


@pytest.mark.slow
async def test_through_the_agent_health_failing_reaches_etcd(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    """The audit's black-box view: a real svcd, a worker whose /healthz turns 500."""
    port = free_port()
    fail = tmp_path / "fail"
    services = f"""
[services.api]
command = {worker_command("--health-fail-file", str(fail))}
count = 1
listen = ["tcp://127.0.0.1:{port}"]
graceful_timeout = 5

[services.api.health]
kind = "http"
path = "/healthz"
interval = 0.3
timeout = 0.2
rise = 1
fall = 1
"""
    registry = f'\n[registry]\nendpoints = ["{etcd.endpoint}"]\nprefix = "/lc"\nttl = 5\n'
    prefix = "/lc/services/api/test-agent/"
    key = prefix + "0-1"
    agent = AgentProcess(tmp_path, services, registry=registry)
    async with reader(etcd.endpoint) as r, watching(r.client, prefix) as changes:
        await asyncio.to_thread(agent.start)
        try:
            value: dict[str, Any] = await eventually(lambda: r.value(key), WAIT, "its key")
            await wait_for(lambda: has_pid(changes, key, lambda p: p > 0), WAIT, "ready key")
            first = next(v["pid"] for v in puts(changes, key) if v["ready"])
            fail.touch()
            await wait_for(
                lambda: any(v["health"] == "failing" for v in puts(changes, key)),
                WAIT, '"health": "failing" in etcd',
            )
            fail.unlink()
            await wait_for(lambda: has_pid(changes, key, lambda p: p != first), WAIT, "new pid")
            assert deletes(changes, key) == [], "the key was deleted while the slot restarted"
            # svctl stop: now it goes
            out = await asyncio.to_thread(agent.svctl, "stop", "api")
            assert out.returncode == 0, out.stderr
            await wait_for(lambda: deletes(changes, key), WAIT, "the key deleted at stop")
            assert value["addr"] == f"127.0.0.1:{port}"
        except BaseException:
            print(agent.stderr())
            print(json.dumps([c.__dict__ for c in changes], indent=1))
            raise
        finally:
            await asyncio.to_thread(agent.stop)
