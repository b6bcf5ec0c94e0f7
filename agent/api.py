"""The `svcd.v1.Agent` gRPC servicer: messages <-> AgentCore calls, errors -> status codes.

Thin on purpose (STYLE.md): every decision lives in `agent.core.AgentCore`, which tests
can drive directly. This module only
- converts requests to core calls and core results to messages (field names of the
  status messages equal those of the `supervisor.status` views, so conversion is by
  name and a field added to both flows through);
- maps the errors the core raises to gRPC status codes in ONE table, `ERROR_CODES`
  (`svctl` maps those codes to its exit codes);
- bounds what it hands out: streams are driven by the client's pace (grpc.aio's
  flow control), a reload that a client stops watching keeps running to the end
  (abandoning a rollout halfway would be worse than finishing it);
- hands the registry's secrets (`REGISTRY_SECRETS`: the etcd password, the client key
  path) only to callers its `may_see_secrets` predicate admits: everyone on the unix
  socket (its callers passed the uid check), admins only on the TCP listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, cast

import grpc
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from agent._pb import agent_pb2 as pb
from agent._pb import agent_pb2_grpc
from agent.errors import ActionFailed, ConfigRejected, InvalidRequest
from supervisor.errors import ReloadFailed, SupervisorError, UnknownService
from supervisor.events import Event
from supervisor.status import LogLine

if TYPE_CHECKING:
    from agent.core import AgentCore

log = logging.getLogger("svcd.api")

#: Full gRPC method names, for reflection and for tests.
SERVICE_NAME = "svcd.v1.Agent"

#: Exceptions of the core -> gRPC status code; the first matching row wins, so
#: subclasses come before their bases. svctl: NOT_FOUND/INVALID_ARGUMENT -> exit 2,
#: ABORTED/FAILED_PRECONDITION -> exit 1. A broken config file is not a bad request
#: (the request names no file) but a state the reload cannot proceed from: SPEC's
#: "the action failed" (exit 1), with nothing changed.
ERROR_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (UnknownService, grpc.StatusCode.NOT_FOUND),
    (ConfigRejected, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (ActionFailed, grpc.StatusCode.ABORTED),
    (ReloadFailed, grpc.StatusCode.ABORTED),
    # e.g. ListenerError on start: the action cannot run as things are
    (SupervisorError, grpc.StatusCode.FAILED_PRECONDITION),
)

PROBE_KINDS = ("live", "ready")

#: RegistryInfoResponse fields that let a caller act on etcd as the agent: cleared for
#: callers that may not see secrets (the TCP `read` role). The username, the endpoints
#: and the CA stay: they say where etcd is, not how to write to it.
REGISTRY_SECRETS = ("password", "key")

#: Decides, per call, whether the caller may see REGISTRY_SECRETS.
SecretsPolicy = Callable[[grpc.aio.ServicerContext[Any, Any]], bool]


def _everyone(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    return True


def status_code_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code of an expected core error, None for anything else (a bug)."""
    for kind, code in ERROR_CODES:
        if isinstance(exc, kind):
            return code
    return None


def error_details(exc: BaseException) -> str:
    """The status details: a rejected config lists one problem per line."""
    if isinstance(exc, ConfigRejected):
        return "config rejected:\n" + "\n".join(exc.problems)
    if isinstance(exc, ActionFailed | InvalidRequest | ReloadFailed):
        return exc.reason
    if isinstance(exc, UnknownService) and exc.args:
        return str(exc.args[0])
    return str(exc) or type(exc).__name__


