"""grpc.health.v1.Health as the agent serves it: grpcio's asyncio servicer, completed.

The stock servicer keeps one status per name and answers `Check` with whatever was set.
A service removed by a config reload must look as if it had never been configured, so
`Check` answers NOT_FOUND (the protocol's "unknown service") for names whose status
is SERVICE_UNKNOWN, while `Watch` streams keep receiving SERVICE_UNKNOWN, as the
protocol asks. `List` (in the protocol since 2024, unimplemented by the stock servicer)
returns every known name and its status, so generic tools can enumerate them.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class AgentHealth(health_aio.HealthServicer):  # type: ignore[misc]
    """The Health servicer of the control socket, the TCP listener and probe_address."""

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = self._server_status.get(request.service, _UNKNOWN)
        if status == _UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        response = health_pb2.HealthListResponse()
        for name, status in list(self._server_status.items()):
            if status != _UNKNOWN:
                response.statuses[name].status = status
        return response
