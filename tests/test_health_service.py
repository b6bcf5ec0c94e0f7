"""agent/health_service.py through a real grpc.aio server and the stock health client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.health_service import AgentHealth

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
TEST_TIMEOUT = 20


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[AgentHealth, health_pb2_grpc.HealthStub]]:
    health = AgentHealth()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    target = f"unix:{tmp_path / 'health.sock'}"
    server.add_insecure_port(target)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            yield health, health_pb2_grpc.HealthStub(channel)
    finally:
        await server.stop(None)


async def check(stub: health_pb2_grpc.HealthStub, name: str) -> int:
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
    return int(reply.status)


async def test_a_removed_service_is_not_found_for_check_and_unknown_for_watch(
    served: tuple[AgentHealth, health_pb2_grpc.HealthStub],
) -> None:
    health, stub = served
    async with asyncio.timeout(TEST_TIMEOUT):
        await health.set("api", SERVING)
        assert await check(stub, "api") == SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="api"))
        assert (await watch.read()).status == SERVING
        await health.set("api", UNKNOWN)  # what the control server does for a removed one
        assert (await watch.read()).status == UNKNOWN
        watch.cancel()
        for name in ("api", "never-configured"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await check(stub, name)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND, name


async def test_list_names_every_known_service(
    served: tuple[AgentHealth, health_pb2_grpc.HealthStub],
) -> None:
    health, stub = served
    async with asyncio.timeout(TEST_TIMEOUT):
        await health.set("readiness", NOT_SERVING)
        await health.set("api", SERVING)
        await health.set("gone", UNKNOWN)
        reply = await stub.List(health_pb2.HealthListRequest(), timeout=5)
        statuses = {name: r.status for name, r in reply.statuses.items()}
        assert statuses == {"": SERVING, "readiness": NOT_SERVING, "api": SERVING}
