"""supervisor.reaper: one SIGCHLD-driven waitpid(-1) loop, with real children."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from supervisor.reaper import ExitStatus, Reaper, kill_group, signal_group, signal_process
from supervisor.spawn import SpawnRequest, clean_environ, spawn
from tests.waiting import wait_for

WAIT = 10.0
ENV = clean_environ(os.environ)


@pytest.fixture
async def reaper() -> AsyncIterator[Reaper]:
    r = Reaper()
    r.start()
    try:
        yield r
    finally:
        r.close()


def start(*argv: str) -> int:
    return spawn(SpawnRequest(list(argv), ENV))


def py(code: str) -> int:
    return start(sys.executable, "-c", textwrap.dedent(code))


def test_exit_status_describes_itself() -> None:
    assert ExitStatus(code=1, signal=None).describe() == "exited with code 1"
    assert ExitStatus(code=None, signal=signal.SIGKILL).describe() == "killed by SIGKILL"
    assert ExitStatus(code=0, signal=None).success
    assert not ExitStatus(code=None, signal=signal.SIGTERM).success
    assert ExitStatus(code=None, signal=signal.SIGTERM).short() == "signal SIGTERM"
    assert ExitStatus(code=3, signal=None).short() == "code 3"


async def test_watch_delivers_exit_code_and_signal(reaper: Reaper) -> None:
    ok = start("true")
    ok_status = reaper.watch(ok)
    bad = start("sh", "-c", "exit 3")
    bad_status = reaper.watch(bad)
    killed = start("sleep", "60")
    killed_status = reaper.watch(killed)
    os.kill(killed, signal.SIGKILL)
    async with asyncio.timeout(WAIT):
        assert await ok_status == ExitStatus(code=0, signal=None)
        assert await bad_status == ExitStatus(code=3, signal=None)
        assert await killed_status == ExitStatus(code=None, signal=signal.SIGKILL)


async def test_status_of_a_child_reaped_before_watch_is_kept(reaper: Reaper) -> None:
    before = time.monotonic()
    pid = start("sh", "-c", "exit 7")
    reaped = reaper.reaped
    await wait_for(lambda: reaper.reaped > reaped, WAIT, "the child to be reaped unwatched")
    fut = reaper.watch(pid, since=before)
    assert fut.done() and fut.result() == ExitStatus(code=7, signal=None)


async def test_a_stale_status_of_a_reused_pid_is_ignored(reaper: Reaper) -> None:
    pid = start("true")
    reaped = reaper.reaped
    await wait_for(lambda: reaper.reaped > reaped, WAIT, "the child to be reaped")
    # a later process that got the same pid must not inherit the old status
    fut = reaper.watch(pid, since=time.monotonic())
    assert not fut.done()
    reaper.close()  # cancels the watcher
    assert fut.cancelled()


async def test_many_children_exiting_at_once(reaper: Reaper) -> None:
    count = 40
    pids = [start("sh", "-c", f"exit {i % 5}") for i in range(count)]
    futures = [reaper.watch(pid) for pid in pids]
    async with asyncio.timeout(WAIT):
        statuses = await asyncio.gather(*futures)
    assert [s.code for s in statuses] == [i % 5 for i in range(count)]
    me = psutil.Process()
    assert not [c for c in me.children() if c.pid in pids]  # no zombies left


async def test_unclaimed_statuses_are_bounded() -> None:
    r = Reaper(max_unclaimed=3)
    r.start()
    try:
        pids = [start("true") for _ in range(6)]
        await wait_for(lambda: r.reaped >= 6, WAIT, "children reaped")
        r.reap()  # expiry runs after reaping
        kept = [pid for pid in pids if r.watch(pid).done()]
        assert 1 <= len(kept) <= 3  # the last reaped ones
    finally:
        r.close()


async def test_several_watchers_share_one_future(reaper: Reaper) -> None:
    pid = start("sleep", "60")
    a, b = reaper.watch(pid), reaper.watch(pid)
    assert a is b
    assert reaper.watched == [pid]
    signal_process(pid, signal.SIGTERM)
    async with asyncio.timeout(WAIT):
        assert (await a).signal == signal.SIGTERM


async def test_signal_group_reaches_grandchildren_and_tolerates_gone_groups(
    reaper: Reaper, tmp_path: Path
) -> None:
    pidfile = tmp_path / "grandchild"
    # the worker forks a grandchild in its own process group, then waits
    pid = py(
        f"""
        import os, subprocess, time
        child = subprocess.Popen(["sleep", "60"])
        open({str(pidfile)!r}, "w").write(str(child.pid))
        child.wait()
        """
    )
    status = reaper.watch(pid)
    grandchild = int(await wait_for(lambda: pidfile.read_text(), WAIT, "grandchild pid"))
    assert os.getpgid(grandchild) == pid
    assert signal_group(pid, signal.SIGKILL)
    async with asyncio.timeout(WAIT):
        assert (await status).signal == signal.SIGKILL
    await wait_for(lambda: not psutil.pid_exists(grandchild) or
                   psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE,
                   WAIT, "grandchild killed")
    # the group is gone: no error, just False
    await wait_for(lambda: not signal_group(pid, 0), WAIT, "group empty")
    assert not await kill_group(pid, signal.SIGKILL)
    assert not signal_process(pid, signal.SIGKILL)
    with pytest.raises(ValueError):
        signal_group(1, signal.SIGTERM)
    with pytest.raises(ValueError):
        signal_group(0, signal.SIGTERM)


async def test_close_removes_the_handler_and_cancels_watchers() -> None:
    r = Reaper()
    r.start()
    pid = start("sleep", "60")
    fut = r.watch(pid)
    r.close()
    assert fut.cancelled()
    loop = asyncio.get_running_loop()
    assert not loop.remove_signal_handler(signal.SIGCHLD)  # nothing left installed
    os.kill(pid, signal.SIGKILL)
    await wait_for(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, WAIT, "manual reap")


# Run in a process of its own: becoming a subreaper is for the rest of a process's life.
SUBREAPER = textwrap.dedent(
    """
    import asyncio, os, sys
    sys.path.insert(0, {root!r})
    from supervisor.reaper import Reaper
    from supervisor.spawn import SpawnRequest, clean_environ, spawn

    async def main():
        r = Reaper(subreaper=True)
        r.start()
        # the worker double-forks a grandchild that outlives it, then exits
        pid = spawn(SpawnRequest(["sh", "-c", "(sleep 0.2; exit 5) & echo $! > {pidfile}"],
                                 clean_environ(os.environ)))
        await r.watch(pid)
        async with asyncio.timeout(10):
            while not os.path.exists({pidfile!r}) or not open({pidfile!r}).read().strip():
                await asyncio.sleep(0.01)
        orphan = int(open({pidfile!r}).read())
        # adopted by us, then reaped by the same SIGCHLD loop: its status is kept
        async with asyncio.timeout(10):
            status = await r.watch(orphan)
        r.close()
        zombies = [l for l in os.popen("ps -o stat= --ppid %d" % os.getpid()) if "Z" in l]
        print(status.code, len(zombies))

    asyncio.run(main())
    """
)


def test_subreaper_reaps_orphaned_grandchildren(tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parent.parent)
    pidfile = str(tmp_path / "orphan")
    proc = subprocess.run(
        [sys.executable, "-c", SUBREAPER.format(root=root, pidfile=pidfile)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["5", "0"]
