"""svcd.v1.Agent end to end in one process: a real AgentCore, a real Supervisor running
real workers (tests/programs/http_worker.py), the real ControlServer, and a grpc.aio
client on the control socket. Checks the conversions, the error table and the streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent import api
from agent._pb import agent_pb2 as pb
from agent._pb import agent_pb2_grpc
from agent.cli import to_dict
from agent.control import ControlServer
from agent.core import AgentCore, RegistryInfo
from agent.errors import ActionFailed, ConfigRejected, InvalidRequest
from supervisor.errors import ListenerError, ReloadFailed, UnknownService
from tests.agent_proc import api_service
from tests.conftest import free_port
from tests.test_control import make_core, running
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 20.0
T = TypeVar("T")

#: SPEC.md `svctl status --json`: every field and its JSON type.
AGENT_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "version": (str,),
    "pid": (int,),
    "uptime_s": (int, float),
    "registry": (str,),
}
SERVICE_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "state": (str,),
    "desired": (int,),
    "ready": (int,),
    "generation": (int,),
    "workers": (list,),
}
WORKER_FIELDS: dict[str, tuple[type, ...]] = {
    "worker": (str,),
    "index": (int,),
    "pid": (int,),
    "generation": (int,),
    "state": (str,),
    "ready": (bool,),
    "health": (str,),
    "restarts": (int,),
    "uptime_s": (int, float),
    "rss_bytes": (int, float),
    "cpu_percent": (int, float),
    "connections": (int,),
    "requests": (int,),
    "qps": (int, float),
}
SERVICE_STATES = {"running", "starting", "reloading", "stopped", "backoff", "fatal"}
WORKER_STATES = {"starting", "running", "stopping", "exited", "backoff", "fatal"}


def check_types(obj: dict[str, Any], fields: dict[str, tuple[type, ...]]) -> None:
    """Every field present with its JSON type (a bool is no number here)."""
    for key, types in fields.items():
        value = obj[key]
        assert isinstance(value, types), (key, value)
        assert bool in types or not isinstance(value, bool), (key, value)


@dataclass
class Agent:
    core: AgentCore
    control: ControlServer
    stub: Any  # agent_pb2_grpc.AgentStub (generated, untyped)
    channel: grpc.aio.Channel
    config: Path
    port: int


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    port = free_port()
    core = make_core(tmp_path, api_service(port))
    supervisor = core.supervisor
    await supervisor.start()
    control = ControlServer(core, tmp_path / "run" / "svcd.sock")
    try:
        async with running(core):
            await core.start_services()
            async with asyncio.timeout(TIMEOUT):
                await core.wait_ready()
            await control.start()
            async with grpc.aio.insecure_channel(f"unix:{control.socket_path}") as channel:
                stub = agent_pb2_grpc.AgentStub(channel)  # type: ignore[no-untyped-call]
                yield Agent(core, control, stub, channel, tmp_path / "svcd.toml", port)
    finally:
        await control.stop(grace=0)
        await supervisor.close()
        await supervisor.close_reaper()


async def eventually(predicate: Callable[[], Awaitable[T]], what: str) -> T:
    """tests.waiting.wait_for with an async predicate, typed."""
    waited: Any = wait_for
    result: T = await waited(predicate, TIMEOUT, what)
    return result


async def status(agent: Agent) -> dict[str, Any]:
    reply = await agent.stub.Status(pb.StatusRequest(), timeout=TIMEOUT)
    return to_dict(reply)


async def pids(agent: Agent) -> set[int]:
    (svc,) = (await status(agent))["services"]
    return {w["pid"] for w in svc["workers"] if w["pid"]}


async def expect_code(code: grpc.StatusCode, call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value


async def reload_all(agent: Agent, request: pb.ReloadRequest) -> list[pb.ReloadUpdate]:
    call = agent.stub.Reload(request, timeout=TIMEOUT * 2)
    return [update async for update in call]


# ---------------------------------------------------------------- status


async def test_status_json_contract(agent: Agent) -> None:
    data = await status(agent)
    assert set(data) >= {"agent", "services"}
    check_types(data["agent"], AGENT_FIELDS)
    assert data["agent"]["name"] == "test-agent"
    assert data["agent"]["registry"] == "disabled"
    (svc,) = data["services"]
    check_types(svc, SERVICE_FIELDS)
    assert svc["state"] in SERVICE_STATES
    assert (svc["name"], svc["state"], svc["desired"], svc["ready"]) == ("api", "running", 2, 2)
    assert [w["worker"] for w in svc["workers"]] == ["api:0", "api:1"]
    for w in svc["workers"]:
        check_types(w, WORKER_FIELDS)
        assert w["state"] in WORKER_STATES and w["health"] in ("passing", "failing", "unknown")
        assert w["pid"] > 0 and w["ready"] is True
    # the same numbers as the core's own view
    core_view = agent.core.status()
    assert {w.pid for w in core_view.services[0].workers} == await pids(agent)


async def test_status_of_one_service_and_unknown(agent: Agent) -> None:
    reply = await agent.stub.Status(pb.StatusRequest(service="api"), timeout=TIMEOUT)
    assert [s.name for s in reply.services] == ["api"]
    err = await expect_code(
        grpc.StatusCode.NOT_FOUND, agent.stub.Status(pb.StatusRequest(service="nope"))
    )
    assert "nope" in (err.details() or "")


@pytest.mark.parametrize("method", ["Start", "Stop", "Restart"])
async def test_actions_on_unknown_service(agent: Agent, method: str) -> None:
    call = getattr(agent.stub, method)(pb.ServiceRequest(service="nope"), timeout=TIMEOUT)
    await expect_code(grpc.StatusCode.NOT_FOUND, call)


# ---------------------------------------------------------------- actions


async def test_stop_start_restart_and_service_health(agent: Agent) -> None:
    health = health_pb2_grpc.HealthStub(agent.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service="api"))
    first = await asyncio.wait_for(watch.read(), TIMEOUT)
    assert first.status == health_pb2.HealthCheckResponse.SERVING

    reply = await agent.stub.Stop(pb.ServiceRequest(service="api"), timeout=TIMEOUT)
    assert reply.message == "api: stopped"
    assert (await status(agent))["services"][0]["state"] == "stopped"
    second = await asyncio.wait_for(watch.read(), TIMEOUT)
    assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
    ready = await agent.stub.Probe(pb.ProbeRequest(kind="ready", service="api"), timeout=TIMEOUT)
    assert not ready.ok

    await agent.stub.Start(pb.ServiceRequest(service="api"), timeout=TIMEOUT)
    third = await asyncio.wait_for(watch.read(), TIMEOUT)
    assert third.status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()

    before = await pids(agent)
    await agent.stub.Restart(pb.ServiceRequest(service="api"), timeout=TIMEOUT)
    await wait_for(agent.core.all_ready, TIMEOUT, "ready after restart")
    after = await pids(agent)
    assert len(after) == 2 and not before & after


async def test_scale(agent: Agent) -> None:
    await expect_code(
        grpc.StatusCode.INVALID_ARGUMENT,
        agent.stub.Scale(pb.ScaleRequest(service="api", count=-1), timeout=TIMEOUT),
    )
    await expect_code(
        grpc.StatusCode.NOT_FOUND,
        agent.stub.Scale(pb.ScaleRequest(service="nope", count=1), timeout=TIMEOUT),
    )
    reply = await agent.stub.Scale(pb.ScaleRequest(service="api", count=3), timeout=TIMEOUT)
    assert reply.message == "api: scaled to 3"

    async def three_ready() -> bool:
        svc = (await status(agent))["services"][0]
        return bool(svc["desired"] == 3 and svc["ready"] == 3)

    await eventually(three_ready, "3 ready workers")


# ---------------------------------------------------------------- reload


async def test_reload_one_service_streams_progress_then_result(agent: Agent) -> None:
    before = await pids(agent)
    updates = await reload_all(agent, pb.ReloadRequest(service="api"))
    kinds = [u.WhichOneof("update") for u in updates]
    assert kinds[-1] == "result" and kinds.count("result") == 1
    assert "progress" in kinds
    result = updates[-1].result
    assert result.ok, result.message
    after = await pids(agent)
    assert len(after) == 2 and not before & after


async def test_reload_no_wait_returns_at_once(agent: Agent) -> None:
    updates = await reload_all(agent, pb.ReloadRequest(service="api", no_wait=True))
    assert updates[-1].result.ok
    await wait_for(agent.core.all_ready, TIMEOUT, "ready after background reload")


async def test_reload_config_dry_run_changes_nothing(agent: Agent) -> None:
    before = await pids(agent)
    text = agent.config.read_text().replace("count = 2", "count = 3")
    agent.config.write_text(text)
    updates = await reload_all(agent, pb.ReloadRequest(dry_run=True))
    result = updates[-1].result
    assert result.ok and any(line.startswith("~ api") for line in result.plan), result.plan
    assert await pids(agent) == before
    assert (await status(agent))["services"][0]["desired"] == 2


async def test_reload_rejects_a_broken_config_and_keeps_running(agent: Agent) -> None:
    before = await pids(agent)
    text = agent.config.read_text().replace("count = 2", "count = 0")
    agent.config.write_text(text + "\nbogus_key = 1\n")
    err = await expect_code(
        grpc.StatusCode.FAILED_PRECONDITION,
        agent.stub.Reload(pb.ReloadRequest(), timeout=TIMEOUT).read(),
    )
    details = err.details() or ""
    assert details.startswith("config rejected:\n")
    problems = details.splitlines()[1:]
    assert len(problems) >= 2, details
    assert any("services.api.count" in p for p in problems), details
    assert await pids(agent) == before


async def test_reload_that_fails_is_rolled_back(agent: Agent) -> None:
    before = await pids(agent)
    text = agent.config.read_text()
    broken = api_service(agent.port, args=("--exit-code", "1"))
    agent.config.write_text(text.split("[services.api]")[0] + broken)
    updates = await reload_all(agent, pb.ReloadRequest())
    result = updates[-1].result
    assert not result.ok, result
    assert "api" in result.message
    assert await pids(agent) == before  # the old generation kept serving


# ---------------------------------------------------------------- logs, events


async def test_logs_tail_and_follow(agent: Agent) -> None:
    async def tail() -> list[pb.LogLine]:
        call = agent.stub.Logs(pb.LogsRequest(service="api", n=50), timeout=TIMEOUT)
        return [line async for line in call]

    lines = await eventually(tail, "some output of the workers")
    assert {line.service for line in lines} == {"api"}
    assert all(line.stream in ("stdout", "stderr") and line.pid > 0 for line in lines)

    only0 = agent.stub.Logs(pb.LogsRequest(service="api", n=50, worker=0), timeout=TIMEOUT)
    assert {line.worker async for line in only0} <= {0}

    follow = agent.stub.Logs(pb.LogsRequest(service="api", follow=True))
    reader = asyncio.ensure_future(follow.read())
    await asyncio.sleep(0)  # the stream is open before the restart below
    await agent.stub.Restart(pb.ServiceRequest(service="api"), timeout=TIMEOUT)
    line = await asyncio.wait_for(reader, TIMEOUT)
    assert line.service == "api"
    follow.cancel()

    await expect_code(
        grpc.StatusCode.NOT_FOUND,
        agent.stub.Logs(pb.LogsRequest(service="nope", n=5), timeout=TIMEOUT).read(),
    )


async def test_events_history_and_follow(agent: Agent) -> None:
    history = [e async for e in agent.stub.Events(pb.EventsRequest(), timeout=TIMEOUT)]
    types = [e.type for e in history]
    assert "started" in types and "ready" in types
    started = next(e for e in history if e.type == "started")
    assert started.service == "api" and started.worker.startswith("api:") and started.pid > 0
    assert started.time > 0

    last2 = [e async for e in agent.stub.Events(pb.EventsRequest(n=2), timeout=TIMEOUT)]
    assert [e.type for e in last2] == types[-2:]

    follow = agent.stub.Events(pb.EventsRequest(follow=True, n=1))
    replayed = await asyncio.wait_for(follow.read(), TIMEOUT)
    assert replayed.type == types[-1]
    await agent.stub.Stop(pb.ServiceRequest(service="api"), timeout=TIMEOUT)
    seen: list[str] = []
    async with asyncio.timeout(TIMEOUT):
        while "exited" not in seen:
            event = await follow.read()
            seen.append(event.type)
            if event.type == "exited":
                assert "fields" in to_dict(event)
    follow.cancel()


# ---------------------------------------------------------------- probe, registry


async def test_probe(agent: Agent) -> None:
    live = await agent.stub.Probe(pb.ProbeRequest(kind="live"), timeout=TIMEOUT)
    assert live.ok
    ready = await agent.stub.Probe(pb.ProbeRequest(kind="ready"), timeout=TIMEOUT)
    assert ready.ok, ready.message
    await expect_code(
        grpc.StatusCode.INVALID_ARGUMENT,
        agent.stub.Probe(pb.ProbeRequest(kind="dead"), timeout=TIMEOUT),
    )
    await expect_code(
        grpc.StatusCode.NOT_FOUND,
        agent.stub.Probe(pb.ProbeRequest(kind="ready", service="nope"), timeout=TIMEOUT),
    )


async def test_registry_info_without_registry(agent: Agent) -> None:
    reply = await agent.stub.RegistryInfo(pb.RegistryInfoRequest(), timeout=TIMEOUT)
    assert not reply.enabled and not reply.endpoints


class _RegistryCore:
    """Just what RegistryInfo asks of the core."""

    def registry_info(self) -> RegistryInfo:
        return RegistryInfo(
            endpoints=["https://127.0.0.1:2379"], prefix="/svcd", ca_cert="/etc/ca.pem",
            cert="/etc/c.pem", key="/etc/c.key", username="svcd", password="s3cret",
        )  # fmt: skip


@pytest.mark.parametrize("may_see", [True, False])
async def test_registry_info_secrets_follow_the_policy(may_see: bool) -> None:
    """The read role (policy False) learns where etcd is, never the password or key."""
    servicer = api.AgentServicer(_RegistryCore(), may_see_secrets=lambda _: may_see)  # type: ignore[arg-type]
    context: Any = None  # the policy is the servicer's only use of the context here
    reply = await servicer.RegistryInfo(pb.RegistryInfoRequest(), context)
    assert reply.enabled and list(reply.endpoints) == ["https://127.0.0.1:2379"]
    assert (reply.prefix, reply.ca_cert, reply.cert, reply.username) == (
        "/svcd", "/etc/ca.pem", "/etc/c.pem", "svcd",
    )  # fmt: skip
    assert (reply.password, reply.key) == (("s3cret", "/etc/c.key") if may_see else ("", ""))
    assert set(api.REGISTRY_SECRETS) == {"password", "key"}


# ---------------------------------------------------------------- the error table


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (UnknownService("x"), grpc.StatusCode.NOT_FOUND),
        (ConfigRejected(["a: b: c"]), grpc.StatusCode.FAILED_PRECONDITION),
        (InvalidRequest("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (ActionFailed("no"), grpc.StatusCode.ABORTED),
        (ReloadFailed("rolled back"), grpc.StatusCode.ABORTED),
        (ListenerError("in use"), grpc.StatusCode.FAILED_PRECONDITION),
        (RuntimeError("bug"), None),
    ],
)
def test_error_table(error: Exception, code: grpc.StatusCode | None) -> None:
    assert api.status_code_for(error) == code


def test_error_details() -> None:
    assert api.error_details(ConfigRejected(["f: k: r1", "f: k2: r2"])) == (
        "config rejected:\nf: k: r1\nf: k2: r2"
    )
    assert api.error_details(ActionFailed("rolled back: api:0 exited")) == (
        "rolled back: api:0 exited"
    )


async def test_reload_continues_when_the_client_goes_away(agent: Agent) -> None:
    before = await pids(agent)
    call = agent.stub.Reload(pb.ReloadRequest(service="api"))
    first = await asyncio.wait_for(call.read(), TIMEOUT)
    assert first.WhichOneof("update") == "progress"
    call.cancel()

    async def replaced() -> bool:
        now = await pids(agent)
        return len(now) == 2 and not now & before

    await eventually(replaced, "the reload to finish without its client")
    assert call.cancelled()
