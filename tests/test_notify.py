"""supervisor.notify: per-worker sd_notify sockets, parsing, limits and isolation."""

from __future__ import annotations

import array
import asyncio
import functools
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from supervisor.notify import (
    DEFAULT_BURST,
    MAX_DATAGRAM,
    SOCKET_MODE,
    NotifyEndpoint,
    NotifyMessage,
    parse_datagram,
)
from supervisor.reaper import Reaper
from supervisor.spawn import SpawnRequest, clean_environ, spawn
from tests.waiting import wait_for

WAIT = 10.0
#: Datagrams sent before letting the reader run: Linux queues only
#: net.unix.max_dgram_qlen (10 by default) per socket, and a blocked sendto in the
#: loop's own thread would never return.
BATCH = 8


@pytest.fixture
def sender() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_DATAGRAM)
    yield s
    s.close()


class Endpoint:
    """A NotifyEndpoint plus the messages it delivered."""

    def __init__(self, directory: Path, name: str, **kwargs: object) -> None:
        self.messages: list[NotifyMessage] = []
        self.ep = NotifyEndpoint(directory, name, self.messages.append, **kwargs)  # type: ignore[arg-type]

    @property
    def path(self) -> str:
        return self.ep.path


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., Endpoint]]:
    made: list[Endpoint] = []

    def factory(name: str = "api-0", **kwargs: object) -> Endpoint:
        e = Endpoint(tmp_path / "notify", name, **kwargs)
        made.append(e)
        return e

    yield factory
    for e in made:
        e.ep.close()


def test_parse_datagram() -> None:
    assert parse_datagram(b"READY=1\nSTATUS=a=b\n\n") == ({"READY": "1", "STATUS": "a=b"}, False)
    assert parse_datagram(b"noequals\nREADY=1") == ({"READY": "1"}, True)
    assert parse_datagram(b"=x\nbad key=1") == ({}, True)
    assert parse_datagram(b"\xff\xfe") == ({}, True)


async def test_fields_are_parsed(make: Callable[..., Endpoint], sender: socket.socket) -> None:
    e = make()
    stats = {"connections": 3, "requests": 10, "metrics": [{"name": "x", "value": 1}]}
    sender.sendto(
        f"READY=1\nSTATUS=serving\nMAINPID=42\nX_SVCD_STATS={json.dumps(stats)}".encode(),
        e.path,
    )
    sender.sendto(b"WATCHDOG=1", e.path)
    sender.sendto(b"STOPPING=1\nRELOADING=1", e.path)
    await wait_for(lambda: len(e.messages) == 3, WAIT, "three messages")
    first, second, third = e.messages
    assert first.ready and first.status == "serving" and first.stats == stats
    assert first.mainpid == 42 and not first.stopping and not first.watchdog
    assert first.sender_pid == os.getpid()  # from SCM_CREDENTIALS
    assert second.watchdog and not second.ready and second.status is None
    assert third.stopping and third.reloading
    assert e.ep.rejected == 0


async def test_malformed_input_is_counted_and_ignored(
    make: Callable[..., Endpoint], sender: socket.socket
) -> None:
    e = make()
    sender.sendto(b"\xff\xfe\xfd", e.path)  # not UTF-8: dropped whole
    sender.sendto(b"garbage line\nREADY=1", e.path)  # bad line skipped, the rest counts
    sender.sendto(b"X_SVCD_STATS={not json\nSTATUS=x", e.path)
    sender.sendto(b"X_SVCD_STATS=[1, 2]", e.path)  # JSON, but not an object
    sender.sendto(b"MAINPID=abc", e.path)
    sender.sendto(b"", e.path)
    sender.sendto(b"STATUS=" + b"x" * MAX_DATAGRAM, e.path)  # over 64 KiB
    sender.sendto(b"STATUS=after", e.path)
    await wait_for(lambda: e.ep.received == 8, WAIT, "all datagrams read")
    await wait_for(lambda: e.messages and e.messages[-1].status == "after", WAIT, "last one")
    assert e.ep.rejected == 6
    assert [m.ready for m in e.messages] == [True, False, False, False, False]
    assert e.messages[1].stats is None and e.messages[1].status == "x"
    assert e.messages[2].stats is None
    assert e.messages[3].mainpid is None


