"""Rolling reload under real load: zero failed requests, rollback, interruptions, listeners."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from pathlib import Path

import pytest

from supervisor.errors import ReloadFailed
from supervisor.spec import HealthSpec
from supervisor.states import WorkerState
from tests.conftest import free_port
from tests.programs.harness import (
    FAST_BACKOFF,
    Load,
    events_of,
    http_get,
    listen,
    port_of,
    running,
    worker_spec,
)
from tests.waiting import wait_for

TEST_TIMEOUT = 60
RELOADS = 3


def pids(svc: object) -> dict[int, int]:
    return {w.index: w.pid for w in svc.workers}  # type: ignore[attr-defined]


async def test_rolling_reload_under_load_drops_nothing(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("web", count=2)
        svc = await sup.add_service(spec)
        await svc.wait_ready(10)
        load = Load(port_of(spec))
        load.start()
        try:
            await load.wait_requests(50)
            for n in range(RELOADS):
                before = pids(svc)
                lines: list[str] = []
                await svc.reload(progress=lines.append)
                after = pids(svc)
                assert set(after) == {0, 1} and len(svc.workers) == 2
                assert all(after[i] != before[i] for i in after), (before, after)
                assert svc.generation == n + 2
                assert all(w.generation == n + 2 and w.ready for w in svc.workers)
                assert any("ready" in line for line in lines)
                await load.wait_requests(50)
        finally:
            await load.stop()
        assert load.failed == 0, load.errors
        assert len(load.pids) >= 2 * (RELOADS + 1)
        assert len(events_of(sup.events, "reloaded")) == RELOADS
        assert svc.status().reloads == RELOADS


@pytest.mark.parametrize(
    ("args", "changes", "reason"),
    [
        (("--exit-code", "1"), {}, "exited with code 1"),
        (("--never-ready",), {"ready_timeout": 0.5}, "not ready within 0.5s"),
    ],
    ids=["exits-at-once", "never-ready"],
)
async def test_failed_generation_is_rolled_back(
    tmp_path: Path, args: tuple[str, ...], changes: dict[str, float], reason: str
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("web", count=2)
        svc = await sup.add_service(spec)
        await svc.wait_ready(10)
        before = pids(svc)
        load = Load(port_of(spec))
        load.start()
        try:
            await load.wait_requests(30)
            broken = dataclasses.replace(
                spec, command=(*spec.command, *args), **changes  # type: ignore[arg-type]
            )
            with pytest.raises(ReloadFailed) as failed:
                await svc.reload(broken)
            assert reason in failed.value.reason
            await load.wait_requests(30)
        finally:
            await load.stop()
        assert load.failed == 0, load.errors
        assert pids(svc) == before
        assert svc.generation == 1 and svc.spec == spec
        assert all(w.generation == 1 and w.ready for w in svc.workers)
        assert len(svc.workers) == 2  # the new ones are gone
        assert events_of(sup.events, "reload_failed")[0].message == failed.value.reason


async def test_failure_in_a_later_slot_rolls_earlier_slots_back(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("web", count=3)
        svc = await sup.add_service(spec)
        await svc.wait_ready(10)
        before = pids(svc)
        load = Load(port_of(spec))
        load.start()
        try:
            await load.wait_requests(30)
            broken = dataclasses.replace(spec, command=(*spec.command, "--fail-worker", "1"))
            with pytest.raises(ReloadFailed, match="web:1"):
                await svc.reload(broken)
            await load.wait_requests(30)
        finally:
            await load.stop()
        assert load.failed == 0, load.errors
        after = pids(svc)
        assert after[1] == before[1] and after[2] == before[2]  # never touched
        assert after[0] != before[0]  # rolled to gen 2, then back to gen 1
        assert all(w.generation == 1 and w.ready for w in svc.workers)
        assert len(svc.workers) == 3


async def test_max_unavailable_without_surge(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("web", count=2, max_surge=0, max_unavailable=1)
        svc = await sup.add_service(spec)
        await svc.wait_ready(10)
        before = pids(svc)
        load = Load(port_of(spec))
        load.start()
        try:
            await load.wait_requests(30)
            await svc.reload()
            await load.wait_requests(30)
        finally:
            await load.stop()
        # a client arriving while a slot is down is queued or served by the other one
        assert load.failed == 0, load.errors
        assert all(pids(svc)[i] != before[i] for i in before)


async def test_reload_during_crash_loop_replaces_it(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        good = worker_spec("web", count=2)
        crashing = dataclasses.replace(good, command=(*good.command, "--exit-code", "1"))
        svc = await sup.add_service(crashing)
        await wait_for(lambda: events_of(sup.events, "backoff"), 10, "crash loop")
        await svc.reload(good)
        assert all(w.ready and w.generation == 2 for w in svc.workers)
        status, _ = await http_get(port_of(good))
        assert status == 200


async def test_failed_reload_during_crash_loop_keeps_old_spec(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        base = worker_spec("web")
        crashing = dataclasses.replace(base, command=(*base.command, "--exit-code", "1"))
        also_bad = dataclasses.replace(base, command=(*base.command, "--exit-code", "2"))
        svc = await sup.add_service(crashing)
        await wait_for(lambda: events_of(sup.events, "backoff"), 10, "crash loop")
        with pytest.raises(ReloadFailed, match="exited with code 2"):
            await svc.reload(also_bad)
        assert svc.spec == crashing and svc.generation == 1
        worker = svc.workers[0]
        assert worker.generation == 1 and worker.supervising  # back to its restart loop
        await wait_for(lambda: worker.restarts >= 1, 10, "the old spec restarts")


async def test_stop_interrupts_a_reload(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("web", count=2)
        svc = await sup.add_service(spec)
        await svc.wait_ready(10)
        slow = dataclasses.replace(spec, command=(*spec.command, "--never-ready"))
        reload = asyncio.create_task(svc.reload(slow))
        queued = asyncio.create_task(svc.reload())  # waits for the first one
        await wait_for(
            lambda: any(w.generation == 2 and w.pid for w in svc.workers), 10, "gen 2 started"
        )
        assert svc.status().state == "reloading"
        await svc.stop()
        with pytest.raises(ReloadFailed, match="interrupted"):
            await reload
        with pytest.raises(ReloadFailed, match="interrupted"):
            await queued
        assert svc.workers == [] and svc.status().state == "stopped"
        assert svc.spec == spec and svc.generation == 1
        # and it starts again with the old spec
        await svc.start()
        await svc.wait_ready(10)


async def test_reloads_are_serialized(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("web", count=1)
        svc = await sup.add_service(spec)
        await svc.wait_ready(10)
        await asyncio.gather(svc.reload(), svc.reload(), svc.scale(2))
        assert svc.generation == 3 and svc.spec.count == 2
        await svc.wait_ready(10)
        starts = [e for e in sup.events.history() if e.type in ("reload_started", "reloaded")]
        assert [e.type for e in starts] == [
            "reload_started", "reloaded", "reload_started", "reloaded"]


async def test_listener_added_and_removed_by_reload(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("web", count=1)
        svc = await sup.add_service(spec)
        await svc.wait_ready(10)
        old_port, new_port = port_of(spec), free_port()
        both = dataclasses.replace(spec, listen=(*spec.listen, listen(new_port)))
        await sup.update_service(both)
        assert (await http_get(old_port))[0] == 200
        assert (await http_get(new_port))[0] == 200
        only_new = dataclasses.replace(spec, listen=(listen(new_port),))
        load = Load(new_port)
        load.start()
        try:
            await sup.update_service(only_new)
            await load.wait_requests(20)
        finally:
            await load.stop()
        assert load.failed == 0, load.errors
        with pytest.raises(ConnectionRefusedError):
            await http_get(old_port)
        assert sup.listeners.urls == [f"tcp://127.0.0.1:{new_port}"]


async def test_reload_to_a_taken_port_fails_cleanly(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        a = await sup.add_service(worker_spec("a"))
        b_spec = worker_spec("b")
        await sup.add_service(b_spec)
        await a.wait_ready(10)
        before = pids(a)
        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen()
            taken = blocker.getsockname()[1]
            bad = dataclasses.replace(a.spec, listen=(*a.spec.listen, listen(taken)))
            with pytest.raises(ReloadFailed, match="in use"):
                await a.reload(bad)
        assert pids(a) == before and a.generation == 1


async def test_health_only_change_applies_live(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec(
            "web", count=2, health=HealthSpec(kind="http", interval=0.2, rise=1, fall=3)
        )
        svc = await sup.add_service(spec)
        await svc.wait_ready(10)
        before = pids(svc)
        faster = dataclasses.replace(
            spec,
            health=dataclasses.replace(spec.health, interval=0.1, fall=2),
            backoff=dataclasses.replace(FAST_BACKOFF, max=2.0),
        )
        assert not spec.needs_rollout(faster)
        await sup.update_service(faster)
        assert pids(svc) == before and svc.generation == 1
        assert all(w.spec.health.interval == 0.1 for w in svc.workers)
        await wait_for(
            lambda: all(w.health == "passing" for w in svc.workers), 5, "checks run again"
        )
        # count alone is live too: scales
        await sup.update_service(dataclasses.replace(faster, count=3))
        await svc.wait_ready(10)
        assert pids(svc)[0] == before[0] and len(svc.workers) == 3


async def test_reload_with_a_new_count(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("web", count=2)
        svc = await sup.add_service(spec)
        await svc.wait_ready(10)
        changed = dataclasses.replace(spec, count=3, env={"X": "1"})
        await svc.reload(changed)
        assert sorted(pids(svc)) == [0, 1, 2]
        assert all(w.generation == 2 and w.ready for w in svc.workers)
        fewer = dataclasses.replace(changed, count=1, env={"X": "2"})
        await svc.reload(fewer)
        assert list(pids(svc)) == [0] and svc.workers[0].generation == 3


async def test_reload_of_a_stopped_service_only_adopts_the_spec(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("web")
        svc = await sup.add_service(spec, start=False)
        changed = dataclasses.replace(spec, env={"X": "1"})
        await svc.reload(changed)
        assert svc.workers == [] and svc.spec == changed and svc.generation == 2
        await svc.start()
        await svc.wait_ready(10)
        assert svc.workers[0].generation == 2
        assert svc.workers[0].state is WorkerState.RUNNING
