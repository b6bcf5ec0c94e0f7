"""A service of N workers: start/stop/restart, scale under load, derived state, logs."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from supervisor.states import WorkerState
from tests.programs.harness import Load, events_of, port_of, running, worker_spec
from tests.waiting import wait_for

TEST_TIMEOUT = 60


async def test_start_stop_restart(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("web", count=2)
        svc = await sup.add_service(spec, start=False)
        assert svc.status().state == "stopped" and svc.status().desired == 0
        await svc.start()
        await svc.wait_ready(10)
        status = svc.status()
        assert (status.state, status.desired, status.ready, status.generation) == (
            "running", 2, 2, 1)
        assert [w.worker for w in status.workers] == ["web:0", "web:1"]
        assert all(w.pid > 0 and w.state == "running" and w.ready for w in status.workers)
        assert status.listen == (f"127.0.0.1:{port_of(spec)}",)
        first = {w.index: w.pid for w in svc.workers}
        await svc.start()  # idempotent: running workers are left alone
        assert {w.index: w.pid for w in svc.workers} == first
        await svc.restart()
        await svc.wait_ready(10)
        second = {w.index: w.pid for w in svc.workers}
        assert all(second[i] != first[i] for i in first)
        await svc.stop()
        assert svc.status().state == "stopped" and svc.workers == []
        assert sup.listeners.get(spec.listen[0].url) is not None  # still bound
        # one row per slot stays, as supervisorctl shows a stopped program
        rows = [(w.worker, w.pid, w.state, w.ready, w.leaving) for w in svc.status().workers]
        assert rows == [(f"{spec.name}:{i}", 0, "exited", False, True) for i in range(spec.count)]


async def test_scale_up_and_down_under_load(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("web", count=1)
        svc = await sup.add_service(spec)
        await svc.wait_ready(10)
        load = Load(port_of(spec))
        load.start()
        try:
            await load.wait_requests(30)
            await svc.scale(3)
            await svc.wait_ready(10)
            assert sorted(w.index for w in svc.workers) == [0, 1, 2]
            await load.wait_requests(30)
            await svc.scale(1)
            assert [w.index for w in svc.workers] == [0]  # the highest slots drained
            await load.wait_requests(30)
        finally:
            await load.stop()
        assert load.failed == 0, load.errors
        assert len(load.pids) >= 2
        scaled = events_of(sup.events, "scaled")
        assert [(e.fields["from"], e.fields["to"]) for e in scaled] == [(1, 3), (3, 1)]
        assert svc.status().desired == 1


async def test_wait_ready_times_out(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        svc = await sup.add_service(worker_spec("slow", "--never-ready"))
        with pytest.raises(TimeoutError):
            await svc.wait_ready(0.3)
        assert svc.status().state == "starting"


async def test_state_follows_workers(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("bad", "--exit-code", "1")
        slow = dataclasses.replace(spec.backoff, first_delay=0.5, max=0.5, start_limit=4,
                                   fatal_retry=30.0)
        svc = await sup.add_service(dataclasses.replace(spec, backoff=slow))
        await wait_for(lambda: svc.status().state == "backoff", 10, "backoff")
        await wait_for(lambda: svc.status().state == "fatal", 10, "fatal")
        # stop cancels the slow retry at once
        await svc.stop()
        assert svc.status().state == "stopped"
        assert events_of(sup.events, "stopped", "bad:0")


async def test_min_ready(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("web", count=2, min_ready=1)
        svc = await sup.add_service(spec)
        await svc.wait_ready(10)
        assert svc.status().required_ready == 1
        await svc.workers[1].stop()
        assert svc.status().state == "running"  # one ready worker is enough


async def test_logs_are_captured(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        svc = await sup.add_service(worker_spec("web", count=2))
        await svc.wait_ready(10)
        await wait_for(lambda: len(svc.logs.tail(10)) >= 2, 5, "two start lines")
        lines = svc.logs.tail(10)
        assert {line.worker for line in lines} == {0, 1}
        assert all("serving" in line.line for line in lines)
        assert (tmp_path / "logs" / "web.log").exists()


async def test_stop_of_one_worker_does_not_restart_it(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        svc = await sup.add_service(worker_spec("web", count=2))
        await svc.wait_ready(10)
        worker = svc.workers[0]
        await worker.stop()
        assert worker.state is WorkerState.EXITED and not worker.supervising
        await svc.start()  # brings the slot back
        await svc.wait_ready(10)
        assert worker.ready
