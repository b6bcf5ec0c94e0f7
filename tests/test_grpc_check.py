"""The grpc health-check kind against a real grpc.aio server with the stock health servicer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from agent.grpc_check import GrpcChecker
from supervisor.health import CheckResult, CheckTarget, HealthMonitor
from supervisor.spec import HealthSpec
from tests.waiting import wait_for

TEST_TIMEOUT = 20.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@contextlib.asynccontextmanager
async def health_server(port: int = 0) -> AsyncIterator[tuple[health_aio.HealthServicer, int]]:
    server = grpc.aio.server()
    servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield servicer, bound
    finally:
        await server.stop(None)


def target(port: int) -> CheckTarget:
    return CheckTarget(host="127.0.0.1", port=port, worker="api:0", pid=1)


@contextlib.asynccontextmanager
async def checker() -> AsyncIterator[GrpcChecker]:
    c = GrpcChecker()
    try:
        yield c
    finally:
        await c.close()


async def test_serving_passes_and_not_serving_fails() -> None:
    spec = HealthSpec(kind="grpc", grpc_service="api", timeout=2.0)
    async with asyncio.timeout(TEST_TIMEOUT), health_server() as (servicer, port), checker() as c:
        await servicer.set("api", SERVING)
        assert await c(spec, target(port)) == CheckResult(True)
        await servicer.set("api", NOT_SERVING)
        assert await c(spec, target(port)) == CheckResult(False, "NOT_SERVING")
        assert c.open_channels == 1  # one channel, reused

        other = HealthSpec(kind="grpc", grpc_service="nope", timeout=2.0)
        result = await c(other, target(port))
        assert not result.ok and result.reason.startswith("grpc NOT_FOUND")

        await c.discard("127.0.0.1", port)
        assert c.open_channels == 0


async def test_overall_health_with_empty_service_name() -> None:
    spec = HealthSpec(kind="grpc", timeout=2.0)  # grpc_service "" = the server as a whole
    async with asyncio.timeout(TEST_TIMEOUT), health_server() as (_, port), checker() as c:
        # the stock servicer starts with "" SERVING
        assert await c(spec, target(port)) == CheckResult(True)


async def test_monitor_follows_the_servicer_flipping() -> None:
    spec = HealthSpec(kind="grpc", grpc_service="api", interval=0.02, timeout=2.0, rise=2, fall=2)
    changes: list[str] = []
    async with asyncio.timeout(TEST_TIMEOUT), health_server() as (servicer, port), checker() as c:
        await servicer.set("api", SERVING)
        mon = HealthMonitor(spec, target(port), c, lambda health, _: changes.append(health))
        task = asyncio.create_task(mon.run())
        try:
            await wait_for(lambda: changes == ["passing"], what="passing")
            await servicer.set("api", NOT_SERVING)
            await wait_for(lambda: changes == ["passing", "failing"], what="failing")
            assert mon.reason == "NOT_SERVING"
            await servicer.set("api", SERVING)
            await wait_for(lambda: changes == ["passing", "failing", "passing"], what="back")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_down_server_fails_then_a_restarted_one_passes_at_once() -> None:
    spec = HealthSpec(kind="grpc", timeout=2.0)
    async with asyncio.timeout(TEST_TIMEOUT), checker() as c:
        async with health_server() as (_, port):
            assert (await c(spec, target(port))).ok
        result = await c(spec, target(port))
        assert not result.ok
        assert c.open_channels == 0  # dropped: no inherited reconnect backoff
        # The worker comes back on the same port: the next check dials afresh.
        async with health_server(port) as (_, again):
            assert again == port
            assert await c(spec, target(port)) == CheckResult(True)


async def test_idle_channels_are_closed() -> None:
    spec = HealthSpec(kind="grpc", timeout=2.0)
    async with asyncio.timeout(TEST_TIMEOUT), health_server() as (_, port):
        c = GrpcChecker(idle_close=0.0)
        try:
            async with health_server() as (_, other):
                assert (await c(spec, target(other))).ok
            # The next check (to another worker) sweeps the idle channel away.
            assert (await c(spec, target(port))).ok
            assert c.open_channels == 1
        finally:
            await c.close()
        assert c.open_channels == 0