@contextlib.asynccontextmanager
async def _mapped_errors(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
    """Turn core errors into an aborted RPC with the code of ERROR_CODES."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, grpc.aio.AbortError):
            raise
        code = status_code_for(exc)
        if code is None:
            log.exception("control request failed unexpectedly")
            code = grpc.StatusCode.INTERNAL
        await context.abort(code, error_details(exc))


# ---------------------------------------------------------------- conversions


def _json_safe(value: Any) -> Any:
    """What fits in a google.protobuf.Struct (non-JSON values become strings)."""
    return json.loads(json.dumps(value, default=str, allow_nan=True))


def _struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(_json_safe(dict(value)))
    return out


def fill(message: Message, source: Any) -> Message:
    """Copy the attributes of `source` named like the fields of `message` into it.

    Scalars, repeated scalars, maps, google.protobuf.Struct (from dicts) and nested
    messages (from objects) are handled; attributes `source` lacks stay at default.
    """
    for field in message.DESCRIPTOR.fields:
        if not hasattr(source, field.name):
            continue
        value = getattr(source, field.name)
        if value is None:
            continue
        target = getattr(message, field.name)
        kind = field.message_type
        if kind is not None and kind.GetOptions().map_entry:
            target.update({str(k): v for k, v in value.items()})
        elif kind is not None and kind.full_name == "google.protobuf.Struct":
            if field.is_repeated:
                target.extend(_struct(v) for v in value)
            else:
                target.CopyFrom(_struct(value))
        elif kind is not None:
            if field.is_repeated:
                for item in value:
                    fill(target.add(), item)
            else:
                fill(target, value)
        elif field.is_repeated:
            target.extend(value)
        else:
            if isinstance(value, float) and not math.isfinite(value):
                value = 0.0
            setattr(message, field.name, value)
    return message


def status_message(status: Any) -> pb.StatusResponse:
    """AgentStatus(agent, services) -> StatusResponse."""
    return cast(pb.StatusResponse, fill(pb.StatusResponse(), status))


def event_message(event: Event) -> pb.Event:
    out = pb.Event(
        time=event.time,
        type=event.type,
        service=event.service,
        worker=event.worker,
        pid=event.pid,
        generation=event.generation,
        message=event.message,
    )
    if event.fields:
        out.fields.CopyFrom(_struct(event.fields))
    return out


def log_message(line: LogLine) -> pb.LogLine:
    return cast(pb.LogLine, fill(pb.LogLine(), line))


# ---------------------------------------------------------------- the servicer


class AgentServicer:
    """svcd.v1.Agent over an AgentCore. Method names are the proto's (gRPC dispatch)."""

    def __init__(self, core: AgentCore, *, may_see_secrets: SecretsPolicy = _everyone) -> None:
        self._core = core
        self._may_see_secrets = may_see_secrets
        # reloads whose client went away: kept referenced until they finish
        self._background: set[asyncio.Future[Any]] = set()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        agent_pb2_grpc.add_AgentServicer_to_server(self, server)  # type: ignore[no-untyped-call]

    async def Status(
        self, request: pb.StatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StatusResponse:
        async with _mapped_errors(context):
            return status_message(self._core.status(request.service or None))
        raise AssertionError("unreachable")  # abort raised

    async def Start(
        self, request: pb.ServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ActionResponse:
        async with _mapped_errors(context):
            message = await self._core.start(request.service, wait=not request.no_wait)
            return pb.ActionResponse(message=message)
        raise AssertionError("unreachable")

    async def Stop(
        self, request: pb.ServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ActionResponse:
        async with _mapped_errors(context):
            await self._core.stop(request.service)
            return pb.ActionResponse(message=f"{request.service}: stopped")
        raise AssertionError("unreachable")

    async def Restart(
        self, request: pb.ServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ActionResponse:
        async with _mapped_errors(context):
            message = await self._core.restart(request.service, wait=not request.no_wait)
            return pb.ActionResponse(message=message)
        raise AssertionError("unreachable")

    async def Scale(
        self, request: pb.ScaleRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ActionResponse:
        async with _mapped_errors(context):
            await self._core.scale(request.service, request.count)
            return pb.ActionResponse(message=f"{request.service}: scaled to {request.count}")
        raise AssertionError("unreachable")

    async def Reload(
        self, request: pb.ReloadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ReloadUpdate]:
        """Progress lines while the reload runs, then one `result` message.

        If the client goes away, the reload runs on to its end in the background.
        """
        # a few lines per worker: bounded by the work itself
        progress: asyncio.Queue[str] = asyncio.Queue()
        job = asyncio.ensure_future(
            self._core.reload(
                request.service or None,
                dry_run=request.dry_run,
                previous=request.previous,
                wait=not request.no_wait,
                progress=progress.put_nowait,
            )
        )
        self._background.add(job)
        job.add_done_callback(self._reload_done)
        async with _mapped_errors(context):
            for line in _drain(progress):
                yield pb.ReloadUpdate(progress=line)
            while not job.done():
                getter = asyncio.ensure_future(progress.get())
                try:
                    await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    getter.cancel()
                if getter.done() and not getter.cancelled():
                    yield pb.ReloadUpdate(progress=getter.result())
                for line in _drain(progress):
                    yield pb.ReloadUpdate(progress=line)
            for line in _drain(progress):
                yield pb.ReloadUpdate(progress=line)
            outcome = job.result()  # raises ConfigRejected, UnknownService, ...
            yield pb.ReloadUpdate(
                result=pb.ReloadResult(ok=outcome.ok, message=outcome.message, plan=outcome.plan)
            )

    def _reload_done(self, job: asyncio.Future[Any]) -> None:
        self._background.discard(job)
        if not job.cancelled() and job.exception() is not None:
            # retrieved here so an unwatched failure is logged, not "never retrieved"
            log.info("reload ended with %s", error_details(cast(BaseException, job.exception())))

    async def Logs(
        self, request: pb.LogsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.LogLine]:
        worker = request.worker if request.HasField("worker") else None
        async with _mapped_errors(context):
            _check_count(request.n)
            lines = self._core.logs_tail(request.service, request.n, worker) if request.n else []
            follow = self._core.logs_follow(request.service, worker) if request.follow else None
            for line in lines:
                yield log_message(line)
            if follow is not None:
                try:
                    async for line in follow:
                        yield log_message(line)
                finally:
                    closer = getattr(follow, "aclose", None)
                    if closer is not None:
                        await closer()

    async def Events(
        self, request: pb.EventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.Event]:
        async with _mapped_errors(context):
            _check_count(request.n)
            history = self._core.events_history()
            # taken with no await in between: no event can fall between history and
            # subscription, nor appear in both
            subscription = self._core.events_subscribe(replay=False) if request.follow else None
            try:
                for event in history[-request.n :] if request.n else history:
                    yield event_message(event)
                if subscription is not None:
                    async for event in subscription:
                        yield event_message(event)
            finally:
                if subscription is not None:
                    subscription.close()

    async def Probe(
        self, request: pb.ProbeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ProbeResponse:
        async with _mapped_errors(context):
            if request.kind not in PROBE_KINDS:
                raise InvalidRequest(f"probe kind must be live or ready, got {request.kind!r}")
            kind = cast(Literal["live", "ready"], request.kind)
            ok, message = self._core.probe(kind, request.service or None)
            return pb.ProbeResponse(ok=ok, message=message)
        raise AssertionError("unreachable")

    async def RegistryInfo(
        self, request: pb.RegistryInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RegistryInfoResponse:
        async with _mapped_errors(context):
            info = self._core.registry_info()
            if info is None:
                return pb.RegistryInfoResponse(enabled=False)
            out = cast(pb.RegistryInfoResponse, fill(pb.RegistryInfoResponse(), info))
            out.enabled = True
            if not self._may_see_secrets(context):
                for name in REGISTRY_SECRETS:
                    out.ClearField(name)
            return out
        raise AssertionError("unreachable")


def _check_count(n: int) -> None:
    if n < 0:
        raise InvalidRequest(f"n must be >= 0, got {n}")


def _drain(queue: asyncio.Queue[str]) -> Iterator[str]:
    while not queue.empty():
        yield queue.get_nowait()
