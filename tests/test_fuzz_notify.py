"""Fuzz the sd_notify endpoint (supervisor/notify.py) with hypothesis.

Whatever a worker sends on its NOTIFY_SOCKET (any bytes, any size, fds attached, any
pace), the endpoint must:
- never raise out of its reader and never log an error (a bug would show up as one);
- count every datagram in `received`, and every malformed one in `rejected`;
- close every fd passed with SCM_RIGHTS (the agent's fd table must not fill up);
- keep working: a well-formed datagram sent afterwards is delivered, flags and the
  last value of each key surviving any merging by the rate limiter.

The pure parsing functions are fuzzed separately (many more examples, no I/O).
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import string
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.notify import (
    MAX_DATAGRAM,
    NotifyEndpoint,
    NotifyMessage,
    build_message,
    parse_datagram,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(300)

#: examples per fuzz test (as in test_config_fuzz.py); SVCD_FUZZ_EXAMPLES=20000 for a hunt
EXAMPLES = int(os.environ.get("SVCD_FUZZ_EXAMPLES", "200"))

WAIT = 10.0
#: Linux queues net.unix.max_dgram_qlen (10) datagrams per socket: a batch stays below.
BATCH = 8
#: Oversized datagrams go up to this (the sender's buffer is raised to fit).
LARGEST = MAX_DATAGRAM + 4096

KEYS = ["READY", "STOPPING", "RELOADING", "WATCHDOG", "STATUS", "MAINPID", "X_SVCD_STATS",
        "ERRNO", "BUSERROR", "FDSTORE", "x", "1A", "A B", "", "É"]  # fmt: skip

# ---------------------------------------------------------------- strategies

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def stats_values(draw: st.DrawFn) -> str:
    """X_SVCD_STATS payloads: valid JSON of any shape, or broken JSON, or deep nesting."""
    import json

    kind = draw(st.sampled_from(["json", "text", "deep"]))
    if kind == "json":
        return json.dumps(draw(json_values), allow_nan=True)
    if kind == "deep":
        depth = draw(st.integers(1, 5000))
        return "[" * depth + "]" * draw(st.integers(0, depth))
    return draw(st.text(max_size=50))


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    key = draw(st.sampled_from(KEYS) | st.text(alphabet=string.printable, max_size=10))
    if key == "X_SVCD_STATS":
        value = draw(stats_values())
    else:
        value = draw(
            st.sampled_from(["1", "0", "", "-1", "99999999999999999999"]) | st.text(max_size=30)
        )
    sep = draw(st.sampled_from(["=", "=", "", "=="]))
    return f"{key}{sep}{value}".encode("utf-8", "surrogatepass")


@st.composite
def datagrams(draw: st.DrawFn) -> bytes:
    """Mostly protocol-shaped text, sometimes raw bytes, sometimes oversized."""
    kind = draw(st.sampled_from(["lines", "lines", "lines", "bytes", "big"]))
    if kind == "lines":
        sep = draw(st.sampled_from([b"\n", b"\r\n", b"\n\n", b"\0"]))
        return sep.join(draw(st.lists(lines(), min_size=0, max_size=6)))
    if kind == "bytes":
        return draw(st.binary(max_size=512))
    size = draw(st.integers(MAX_DATAGRAM - 2, LARGEST))
    return b"STATUS=" + b"x" * (size - 7)


# ---------------------------------------------------------------- pure parsing


@settings(max_examples=EXAMPLES * 2, deadline=None)
@given(st.one_of(datagrams(), st.binary(max_size=2048)))
def test_parse_and_build_never_raise(data: bytes) -> None:
    raw, bad = parse_datagram(data)
    assert isinstance(bad, bool)
    for key, value in raw.items():
        assert key and key.isascii() and "\n" not in key and "\n" not in value
    message, bad_value = build_message(raw, sender_pid=1)
    assert isinstance(bad_value, bool)
    assert message.stats is None or isinstance(message.stats, dict)
    assert message.ready == (raw.get("READY") == "1")


# ---------------------------------------------------------------- a real endpoint


class _Errors(logging.Handler):
    """Collects ERROR records of supervisor.notify (a swallowed bug shows up here)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Rig:
    """One endpoint on a private loop, driven example after example."""

    runner: asyncio.Runner
    endpoint: NotifyEndpoint
    sender: socket.socket
    errors: _Errors
    messages: list[NotifyMessage] = field(default_factory=list)
    loop_errors: list[dict[str, object]] = field(default_factory=list)
    serial: int = 0


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    directory = tmp_path_factory.mktemp("notify")
    errors = _Errors()
    logging.getLogger("supervisor.notify").addHandler(errors)
    runner = asyncio.Runner()
    messages: list[NotifyMessage] = []

    async def make() -> NotifyEndpoint:
        # a low rate so that fuzzed batches also exercise the merging path
        return NotifyEndpoint(directory, "fuzz", messages.append, rate=50.0, burst=5)

    endpoint = runner.run(make())
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * LARGEST)
    sender.setblocking(False)
    rig = Rig(runner, endpoint, sender, errors, messages)
    runner.get_loop().set_exception_handler(lambda _loop, ctx: rig.loop_errors.append(ctx))
    try:
        yield rig
    finally:
        endpoint.close()
        sender.close()
        runner.close()
        logging.getLogger("supervisor.notify").removeHandler(errors)


def _send(rig: Rig, data: bytes, fds: int) -> bool:
    """Send one datagram (with `fds` fresh fds attached); False if the kernel refused it."""
    opened = [os.open(os.devnull, os.O_RDONLY) for _ in range(fds)]
    try:
        ancillary = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", opened).tobytes())]
            if opened
            else []
        )
        rig.sender.sendmsg([data], ancillary, 0, rig.endpoint.path)
        return True
    except OSError:
        return False  # EMSGSIZE and the like: the kernel's limit, not ours
    finally:
        for fd in opened:
            os.close(fd)  # the receiver got its own copies


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@settings(
    max_examples=max(EXAMPLES // 2, 20),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(st.tuples(datagrams(), st.integers(0, 3)), min_size=1, max_size=BATCH))
def test_any_datagrams_are_read_counted_and_leave_the_endpoint_working(
    rig: Rig, batch: list[tuple[bytes, int]]
) -> None:
    ep = rig.endpoint
    fds_before = _fd_count()
    received, rejected = ep.received, ep.rejected
    sent = [data for data, fds in batch if _send(rig, data, fds)]

    async def drained() -> None:
        await wait_for(lambda: ep.received == received + len(sent), WAIT, "every datagram read")

    rig.runner.run(drained())
    malformed = 0
    for data in sent:
        if len(data) > MAX_DATAGRAM:
            malformed += 1
            continue
        _raw, bad = parse_datagram(data)
        malformed += bad
    # at least the malformed ones; bad field values may add one per delivered message
    assert ep.rejected - rejected >= malformed
    assert _fd_count() == fds_before, "an fd passed with SCM_RIGHTS was not closed"

    # still working: a sentinel (after the rate limiter's merging) arrives intact
    rig.serial += 1
    sentinel = f"sentinel-{rig.serial}"
    assert _send(rig, f"READY=1\nSTATUS={sentinel}".encode(), 0)

    async def sentinel_delivered() -> None:
        await wait_for(
            lambda: rig.messages and rig.messages[-1].status == sentinel, WAIT, "the sentinel"
        )

    rig.runner.run(sentinel_delivered())
    assert rig.messages[-1].ready
    assert not rig.errors.records, [r.getMessage() for r in rig.errors.records]
    assert not rig.loop_errors, rig.loop_errors