async def test_callback_errors_do_not_stop_the_reader(
    tmp_path: Path, sender: socket.socket
) -> None:
    seen: list[str | None] = []

    def flaky(msg: NotifyMessage) -> None:
        seen.append(msg.status)
        if msg.status == "boom":
            raise RuntimeError("bug in a callback")

    ep = NotifyEndpoint(tmp_path, "w", flaky)
    try:
        sender.sendto(b"STATUS=boom", ep.path)
        sender.sendto(b"STATUS=fine", ep.path)
        await wait_for(lambda: seen == ["boom", "fine"], WAIT, "both messages")
    finally:
        ep.close()


async def test_rate_limit_merges_and_never_loses_flags(
    make: Callable[..., Endpoint], sender: socket.socket
) -> None:
    e = make(rate=1.0, burst=5)

    def received(n: int) -> bool:
        return e.ep.received == n

    for i in range(20):
        line = "READY=1" if i == 10 else f"STATUS=s{i}"
        sender.sendto(f"{line}\nX_SVCD_STATS={{\"requests\": {i}}}".encode(), e.path)
        if i % BATCH == BATCH - 1:  # the kernel queues few datagrams: let the reader run
            await wait_for(functools.partial(received, i + 1), WAIT, "datagrams read")
    await wait_for(lambda: sum(m.merged for m in e.messages) == 20, WAIT, "every datagram")
    head = e.messages[:5]
    assert [m.status for m in head] == [f"s{i}" for i in range(5)]
    assert all(m.merged == 1 for m in head)
    assert len(e.messages) < 20  # merged: 6 unless this machine stalled for a second
    assert e.ep.merged > 0
    assert any(m.ready for m in e.messages)  # READY=1 in the middle of the flood survives
    last = e.messages[-1]
    assert last.status == "s19" and last.stats == {"requests": 19}  # last value wins


async def test_a_flood_from_a_worker_is_fully_accounted_for(make: Callable[..., Endpoint]) -> None:
    e = make()
    count = 3000
    code = textwrap.dedent(
        f"""
        import os, socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        for i in range({count}):
            s.sendto(b'X_SVCD_STATS={{"requests": %d}}' % i, os.environ["NOTIFY_SOCKET"])
        s.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
        """
    )
    reaper = Reaper()
    reaper.start()
    try:
        pid = spawn(SpawnRequest([sys.executable, "-c", code],
                                 {**clean_environ(os.environ), "NOTIFY_SOCKET": e.path}))
        async with asyncio.timeout(WAIT * 3):
            status = await reaper.watch(pid)
        assert status.success
    finally:
        reaper.close()
    await wait_for(lambda: sum(m.merged for m in e.messages) == count + 1, WAIT, "every datagram")
    assert e.messages[-1].ready
    assert e.messages[-1].stats == {"requests": count - 1} or e.messages[-2].stats == {
        "requests": count - 1
    }
    assert e.ep.delivered < count  # the callback ran less often than datagrams came
    assert e.ep.delivered >= DEFAULT_BURST


