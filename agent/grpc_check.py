"""The `grpc` health-check kind: grpc.health.v1 `Check` against one worker.

It lives in the agent because `supervisor/` never imports grpc; the supervisor gets it
as an extra entry of its `checks` mapping (`{"grpc": GrpcChecker()}`).

Invariants:
- One insecure grpc.aio channel per target address, reused across checks (a check must
  not cost a TCP + HTTP/2 handshake every interval) and closed when the target is
  forgotten (`discard`), idle for `IDLE_CLOSE` seconds, or on `close()`.
- A channel whose last call failed at the transport level is dropped, so the next
  check dials afresh instead of inheriting grpc's reconnect backoff (up to minutes),
  which would keep a freshly restarted worker failing long after it serves.
- A call is bounded by `spec.timeout`; only SERVING passes.
"""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from supervisor.health import CheckResult, CheckTarget
from supervisor.spec import HealthSpec

#: A channel unused for this long belongs to a worker that is gone: close it.
IDLE_CLOSE = 300.0
#: Status codes after which the channel is not trusted for the next check.
_TRANSPORT_FAILURES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # Loopback checks must never be routed through an http_proxy from the environment.
    ("grpc.enable_http_proxy", 0),
    # Keep reconnects brisk: workers restart, and a check runs every few seconds anyway.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

_Key = tuple[str, int]


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcChecker:
    """A `CheckFn` for kind "grpc" that caches one channel per worker address.

    Call it like any check: `await checker(spec, target)`. Use it from one event loop.
    """

    def __init__(self, idle_close: float = IDLE_CLOSE) -> None:
        self._idle_close = idle_close
        self._channels: dict[_Key, grpc.aio.Channel] = {}
        self._last_used: dict[_Key, float] = {}

    @property
    def open_channels(self) -> int:
        return len(self._channels)

    async def __call__(self, spec: HealthSpec, target: CheckTarget) -> CheckResult:
        """Check `spec.grpc_service` on the target; SERVING passes, anything else fails."""
        await self._close_idle()
        key = (target.host, target.port)
        channel = self._channels.get(key)
        if channel is None:
            channel = grpc.aio.insecure_channel(
                _address(target.host, target.port), options=_CHANNEL_OPTIONS
            )
            self._channels[key] = channel
        self._last_used[key] = time.monotonic()
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=spec.grpc_service)
        try:
            response = await stub.Check(request, timeout=spec.timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in _TRANSPORT_FAILURES:
                await self._drop(key)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return CheckResult(False, f"timeout after {spec.timeout}s")
            details = exc.details()
            reason = f"grpc {code.name}: {details}" if details else f"grpc {code.name}"
            return CheckResult(False, reason)
        status = response.status
        if status == health_pb2.HealthCheckResponse.SERVING:
            return CheckResult(True)
        return CheckResult(False, health_pb2.HealthCheckResponse.ServingStatus.Name(status))

    async def discard(self, host: str, port: int) -> None:
        """Close the channel to a worker that went away (no-op when there is none)."""
        await self._drop((host, port))

    async def close(self) -> None:
        """Close every channel; the checker stays usable (it dials again on demand)."""
        for key in list(self._channels):
            await self._drop(key)

    async def _drop(self, key: _Key) -> None:
        channel = self._channels.pop(key, None)
        self._last_used.pop(key, None)
        if channel is not None:
            await channel.close(None)

    async def _close_idle(self) -> None:
        cutoff = time.monotonic() - self._idle_close
        for key, used in list(self._last_used.items()):
            if used < cutoff:
                await self._drop(key)
