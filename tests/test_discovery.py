"""Discovery: endpoints across agents, the watch-backed cache, `svctl discover` output."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

from agent.discovery import (
    EXIT_FAILED,
    EXIT_OK,
    DiscoveryClient,
    Endpoint,
    EtcdAccess,
    WorkerRecord,
    discover,
    discover_json,
    discover_main,
    discover_table,
    endpoints_from,
)
from tests.etcd_fixture import EtcdServer
from tests.registry_helpers import Settings, running, service, with_worker, worker

pytestmark = pytest.mark.timeout(60)


def record(agent: str, addr: str, index: int = 0, **kw: object) -> WorkerRecord:
    fields: dict[str, object] = {"ready": True, "health": "passing", "state": "running"}
    fields.update(kw)
    return WorkerRecord(
        key=f"/svcd/services/api/{agent}/{index}-1",
        service="api",
        agent=agent,
        worker=f"api:{index}",
        addr=addr,
        pid=100 + index,
        generation=1,
        started_at=0.0,
        **fields,  # type: ignore[arg-type]
    )


def test_endpoints_grouped_by_addr_usable_only() -> None:
    records = [
        record("web-1", "10.0.0.1:80", 0),
        record("web-1", "10.0.0.1:80", 1, health="unknown"),
        record("web-1", "10.0.0.1:80", 2, health="failing"),
        record("web-1", "10.0.0.1:80", 3, ready=False, state="starting"),
        record("web-2", "10.0.0.2:80", 0, health="unknown"),
        record("web-3", "10.0.0.3:80", 0, health="failing"),
        record("web-4", "", 0),
    ]
    assert endpoints_from(records) == [
        Endpoint("10.0.0.1:80", "web-1", 2, "passing"),
        Endpoint("10.0.0.2:80", "web-2", 1, "unknown"),
    ]


def test_json_and_table_output() -> None:
    eps = [Endpoint("10.0.0.1:80", "web-1", 2, "passing")]
    assert json.loads(discover_json("api", eps)) == {
        "service": "api",
        "endpoints": [{"addr": "10.0.0.1:80", "agent": "web-1", "workers": 2, "health": "passing"}],
    }
    table = discover_table("api", eps).splitlines()
    assert table[0].split() == ["ADDR", "AGENT", "WORKERS", "HEALTH"]
    assert table[1].split() == ["10.0.0.1:80", "web-1", "2", "passing"]
    assert "no usable endpoints" in discover_table("api", [])


def test_malformed_value_ignored() -> None:
    assert WorkerRecord.parse("/k", b"not json") is None
    assert WorkerRecord.parse("/k", b'{"service": "api"}') is None


def test_discovery_does_not_import_supervisor() -> None:
    code = (
        "import sys, agent.discovery; "
        "bad = [m for m in sys.modules if m.split('.')[0] == 'supervisor']; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


async def test_two_agents_seen_through_discover(etcd: EtcdServer) -> None:
    settings = Settings((etcd.endpoint,))
    api1 = service("api", [worker("api", 0), worker("api", 1)], advertise="10.0.0.1:8080")
    api2 = service("api", [worker("api", 0)], advertise="10.0.0.2:8080")
    other = service("api-admin", [worker("api-admin", 0)], listen=("tcp://127.0.0.1:9000",))
    async with running(settings, "web-1") as a, running(settings, "web-2") as b:
        a.publish([api1, other])
        b.publish([api2])
        assert await a.wait_synced(10)
        assert await b.wait_synced(10)
        found = await discover(EtcdAccess((etcd.endpoint,)), "api")
    assert found == [
        Endpoint("10.0.0.1:8080", "web-1", 2, "passing"),
        Endpoint("10.0.0.2:8080", "web-2", 1, "passing"),
    ]


async def _next(it: AsyncIterator[list[Endpoint]]) -> list[Endpoint]:
    return await asyncio.wait_for(anext(it), 10)


async def test_watch_follows_changes(etcd: EtcdServer) -> None:
    settings = Settings((etcd.endpoint,))
    api = service("api", [worker("api", 0)], advertise="10.0.0.1:8080")
    async with (
        running(settings, "web-1") as reg,
        DiscoveryClient(EtcdAccess((etcd.endpoint,))) as dc,
    ):
        assert await dc.endpoints("api") == []
        it = aiter(dc.watch("api"))
        try:
            assert await _next(it) == []
            reg.publish([api])
            assert await _next(it) == [Endpoint("10.0.0.1:8080", "web-1", 1, "passing")]
            reg.publish([with_worker(api, 0, health="failing")])
            assert await _next(it) == []
            reg.publish([with_worker(api, 0, health="unknown")])
            assert await _next(it) == [Endpoint("10.0.0.1:8080", "web-1", 1, "unknown")]
            assert await dc.endpoints("api") == [Endpoint("10.0.0.1:8080", "web-1", 1, "unknown")]
            reg.publish([])
            assert await _next(it) == []
        finally:
            await it.aclose()  # type: ignore[attr-defined]


@pytest.mark.slow
async def test_watch_survives_etcd_wipe(etcd: EtcdServer) -> None:
    settings = Settings((etcd.endpoint,), ttl=2, timeout=0.5)
    api = service("api", [worker("api", 0)], advertise="10.0.0.1:8080")
    access = EtcdAccess((etcd.endpoint,), timeout=2)
    async with running(settings, "web-1") as reg, DiscoveryClient(access) as dc:
        reg.publish([api])
        assert await reg.wait_synced(10)
        it = aiter(dc.watch("api"))
        try:
            assert len(await _next(it)) == 1
            etcd.wipe()
            # the registry writes everything again into the new, empty cluster (its
            # revisions restart at 1, often up to the old head); the cache must notice the
            # new cluster, read again and follow. The wipe right after the first read
            # used to kill the first watch stream before etcd confirmed it, so etcd3aio's
            # silent re-open went unnoticed and resumed above the re-registration
            reg.publish([api, service("db", [worker("db", 0)])])
            reg.publish([with_worker(api, 0, health="unknown")])
            assert await asyncio.wait_for(_until_health(it, "unknown"), 30)
        finally:
            await it.aclose()  # type: ignore[attr-defined]


async def _until_health(it: AsyncIterator[list[Endpoint]], health: str) -> bool:
    async for eps in it:
        if eps and eps[0].health == health:
            return True
    return False


async def test_discover_main_json(etcd: EtcdServer) -> None:
    settings = Settings((etcd.endpoint,))
    out: list[str] = []
    async with running(settings, "web-1") as reg:
        reg.publish([service("api", [worker("api", 0)], advertise="10.0.0.1:8080")])
        assert await reg.wait_synced(10)
        code = await discover_main(
            EtcdAccess((etcd.endpoint,)), "api", as_json=True, write=out.append
        )
    assert code == EXIT_OK
    assert json.loads(out[0]) == {
        "service": "api",
        "endpoints": [
            {"addr": "10.0.0.1:8080", "agent": "web-1", "workers": 1, "health": "passing"}
        ],
    }


async def test_discover_main_unreachable(port: int) -> None:
    errors: list[str] = []
    access = EtcdAccess((f"http://127.0.0.1:{port}",), timeout=0.5)
    code = await discover_main(access, "api", write=errors.append, error=errors.append)
    assert code == EXIT_FAILED
    assert "cannot read etcd" in errors[0]