async def test_one_worker_cannot_speak_for_another(make: Callable[..., Endpoint]) -> None:
    a = make("api-0")
    b = make("api-1")
    reaper = Reaper()
    reaper.start()
    code = textwrap.dedent(
        """
        import os, socket, sys
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # claim to be the other worker in every way the protocol allows
        s.sendto(("READY=1\\nMAINPID=%s\\nSTATUS=I am %s" % (sys.argv[1], sys.argv[2])).encode(),
                 os.environ["NOTIFY_SOCKET"])
        """
    )
    try:
        # worker A speaks on its own socket, pretending to be B
        pid_a = spawn(SpawnRequest([sys.executable, "-c", code, "99999", "api-1"],
                                   {**clean_environ(os.environ), "NOTIFY_SOCKET": a.path}))
        # worker B was (wrongly) handed A's path: it can only ever affect A's endpoint
        pid_b = spawn(SpawnRequest([sys.executable, "-c", code, "99998", "api-1"],
                                   {**clean_environ(os.environ), "NOTIFY_SOCKET": a.path}))
        async with asyncio.timeout(WAIT):
            assert (await reaper.watch(pid_a)).success
            assert (await reaper.watch(pid_b)).success
    finally:
        reaper.close()
    await wait_for(lambda: len(a.messages) == 2, WAIT, "both datagrams on A's endpoint")
    assert {m.sender_pid for m in a.messages} == {pid_a, pid_b}
    assert b.messages == [] and b.ep.received == 0


async def test_fds_passed_with_the_datagram_are_closed(
    make: Callable[..., Endpoint], sender: socket.socket
) -> None:
    e = make()
    before = len(os.listdir("/proc/self/fd"))
    r, w = os.pipe()
    try:
        fds = array.array("i", [r, w])
        sender.sendmsg([b"STATUS=with fds"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)],
                       0, e.path)
    finally:
        os.close(r)
        os.close(w)
    await wait_for(lambda: e.messages, WAIT, "the message")
    assert e.messages[0].status == "with fds"
    assert len(os.listdir("/proc/self/fd")) == before


async def test_socket_file_mode_and_close(make: Callable[..., Endpoint]) -> None:
    e = make()
    st = os.stat(e.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == SOCKET_MODE
    assert st.st_uid == os.geteuid()
    e.ep.close()
    e.ep.close()  # idempotent
    with pytest.raises(FileNotFoundError):
        os.stat(e.path)


async def test_path_too_long_or_bad_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="longer than"):
        NotifyEndpoint(tmp_path, "x" * 120, lambda m: None)
    for bad in ("", "../escape", ".hidden"):
        with pytest.raises(ValueError, match="bad notify socket name"):
            NotifyEndpoint(tmp_path, bad, lambda m: None)


async def test_a_leftover_socket_file_is_replaced(
    make: Callable[..., Endpoint], sender: socket.socket, tmp_path: Path
) -> None:
    # an agent that died without cleaning up left a socket file with this name
    path = tmp_path / "notify" / "w.notify"
    path.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as old:
        old.bind(str(path))
    second = make("w")
    assert second.path == str(path)
    sender.sendto(b"READY=1", second.path)
    await wait_for(lambda: second.messages, WAIT, "message on the new socket")


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
async def test_only_the_workers_user_can_send() -> None:
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3")
    nobody = pwd.getpwnam("nobody")
    other = pwd.getpwnam("daemon")
    directory = Path(tempfile.mkdtemp(prefix="svcd-notify-"))
    os.chmod(directory, 0o711)  # others may reach their own socket, not list the directory
    messages: list[NotifyMessage] = []
    ep = NotifyEndpoint(directory / "n", "api-0", messages.append, uid=nobody.pw_uid)
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "try:\n"
        "    s.sendto(b'READY=1', sys.argv[1]); print('sent')\n"
        "except PermissionError:\n"
        "    print('denied')\n"
    )
    try:
        st = os.stat(ep.path)
        assert st.st_uid == nobody.pw_uid and stat.S_IMODE(st.st_mode) == SOCKET_MODE

        def send_as(user: pwd.struct_passwd) -> str:
            proc = subprocess.run(
                ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                 "--clear-groups", python, "-c", code, ep.path],
                capture_output=True, text=True, timeout=WAIT, check=False, cwd="/",
            )
            return proc.stdout.strip() or proc.stderr

        assert await asyncio.to_thread(send_as, other) == "denied"
        assert await asyncio.to_thread(send_as, nobody) == "sent"
        await wait_for(lambda: messages, WAIT, "nobody's READY=1")
        assert len(messages) == 1 and messages[0].ready
    finally:
        ep.close()
        shutil.rmtree(directory, ignore_errors=True)
