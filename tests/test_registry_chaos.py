"""The registry through etcd outages: hung, restarted, wiped; and its agent killed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.events import EventBus
from supervisor.status import ServiceStatus
from tests.etcd_fixture import EtcdServer
from tests.registry_helpers import (
    Reader,
    Settings,
    event_types,
    eventually,
    reader,
    running,
    service,
    worker,
)
from tests.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parent.parent
TTL = 2
#: keys of the agent in these tests: the agent key and two workers
N_KEYS = 3
#: SPEC/issue 6: everything re-registered within 2 s of etcd answering again
RECOVERY = 2.0


def _services() -> list[ServiceStatus]:
    return [service("api", [worker("api", 0), worker("api", 1)])]


async def _registered(r: Reader, lease: int) -> bool | None:
    """All keys present, all on `lease` (the registry's current one)."""
    _, items = await r.client.get_prefix("/svcd/")
    return (len(items) == N_KEYS and {kv.lease for kv in items} == {lease}) or None


async def test_etcd_hung_then_resumed_reregisters(etcd: EtcdServer) -> None:
    bus = EventBus()
    settings = Settings((etcd.endpoint,), ttl=TTL, timeout=0.5)
    async with running(settings, bus=bus) as reg:
        reg.publish(_services())
        async with reader(etcd.endpoint) as r:
            await eventually(lambda: _registered(r, reg.lease_id), what="registered")
        old_lease = reg.lease_id
        etcd.pause()
        try:
            await wait_for(lambda: reg.state == "disconnected", timeout=5, what="disconnected")
            assert "registry_disconnected" in event_types(bus)
            # stay hung past the TTL: the lease expires inside etcd
            await asyncio.sleep(TTL + 1)  # the outage's length, not a wait for a condition
        finally:
            etcd.resume()
        resumed = time.monotonic()
        async with reader(etcd.endpoint, timeout=RECOVERY) as r:
            await eventually(
                lambda: _registered(r, reg.lease_id), within=RECOVERY, what="re-registered"
            )
        assert time.monotonic() - resumed <= RECOVERY + 0.5
        assert reg.lease_id != old_lease
        assert reg.state == "connected"
        assert event_types(bus)[-2:] == ["registry_disconnected", "registry_connected"]


async def test_etcd_restarted_keeps_lease(etcd: EtcdServer) -> None:
    settings = Settings((etcd.endpoint,), ttl=10, timeout=0.5)
    async with running(settings) as reg:
        reg.publish(_services())
        assert await reg.wait_synced(10)
        lease = reg.lease_id
        etcd.stop()
        await wait_for(lambda: reg.state == "disconnected", timeout=10, what="disconnected")
        etcd.start()
        await wait_for(lambda: reg.state == "connected", timeout=10, what="reconnected")
        async with reader(etcd.endpoint) as r:
            await eventually(lambda: _registered(r, lease), what="same lease, same keys")
        # a change made after the outage still lands
        reg.publish([])
        assert await reg.wait_synced(10)
        async with reader(etcd.endpoint) as r:
            assert list(await r.keys("/svcd/")) == ["/svcd/agents/web-1"]


async def test_etcd_wiped_reregisters(etcd: EtcdServer) -> None:
    settings = Settings((etcd.endpoint,), ttl=TTL, timeout=0.5)
    async with running(settings) as reg:
        reg.publish(_services())
        assert await reg.wait_synced(10)
        etcd.wipe()
        async with reader(etcd.endpoint) as r:
            assert await r.keys("/svcd/") == {}
            await eventually(
                lambda: _registered(r, reg.lease_id), within=15, what="registered again"
            )


async def test_publish_during_outage_lands_after(etcd: EtcdServer) -> None:
    settings = Settings((etcd.endpoint,), ttl=10, timeout=0.5)
    async with running(settings) as reg:
        reg.publish(_services())
        assert await reg.wait_synced(10)
        etcd.stop()
        await wait_for(lambda: reg.state == "disconnected", timeout=10, what="disconnected")
        reg.publish([service("api", [worker("api", 0)])])  # worker 1 stopped meanwhile
        assert not await reg.wait_synced(0.2)
        etcd.start()
        assert await reg.wait_synced(15)
        async with reader(etcd.endpoint) as r:
            assert sorted(await r.keys("/svcd/")) == [
                "/svcd/agents/web-1",
                "/svcd/services/api/web-1/0-1",
            ]


AGENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, sys.argv[1])
    from agent.registry import Registry
    from supervisor.events import EventBus
    from tests.registry_helpers import Settings, service, worker

    async def main():
        settings = Settings((sys.argv[2],), ttl=int(sys.argv[3]))
        reg = Registry(settings, "doomed", "", EventBus(), "0")
        reg.publish([service("api", [worker("api", 0), worker("api", 1)])])
        await reg.run()

    asyncio.run(main())
    """
)


@pytest.fixture
def agent_process(etcd: EtcdServer) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", AGENT_SCRIPT, str(REPO), etcd.endpoint, str(TTL)],
        cwd=REPO,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


async def test_agent_killed_keys_gone_within_ttl(
    etcd: EtcdServer, agent_process: subprocess.Popen[bytes]
) -> None:
    async def registered() -> bool | None:
        assert agent_process.poll() is None, "the agent process died"
        return await r.exactly("/svcd/", N_KEYS) is not None or None

    async with reader(etcd.endpoint) as r:
        await eventually(registered, within=30, what="agent registered")
        os.kill(agent_process.pid, signal.SIGKILL)
        agent_process.wait(timeout=10)
        killed = time.monotonic()
        await eventually(lambda: _empty(r), within=TTL + 1, what="keys expired")
        assert time.monotonic() - killed <= TTL + 1.5


async def _empty(r: Reader) -> bool | None:
    return (await r.keys("/svcd/") == {}) or None
