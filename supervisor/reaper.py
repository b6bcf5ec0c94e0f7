"""The one reaper of the agent: SIGCHLD -> waitpid(-1) -> per-pid futures.

A watcher per child (asyncio's child watchers, `subprocess`) would miss orphaned
grandchildren, which the agent adopts as a child subreaper, and each would steal the
others' exit statuses. Instead one SIGCHLD handler, run on the event loop (asyncio's
signal handling only queues; the handler itself runs as a normal callback), loops
`waitpid(-1, WNOHANG)` until nothing is left and resolves the future of each pid.

Invariants:
- Every child of the agent is reaped, watched or not: no zombies.
- `watch(pid)` gets the status even when the child was reaped before it was called:
  unclaimed statuses are kept for `unclaimed_ttl` seconds (at most `max_unclaimed`).
  Statuses of adopted grandchildren are never claimed and simply age out.
- Nothing else in the agent may call waitpid or use asyncio subprocesses.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import time
from dataclasses import dataclass

#: How long the status of a child nobody watches (yet) is kept.
UNCLAIMED_TTL = 60.0
#: At most this many unclaimed statuses are kept (oldest dropped first).
MAX_UNCLAIMED = 4096
#: Upper bound of waitpid calls per SIGCHLD, so a fork bomb of exiting children cannot
#: hold the loop; the rest is picked up by a follow-up call scheduled right away.
MAX_REAPS_PER_TICK = 1000

PR_SET_CHILD_SUBREAPER = 36
#: Deaths by these signals count as a clean end, as systemd's Restart=on-failure has it.
CLEAN_SIGNALS = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE})


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended: exactly one of `code` (exited) and `signal` (killed) is set."""

    code: int | None
    signal: int | None

    @classmethod
    def from_wait_status(cls, status: int) -> ExitStatus:
        if os.WIFSIGNALED(status):
            return cls(code=None, signal=os.WTERMSIG(status))
        return cls(code=os.WEXITSTATUS(status), signal=None)

    @property
    def success(self) -> bool:
        return self.code == 0

    @property
    def clean(self) -> bool:
        """Exit code 0, or killed by one of systemd's "clean" signals (SIGHUP, SIGINT,
        SIGTERM, SIGPIPE): what `restart = on-failure` does not restart."""
        return self.success or self.signal in CLEAN_SIGNALS

    @property
    def signal_name(self) -> str:
        if self.signal is None:
            return ""
        try:
            return signal.Signals(self.signal).name
        except ValueError:
            return f"signal {self.signal}"

    def describe(self) -> str:
        """`exited with code 1` / `killed by SIGKILL`."""
        if self.signal is not None:
            return f"killed by {self.signal_name}"
        return f"exited with code {self.code}"

    def short(self) -> str:
        """`code 1` / `signal SIGKILL` (WorkerStatus.last_exit)."""
        if self.signal is not None:
            return f"signal {self.signal_name}"
        return f"code {self.code}"


def set_child_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (Linux prctl). False if refused."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0


class Reaper:
    """Reaps every child of the process and hands each exit status to its watcher.

    Use from one event loop, in the main thread (signal handlers): `start()`, then
    `watch(pid)` right after each spawn, `close()` at the end.
    """

    def __init__(
        self,
        *,
        subreaper: bool = False,
        unclaimed_ttl: float = UNCLAIMED_TTL,
        max_unclaimed: int = MAX_UNCLAIMED,
    ) -> None:
        self._subreaper = subreaper
        self._ttl = unclaimed_ttl
        self._max_unclaimed = max_unclaimed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchers: dict[int, asyncio.Future[ExitStatus]] = {}
        # pid -> (status, monotonic time reaped), oldest first
        self._unclaimed: collections.OrderedDict[int, tuple[ExitStatus, float]] = (
            collections.OrderedDict()
        )
        self._follow_up: asyncio.Handle | None = None
        self.reaped = 0  # total, for tests and metrics

    def start(self) -> None:
        """Install the SIGCHLD handler (and become a subreaper if asked); reap at once."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self._subreaper and not set_child_subreaper():
            raise OSError("prctl(PR_SET_CHILD_SUBREAPER) failed")
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()  # children that exited before the handler existed

    def watch(self, pid: int, *, since: float | None = None) -> asyncio.Future[ExitStatus]:
        """A future resolved with the exit status of child `pid`.

        Call it right after spawn, before awaiting anything, and the status cannot be
        missed. `since` (a time.monotonic() taken before the spawn) ignores a kept
        status older than it: that one belonged to an earlier process with the same
        pid. Several watch() calls for one pid share one future.
        """
        loop = self._loop or asyncio.get_running_loop()
        fut = self._watchers.get(pid)
        if fut is not None and not fut.done():
            return fut
        fut = loop.create_future()
        kept = self._unclaimed.pop(pid, None)
        if kept is not None and (since is None or kept[1] >= since):
            fut.set_result(kept[0])
            return fut
        self._watchers[pid] = fut
        return fut

    def reap(self) -> None:
        """Collect every exited child now (the SIGCHLD handler; safe to call any time)."""
        self._follow_up = None
        now = time.monotonic()
        for _ in range(MAX_REAPS_PER_TICK):
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break  # no children at all
            except InterruptedError:
                continue
            if pid == 0:
                break  # children exist, none has exited
            self.reaped += 1
            self._deliver(pid, ExitStatus.from_wait_status(status), now)
        else:
            if self._loop is not None and self._follow_up is None:
                self._follow_up = self._loop.call_soon(self.reap)
        self._expire(now)

    def _deliver(self, pid: int, status: ExitStatus, now: float) -> None:
        fut = self._watchers.pop(pid, None)
        if fut is not None and not fut.done():
            fut.set_result(status)
            return
        self._unclaimed[pid] = (status, now)
        self._unclaimed.move_to_end(pid)

    def _expire(self, now: float) -> None:
        while self._unclaimed:
            pid, (_, when) = next(iter(self._unclaimed.items()))
            if len(self._unclaimed) <= self._max_unclaimed and now - when < self._ttl:
                break
            del self._unclaimed[pid]

    @property
    def subreaper(self) -> bool:
        """Whether orphaned descendants are re-parented to us (and reaped here)."""
        return self._subreaper

    @property
    def watched(self) -> list[int]:
        """Pids with a pending watcher."""
        return [pid for pid, fut in self._watchers.items() if not fut.done()]

    def close(self) -> None:
        """Remove the SIGCHLD handler; pending watchers are cancelled.

        Children still running stay unreaped until someone else waits for them: stop
        every worker before closing the reaper.
        """
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGCHLD)
            self.reap()
        if self._follow_up is not None:
            self._follow_up.cancel()
            self._follow_up = None
        watchers, self._watchers = self._watchers, {}
        for fut in watchers.values():
            fut.cancel()


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to process group `pgid`; False when no process is left in it.

    A worker leads its own process group (spawn uses setsid), so `pgid` is its pid. The
    group id stays reserved while any member lives, even after the leader was reaped,
    so this never hits an unrelated process group.
    """
    if pgid <= 1:
        raise ValueError(f"refusing to signal process group {pgid}")
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def signal_process(pid: int, sig: int) -> bool:
    """Send `sig` to one process; False when it no longer exists."""
    if pid <= 1:
        raise ValueError(f"refusing to signal pid {pid}")
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def process_alive(pid: int) -> bool:
    """Whether a process `pid` exists (somebody else's counts: signal 0 was refused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Async spelling of `signal_group` (for call sites inside coroutines)."""
    return signal_group(pgid, sig)
