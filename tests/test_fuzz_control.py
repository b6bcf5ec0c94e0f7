"""Fuzz the control API of a real `svcd` process through a real grpc channel.

Random requests (every svcd.v1.Agent and grpc.health.v1 method, with random field
values: empty, unknown, huge, negative, control characters; or raw undecodable bytes;
or methods that do not exist) must each end in a gRPC status, never in a crash or a
hang of the agent:
- a well-formed request never gets INTERNAL (that is the api's "unexpected error");
- after every example the agent still answers Status, with the same pid;
- at the end the agent's stderr holds no traceback and it stops cleanly (exit 0).

Scale counts are drawn outside 4..MAX_WORKERS (must be refused) or within 0..3, so a
fuzz run never starts hundreds of workers; the service runs `sleep`, ready at start.
"""

from __future__ import annotations

import json
import os
import shutil
import string
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent._pb import agent_pb2 as pb
from agent.config import MAX_WORKERS
from tests.agent_proc import AgentProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EXAMPLES = int(os.environ.get("SVCD_FUZZ_EXAMPLES", "200"))
#: Streams (follow) are cut by this deadline: DEADLINE_EXCEEDED is an answer too.
STREAM_DEADLINE = 0.3
#: Unary calls (a rolling restart of a `sleep` worker is quick).
CALL_DEADLINE = 30.0
#: Items read from a stream before the client hangs up.
STREAM_ITEMS = 50
SLEEP = shutil.which("sleep") or "/bin/sleep"

UNARY = {
    "Status": pb.StatusRequest,
    "Start": pb.ServiceRequest,
    "Stop": pb.ServiceRequest,
    "Restart": pb.ServiceRequest,
    "Scale": pb.ScaleRequest,
    "Probe": pb.ProbeRequest,
    "RegistryInfo": pb.RegistryInfoRequest,
}
STREAMS = {"Reload": pb.ReloadRequest, "Logs": pb.LogsRequest, "Events": pb.EventsRequest}
INT64 = (-(2**63), 2**63 - 1)

# ---------------------------------------------------------------- strategies

service_names = st.one_of(
    st.sampled_from(["api", "other", "", "api ", "API", "api:0", "../api", "*", "\x00"]),
    st.text(max_size=40),
    st.text(alphabet=string.ascii_lowercase, min_size=200, max_size=2000),
)
ints = st.one_of(st.integers(-3, 3), st.integers(*INT64))
scale_counts = st.one_of(
    st.integers(0, 3), st.integers(INT64[0], -1), st.integers(MAX_WORKERS + 1, INT64[1])
)


@st.composite
def messages(draw: st.DrawFn, kind: type[Message]) -> Message:
    """A message of `kind` with every field drawn (strings, ints, bools, optionals)."""
    msg = kind()
    for f in kind.DESCRIPTOR.fields:
        if draw(st.booleans()) and f.has_presence:
            continue  # leave optional fields unset sometimes
        if f.type == f.TYPE_STRING:
            value: Any = draw(service_names if f.name == "service" else st.text(max_size=30))
        elif f.type == f.TYPE_BOOL:
            value = draw(st.booleans())
        elif f.name == "count":
            value = draw(scale_counts)
        else:
            value = draw(ints)
        setattr(msg, f.name, value)
    return msg


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, bytes, bool, bool]:
    """(method path, request bytes, is a stream, well-formed)."""
    kind = draw(st.sampled_from(["unary", "stream", "health", "garbage", "unknown"]))
    if kind == "unary":
        name = draw(st.sampled_from(sorted(UNARY)))
        return (
            f"/svcd.v1.Agent/{name}",
            draw(messages(UNARY[name])).SerializeToString(),
            False,
            True,
        )
    if kind == "stream":
        name = draw(st.sampled_from(sorted(STREAMS)))
        return (
            f"/svcd.v1.Agent/{name}",
            draw(messages(STREAMS[name])).SerializeToString(),
            True,
            True,
        )
    if kind == "health":
        request = health_pb2.HealthCheckRequest(service=draw(service_names))
        method = draw(st.sampled_from(["Check", "Watch"]))
        return (
            f"/grpc.health.v1.Health/{method}",
            request.SerializeToString(),
            method == "Watch",
            True,
        )
    if kind == "garbage":
        name = draw(st.sampled_from(sorted(UNARY) + sorted(STREAMS)))
        return f"/svcd.v1.Agent/{name}", draw(st.binary(max_size=200)), name in STREAMS, False
    path = draw(st.sampled_from(["/svcd.v1.Agent/", "/svcd.v2.Agent/", "/", "/x/"]))
    return path + draw(st.text(alphabet=string.ascii_letters, max_size=20)), b"", False, False


# ---------------------------------------------------------------- the test


def _tracebacks(log: str) -> list[str]:
    """Each traceback in the agent's log, from its header to the next log line."""
    out: list[str] = []
    current: list[str] | None = None
    for line in log.splitlines():
        if line.startswith("Traceback"):
            current = [line]
            out.append("")
        elif current is not None and line[:4].isdigit():  # the next timestamped line
            out[-1] = "\n".join(current)
            current = None
        elif current is not None:
            current.append(line)
    if current is not None:
        out[-1] = "\n".join(current)
    return out


def _is_decode_error(traceback: str) -> bool:
    """grpc itself logs a traceback for a request body it cannot parse (and answers
    UNKNOWN): noise, not a failure of svcd."""
    return traceback.rstrip().splitlines()[-1].startswith("google.protobuf.message.DecodeError")


def _call(channel: grpc.Channel, method: str, body: bytes, stream: bool) -> grpc.StatusCode:
    try:
        if stream:
            replies = channel.unary_stream(method, None, None)(body, timeout=STREAM_DEADLINE)
            for count, _ in enumerate(replies):
                if count >= STREAM_ITEMS:
                    replies.cancel()  # type: ignore[no-untyped-call]
                    break
        else:
            channel.unary_unary(method, None, None)(body, timeout=CALL_DEADLINE)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


def _status(channel: grpc.Channel) -> pb.StatusResponse:
    raw = channel.unary_unary("/svcd.v1.Agent/Status", None, None)(b"", timeout=CALL_DEADLINE)
    return pb.StatusResponse.FromString(raw)


def test_random_requests_get_a_status_and_never_hurt_the_agent(tmp_path: Path) -> None:
    services = f"""
[services.api]
command = {json.dumps([SLEEP, "3600"])}
count = 2
ready = "started"
graceful_timeout = 2
[services.api.backoff]
first_delay = 0
"""
    agent = AgentProcess(tmp_path, services)
    agent.start()
    seen: dict[str, int] = {}
    try:
        with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
            pid = _status(channel).agent.pid

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(call=calls())
            def one_request(call: tuple[str, bytes, bool, bool]) -> None:
                method, body, stream, well_formed = call
                code = _call(channel, method, body, stream)
                seen[code.name] = seen.get(code.name, 0) + 1
                if well_formed:
                    assert code != grpc.StatusCode.INTERNAL, (method, body)
                assert code != grpc.StatusCode.UNAVAILABLE, (method, body)
                assert _status(channel).agent.pid == pid

            one_request()
            status = _status(channel)
            assert status.agent.pid == pid
            assert all(len(s.workers) <= 3 for s in status.services)
    finally:
        code = agent.stop()
    stderr = agent.stderr_path.read_text(errors="replace")
    unexpected = [t for t in _tracebacks(stderr) if not _is_decode_error(t)]
    assert not unexpected, unexpected[:3]
    assert code == 0, stderr[-3000:]
    assert len(seen) > 2, seen  # the fuzz reached more than one outcome
