"""The Supervisor: services come and go, errors are named, and the agent never dies."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from pathlib import Path

import pytest

from supervisor import worker as worker_module
from supervisor.errors import ListenerError, UnknownService
from supervisor.events import Event, EventBus
from supervisor.stats import TreeSampler
from supervisor.supervisor import Supervisor
from tests.programs.harness import events_of, http_get, listen, port_of, running, worker_spec
from tests.waiting import wait_for

TEST_TIMEOUT = 60


async def test_add_update_remove(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("web", count=2)
        svc = await sup.add_service(spec)
        assert sup.services["web"] is svc
        await svc.wait_ready(10)
        assert [s.name for s in sup.status()] == ["web"]
        await sup.update_service(dataclasses.replace(spec, env={"V": "2"}))
        assert svc.generation == 2
        await sup.remove_service("web")
        assert "web" not in sup.services
        assert sup.listeners.urls == []  # every acquire of every generation released
        with pytest.raises(ConnectionRefusedError):
            await http_get(port_of(spec))  # the listener is closed with its last service
        with pytest.raises(UnknownService):
            await sup.remove_service("web")
        with pytest.raises(UnknownService):
            await sup.update_service(spec)


async def test_port_in_use_is_a_listener_error(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            spec = dataclasses.replace(worker_spec("web"), listen=(listen(port),))
            with pytest.raises(ListenerError, match="in use"):
                await sup.add_service(spec)
        assert "web" not in sup.services
        await sup.add_service(worker_spec("other"), start=False)
        with pytest.raises(ValueError, match="exists"):
            await sup.add_service(worker_spec("other"))


async def test_close_stops_services_in_parallel(tmp_path: Path) -> None:
    bus = EventBus()
    sup = Supervisor(bus, tmp_path / "logs", notify_dir=tmp_path / "n")
    await sup.start()
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            for name in ("a", "b"):
                svc = await sup.add_service(
                    worker_spec(name, "--ignore-term", graceful_timeout=1.0))
                await svc.wait_ready(10)
            await sup.close()
    finally:
        await sup.close()
        await sup.close_reaper()
    kinds = [(e.type, e.service) for e in bus.history() if e.type in ("stopping", "exited")]
    # both were asked to stop before either had to be killed: in parallel, not in turn
    assert {kinds[0], kinds[1]} == {("stopping", "a"), ("stopping", "b")}
    assert sup.services == {}


async def test_a_supervision_bug_is_contained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real_sample = TreeSampler.sample

    def flaky_sample(self: TreeSampler) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("simulated bug in the sampler")
        return real_sample(self)

    # the class is shared with supervisor.worker (which imports it by name)
    assert worker_module.TreeSampler is TreeSampler  # type: ignore[attr-defined]
    monkeypatch.setattr(TreeSampler, "sample", flaky_sample)
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        spec = worker_spec("web")
        svc = await sup.add_service(spec)
        worker = svc.workers[0]

        def killed_by_the_bug() -> list[Event]:
            return [e for e in events_of(sup.events, "exited") if e.message == "supervision error"]

        # the bug hits at the first sample (as the worker becomes ready): the worker is
        # killed and started again, and the agent goes on
        await wait_for(killed_by_the_bug, 15, "the bug contained")
        await wait_for(lambda: worker.ready, 15, "recovered")
        assert worker.pid != killed_by_the_bug()[0].pid
        status, _ = await http_get(port_of(spec))
        assert status == 200


async def test_a_raising_event_consumer_does_not_hurt(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running(tmp_path) as sup:
        svc = await sup.add_service(worker_spec("web"))
        await svc.wait_ready(10)
        worker = svc.workers[0]
        first = worker.pid

        def broken() -> None:
            raise RuntimeError("a consumer bug")

        worker._on_change = broken
        worker.replace("test")
        await wait_for(lambda: worker.ready and worker.pid != first, 10, "replaced anyway")


async def test_closing_the_event_bus_ends_its_followers_after_what_is_queued() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    bus.emit("stopped", service="web")
    bus.close()
    bus.emit("late", service="web")  # recorded, but nobody follows any more
    async with asyncio.timeout(TEST_TIMEOUT):
        seen = [event.type async for event in sub]
        assert seen == ["stopped"]
        assert [event.type async for event in bus.subscribe(replay=bus.history())] == [
            "stopped", "late",
        ]
