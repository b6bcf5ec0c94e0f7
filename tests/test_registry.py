"""The registry against a real etcd: keys and values as SPEC.md, rewrites, deletes."""

from __future__ import annotations

import asyncio
import json

import pytest

from agent.config import RegistrySettings
from agent.discovery import Endpoint, EtcdAccess, discover
from agent.registry import (
    CHANNEL_OPTIONS,
    MAX_TXN_OPS,
    EtcdClient,
    EtcdUnavailable,
    Registry,
    desired_keys,
    parse_endpoint,
    service_addr,
)
from supervisor.events import EventBus
from tests.etcd_fixture import EtcdServer
from tests.registry_helpers import (
    KeyChange,
    Settings,
    event_types,
    events_of,
    eventually,
    reader,
    running,
    service,
    watching,
    with_worker,
    worker,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(60)

WORKER_FIELDS = {
    "service",
    "agent",
    "worker",
    "addr",
    "pid",
    "state",
    "ready",
    "health",
    "generation",
    "started_at",
    "meta",
}


# ------------------------------------------------------------------ pure functions


def test_addr_wildcard_becomes_host_address() -> None:
    svc = service("api", [], listen=("tcp://0.0.0.0:8080",))
    assert service_addr(svc, "10.1.2.3") == "10.1.2.3:8080"
    svc = service("api", [], listen=("tcp://[::]:8080",))
    assert service_addr(svc, "10.1.2.3") == "10.1.2.3:8080"


def test_addr_specific_host_and_advertise() -> None:
    assert service_addr(service("a", [], listen=("tcp://127.0.0.1:81",)), "h") == "127.0.0.1:81"
    assert service_addr(service("a", [], listen=("127.0.0.1:81",)), "h") == "127.0.0.1:81"
    assert service_addr(service("a", [], advertise="api.example:443"), "h") == "api.example:443"
    # a bare advertised host takes the listen port
    svc = service("a", [], listen=("tcp://0.0.0.0:81",), advertise="10.9.9.9")
    assert service_addr(svc, "h") == "10.9.9.9:81"
    # unix only: no network address
    assert service_addr(service("a", [], listen=("unix:///run/a.sock",)), "h") == ""


def _values(keys: dict[str, bytes]) -> dict[str, dict[str, object]]:
    return {k.rsplit("/", 1)[1]: json.loads(v) for k, v in keys.items()}


def test_desired_keys_follow_a_slot_until_it_stops_for_good() -> None:
    svc = service(
        "api",
        [
            worker("api", 0),
            worker("api", 1, state="starting", ready=False, health="unknown"),
            # replaced in place (health failure): still registered, not ready
            worker("api", 2, state="stopping", health="failing"),
            worker("api", 3, state="backoff", ready=False, pid=0),
            # between a process's end and its replacement (a preload fork, say)
            worker("api", 4, state="exited", ready=False, pid=0),
            # stopping, or stopped, for good: no key
            worker("api", 5, state="stopping", leaving=True),
            worker("api", 6, state="exited", ready=False, pid=0, leaving=True),
            worker("api", 7, state="fatal", ready=False, pid=0),
        ],
    )
    keys = desired_keys([svc], agent="web-1", prefix="/svcd", host_address="10.0.0.1")
    values = _values(keys)
    assert sorted(values) == ["0-1", "1-1", "2-1", "3-1", "4-1"]
    seen = {k: (v["state"], v["ready"], v["health"], v["pid"]) for k, v in values.items()}
    assert seen == {
        "0-1": ("running", True, "passing", 1000),
        "1-1": ("starting", False, "unknown", 1001),
        "2-1": ("stopping", False, "failing", 1002),  # ready only while running
        "3-1": ("backoff", False, "passing", 0),
        "4-1": ("exited", False, "passing", 0),
    }


def test_a_failing_or_restarting_worker_makes_no_addr_usable() -> None:
    restarting = service(
        "api",
        [
            worker("api", 0, health="failing"),
            worker("api", 1, state="stopping"),
            worker("api", 2, state="backoff", ready=False),
            worker("api", 3, state="starting", ready=False),
        ],
    )
    keys = desired_keys(
        [restarting],
        agent="web-1",
        prefix="/svcd",
        host_address="10.0.0.1",
        grpc_naming_prefix="/grpc/",
    )
    assert len(keys) == 4
    assert not [k for k in keys if k.startswith("/grpc/")]


def test_grpc_naming_one_key_per_addr_for_usable_endpoints() -> None:
    svc = service("api", [worker("api", 0), worker("api", 1)], meta={"zone": "a"})
    failing = service("db", [worker("db", 0, health="failing")], listen=("tcp://127.0.0.1:5432",))
    keys = desired_keys(
        [svc, failing],
        agent="web-1",
        prefix="/svcd",
        host_address="10.0.0.1",
        grpc_naming_prefix="/grpc/",
    )
    naming = {k: v for k, v in keys.items() if k.startswith("/grpc/")}
    assert naming == {
        "/grpc/api/127.0.0.1:8080": b'{"Op":0,"Addr":"127.0.0.1:8080","Metadata":{"zone":"a"}}'
    }


def test_parse_endpoint() -> None:
    assert parse_endpoint("http://127.0.0.1:2379") == ("127.0.0.1", 2379, False)
    assert parse_endpoint("https://etcd.example:2380/") == ("etcd.example", 2380, True)
    assert parse_endpoint("10.0.0.1") == ("10.0.0.1", 2379, False)
    assert parse_endpoint("[::1]:2379") == ("::1", 2379, False)
    with pytest.raises(ValueError, match="port"):
        parse_endpoint("http://h:x")


async def test_an_ipv6_endpoint_is_refused_with_the_reason() -> None:
    client = EtcdClient(["http://[::1]:2379"], timeout=2)
    with pytest.raises(EtcdUnavailable, match=r"IPv6 etcd endpoints \(\[::1\]\) are not supported"):
        await client.connect()


# ------------------------------------------------------------------ against etcd


async def test_register_keys_and_values_as_spec(etcd: EtcdServer) -> None:
    bus = EventBus()
    api = service("api", [worker("api", 0), worker("api", 1)], meta={"zone": "a"})
    async with running(Settings((etcd.endpoint,)), bus=bus) as reg, reader(etcd.endpoint) as r:
        reg.publish([api])
        keys = await eventually(lambda: r.at_least("/svcd/", 3), what="agent + 2 worker keys")
        assert reg.state == "connected"
        agent = keys["/svcd/agents/web-1"]
        assert set(agent) == {"agent", "version", "started_at", "control"}
        assert agent["agent"] == "web-1"
        assert agent["version"] == "0.1.0"
        assert agent["control"] == "/run/svcd/svcd.sock"
        w0 = keys["/svcd/services/api/web-1/0-1"]
        assert set(w0) == WORKER_FIELDS
        assert w0 == {
            "service": "api",
            "agent": "web-1",
            "worker": "api:0",
            "addr": "127.0.0.1:8080",
            "pid": 1000,
            "state": "running",
            "ready": True,
            "health": "passing",
            "generation": 1,
            "started_at": 1700000000.0,
            "meta": {"zone": "a"},
        }
        assert "/svcd/services/api/web-1/1-1" in keys
        # every key on the one lease
        leases = await r.leases("/svcd/")
        assert leases == {reg.lease_id}
        assert reg.lease_id != 0
        assert event_types(bus).count("registry_connected") == 1


async def test_health_change_rewrites_value(etcd: EtcdServer) -> None:
    api = service("api", [worker("api", 0)])
    async with running(Settings((etcd.endpoint,))) as reg, reader(etcd.endpoint) as r:
        reg.publish([api])
        key = "/svcd/services/api/web-1/0-1"

        async def field_is(name: str, expected: object) -> bool | None:
            value = await r.value(key)
            return (value is not None and value[name] == expected) or None

        await eventually(lambda: r.value(key), what="worker key")
        reg.publish([with_worker(api, 0, health="failing")])
        await eventually(lambda: field_is("health", "failing"), what="health failing")
        reg.publish([with_worker(api, 0, ready=False, health="failing")])
        await eventually(lambda: field_is("ready", False), what="ready false")


async def test_worker_stopping_for_good_deregistered_and_service_removed(
    etcd: EtcdServer,
) -> None:
    api = service("api", [worker("api", 0), worker("api", 1)])
    async with running(Settings((etcd.endpoint,))) as reg, reader(etcd.endpoint) as r:
        reg.publish([api])
        await eventually(lambda: r.at_least("/svcd/services/", 2), what="2 workers")
        # stopping to be replaced: the key stays, not ready
        reg.publish([with_worker(api, 1, state="stopping")])
        assert await reg.wait_synced(5)
        value = await r.value("/svcd/services/api/web-1/1-1")
        assert value is not None and (value["state"], value["ready"]) == ("stopping", False)
        # stopping for good: deregistered while it drains
        reg.publish([with_worker(api, 1, state="stopping", leaving=True)])
        assert await reg.wait_synced(5)
        assert list(await r.keys("/svcd/services/")) == ["/svcd/services/api/web-1/0-1"]
        reg.publish([])
        assert await reg.wait_synced(5)
        assert await r.keys("/svcd/services/") == {}
        assert "/svcd/agents/web-1" in await r.keys("/svcd/agents/")


async def test_health_failing_is_written_even_when_restarted_at_once(
    etcd: EtcdServer,
) -> None:
    """A worker replaced for a failing check goes failing -> stopping -> a new process
    within milliseconds: the burst is coalesced, but the key shows failing and then
    stopping on the way, and is rewritten, never deleted."""
    key = "/svcd/services/api/web-1/0-1"
    api = service("api", [worker("api", 0)])
    async with running(Settings((etcd.endpoint,))) as reg, reader(etcd.endpoint) as r:
        reg.publish([api])
        assert await reg.wait_synced(10)
        async with watching(r.client, key) as changes:
            # one burst, no await in between (as the agent's feed may deliver it)
            reg.publish([with_worker(api, 0, health="failing")])
            reg.publish([with_worker(api, 0, state="stopping", health="failing")])
            reg.publish([with_worker(api, 0, state="backoff", ready=False, pid=0)])
            restarted = with_worker(
                api, 0, state="starting", ready=False, health="unknown", pid=2000
            )
            reg.publish([restarted])
            assert await reg.wait_synced(10)
            await wait_for(lambda: _last_pid(changes) == 2000, what="the new pid in the watch")
        assert all(c.kind == "put" for c in changes)
        seen = [(c.value["state"], c.value["health"]) for c in changes if c.value is not None]
        # leaving rotation is never coalesced away: failing, then stopping (not ready)
        assert seen[:2] == [("running", "failing"), ("stopping", "failing")], seen
        assert seen[-1] == ("starting", "unknown")


def _last_pid(changes: list[KeyChange]) -> object:
    value = changes[-1].value if changes else None
    return value["pid"] if value is not None else None


async def test_discovery_ignores_stopping_and_restarting_workers(etcd: EtcdServer) -> None:
    access = EtcdAccess((etcd.endpoint,))
    api = service(
        "api",
        [
            worker("api", 0, state="stopping"),
            worker("api", 1, state="backoff", ready=False, pid=0),
            worker("api", 2, state="starting", ready=False, health="unknown"),
        ],
        advertise="10.0.0.1:8080",
    )
    async with running(Settings((etcd.endpoint,))) as reg, reader(etcd.endpoint) as r:
        reg.publish([api])
        assert await reg.wait_synced(10)
        assert len(await r.keys("/svcd/services/")) == 3
        assert await discover(access, "api") == []
        reg.publish([with_worker(api, 2, state="running", ready=True, health="passing")])
        assert await reg.wait_synced(10)
        assert await discover(access, "api") == [Endpoint("10.0.0.1:8080", "web-1", 1, "passing")]


async def test_rolling_generation_gets_its_own_key(etcd: EtcdServer) -> None:
    old = worker("api", 0, generation=1)
    new = worker("api", 0, generation=2, state="starting", ready=False, pid=2000)
    async with running(Settings((etcd.endpoint,))) as reg, reader(etcd.endpoint) as r:
        reg.publish([service("api", [old, new])])
        assert await reg.wait_synced(10)
        assert sorted(await r.keys("/svcd/services/")) == [
            "/svcd/services/api/web-1/0-1",
            "/svcd/services/api/web-1/0-2",
        ]


async def test_burst_larger_than_one_transaction(etcd: EtcdServer) -> None:
    n = MAX_TXN_OPS * 2 + 7
    big = service("big", [worker("big", i) for i in range(n)])
    async with running(Settings((etcd.endpoint,))) as reg, reader(etcd.endpoint) as r:
        # many publishes in a burst: coalesced, the last one wins
        for i in range(1, n + 1):
            reg.publish([service("big", big.workers[:i])])
        assert await reg.wait_synced(10)
        assert len(await r.keys("/svcd/services/big/")) == n
        reg.publish([])
        assert await reg.wait_synced(10)
        assert await r.keys("/svcd/services/big/") == {}


async def test_close_revokes_lease(etcd: EtcdServer) -> None:
    async with reader(etcd.endpoint) as r:
        async with running(Settings((etcd.endpoint,), ttl=30)) as reg:
            reg.publish([service("api", [worker("api", 0)])])
            assert await reg.wait_synced(10)
            assert len(await r.keys("/svcd/")) == 2
        # revoked at close: gone at once, not after the 30 s TTL
        assert await r.keys("/svcd/") == {}
        assert reg.state == "disconnected"


async def test_name_clash_reported_then_resolved(etcd: EtcdServer) -> None:
    bus_a, bus_b = EventBus(), EventBus()
    settings = Settings((etcd.endpoint,), ttl=30)
    async with running(settings, "web-1", bus_a) as a:
        a.publish([service("api", [worker("api", 0)])])
        assert await a.wait_synced(10)
        async with running(settings, "web-1", bus_b) as b:
            b.publish([service("api", [worker("api", 0, pid=4242)])])
            clash = await wait_for(
                lambda: events_of(bus_b, "registry_disconnected"), what="name clash event"
            )
            assert clash[0].fields == {"reason": "name_clash"}
            assert "web-1" in clash[0].message
            assert b.state == "disconnected"
            # the second agent wrote nothing
            async with reader(etcd.endpoint) as r:
                keys = await r.keys("/svcd/services/")
                assert keys["/svcd/services/api/web-1/0-1"]["pid"] == 1000
            await a.close()  # the name frees up: b takes over
            await wait_for(lambda: b.state == "connected", what="b registered")
            assert await b.wait_synced(10)
            async with reader(etcd.endpoint) as r:
                keys = await r.keys("/svcd/services/")
                assert keys["/svcd/services/api/web-1/0-1"]["pid"] == 4242
            assert "registry_connected" in event_types(bus_b)


async def test_unreachable_etcd_never_raises(port: int) -> None:
    bus = EventBus()
    settings = Settings((f"http://127.0.0.1:{port}",), timeout=0.5)
    async with running(settings, bus=bus) as reg:
        reg.publish([service("api", [worker("api", 0)])])
        await wait_for(lambda: events_of(bus, "registry_disconnected"), what="disconnected event")
        assert reg.state == "disconnected"
        assert not await reg.wait_synced(0.1)


async def test_wait_synced_without_changes_is_immediate(etcd: EtcdServer) -> None:
    async with running(Settings((etcd.endpoint,))) as reg:
        reg.publish([])
        assert await reg.wait_synced(10)
        assert await asyncio.wait_for(reg.wait_synced(10), 1)


async def test_channel_options_apply() -> None:
    """Contract with etcd3aio 0.3: our channel options reach the channel it builds."""
    client = EtcdClient(["http://127.0.0.1:1"], timeout=0.5)
    try:
        await client.connect()
        options = dict(client._c._manager.grpc_options)
        for name, value in CHANNEL_OPTIONS:
            assert options[name] == value
    finally:
        await client.close()


async def test_accepts_config_registry_settings(etcd: EtcdServer) -> None:
    """agent.config.RegistrySettings is what the daemon passes (mypy checks the fit too)."""
    settings = RegistrySettings(endpoints=(etcd.endpoint,), ttl=5, timeout=2.0)
    reg = Registry(settings, "web-1", "/run/svcd/svcd.sock", EventBus(), "0.1.0")
    task = asyncio.create_task(reg.run())
    try:
        reg.publish([service("api", [worker("api", 0)])])
        assert await reg.wait_synced(10)
        async with reader(etcd.endpoint) as r:
            assert "/svcd/services/api/web-1/0-1" in await r.keys("/svcd/")
    finally:
        await reg.close()
        await asyncio.gather(task, return_exceptions=True)
