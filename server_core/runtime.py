"""Process-level running of a worker: inherited sockets, event loop, signals, prefork.

Three modes, picked from the environment:
- svcd preload template (`preload = true`): the only inherited fd is the
  `svcd-forkserver` channel; the process forks a worker per request (forkserver.py),
  and each forked worker goes on below as if it had been started under svcd.
- under svcd (or systemd): `LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES` name inherited
  listening sockets from fd 3; the worker serves every one of them (the service's and
  the private `svcd-health` one) in this process, sends sd_notify READY/STOPPING/
  WATCHDOG and its stats (which leave out the `svcd-health` connections: those are
  the agent's checks), and ignores `count` (the supervisor runs the copies).
- alone: it binds the address itself; `count=N` forks N children that share that one
  socket (not SO_REUSEPORT, which strands queued connections when a process exits);
  the parent restarts a child that dies and forwards SIGTERM/SIGINT to all.

Invariants: the LISTEN_*, NOTIFY_SOCKET and WATCHDOG_* variables are removed from
`os.environ` once read, so programs the worker spawns do not act on them; the event
loop is created after forking (a loop never crosses a fork); the parent never runs an
event loop (it waits for signals with sigtimedwait, bounded); stopping the parent
always reaps its children (SIGTERM, bounded wait, SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from server_core.address import bind
from server_core.notify import Notifier

if TYPE_CHECKING:
    from server_core.worker import Worker

log = logging.getLogger("server_core")

SD_LISTEN_FDS_START = 3
LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
WATCHDOG_ENV = ("WATCHDOG_USEC", "WATCHDOG_PID")
DRAIN_TIMEOUT_ENV = "SVCD_DRAIN_TIMEOUT"
FORKSERVER_CHANNEL = "svcd-forkserver"  # the preload channel's fd name (forkserver.py)
# The fd name of svcd's private per-worker health listener: its connections are the
# agent's checks, served but not counted as traffic (Server.listen).
HEALTH_LISTENER = "svcd-health"
DEFAULT_DRAIN_TIMEOUT = 20.0

# prefork parent
PARENT_WAIT_SLICE = 0.5  # seconds per sigtimedwait: bounds every wait of the parent loop
RESPAWN_MIN_LIFETIME = 1.0  # a child that died younger than this is restarted after a pause
RESPAWN_PAUSE = 1.0
KILL_MARGIN = 5.0  # seconds past the drain timeout before children get SIGKILL
PR_SET_PDEATHSIG = 1

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def inherited_sockets(unset: bool = True) -> list[tuple[str, socket.socket]]:
    """The sockets passed by socket activation, as (name, socket); [] when none.

    Like sd_listen_fds(): only when LISTEN_PID is our pid. Each fd is wrapped with
    `socket.socket(fileno=fd)`, which reads the real family (AF_INET stays AF_INET, so
    TCP options apply) and made close-on-exec. Fds that are not listening stream
    sockets are skipped with a warning.
    """
    env = os.environ
    pid, count, names = (env.get(name, "") for name in LISTEN_ENV)
    if unset:
        for name in LISTEN_ENV:
            env.pop(name, None)
    if not count or pid != str(os.getpid()):
        return []
    try:
        n = int(count)
    except ValueError:
        log.warning("ignoring LISTEN_FDS=%r: not a number", count)
        return []
    fd_names = names.split(":") if names else []
    result: list[tuple[str, socket.socket]] = []
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        name = fd_names[i] if i < len(fd_names) else "unknown"
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("inherited fd %d (%s) is not a socket: %s", fd, name, exc)
            continue
        sock.set_inheritable(False)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.type != socket.SOCK_STREAM or not listening:
            log.warning("inherited fd %d (%s) is not a listening stream socket: skipped", fd, name)
            sock.detach()
            continue
        result.append((name, sock))
    return result


def watchdog_interval(unset: bool = True) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None."""
    env = os.environ
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if unset:
        for name in WATCHDOG_ENV:
            env.pop(name, None)
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


def drain_timeout(configured: float | None) -> float:
    """The Worker argument and SVCD_DRAIN_TIMEOUT: the smaller wins (both bound us)."""
    values = [] if configured is None else [configured]
    raw = os.environ.get(DRAIN_TIMEOUT_ENV)
    if raw:
        try:
            values.append(float(raw))
        except ValueError:
            log.warning("ignoring %s=%r: not a number", DRAIN_TIMEOUT_ENV, raw)
    return max(0.0, min(values)) if values else DEFAULT_DRAIN_TIMEOUT


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when available (or asked for), else asyncio's default loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(worker: Worker) -> int:
    """Run `worker` as this process's main program; the exit code (0: stopped cleanly)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s"
        )
    if os.environ.get("LISTEN_FDNAMES") == FORKSERVER_CHANNEL:
        from server_core import forkserver  # only a preload template needs it

        channel = forkserver.channel_from_environ()
        if channel is not None:
            preload_imports(worker)  # once here, not in every forked worker
            if not forkserver.serve_forks(channel):
                return 0  # the template's generation is over
            worker.adopt_environ()  # a forked worker: this process's own identity
            forkserver.end_worker(_serve(worker))
    return _serve(worker)


def _serve(worker: Worker) -> int:
    """Serve the inherited sockets, or bind the address alone; the exit code."""
    inherited = inherited_sockets()
    notifier = Notifier.from_environ()
    watchdog = watchdog_interval()
    if inherited:
        names = ", ".join(f"{name}(fd {sock.fileno()})" for name, sock in inherited)
        log.info("%s: serving inherited sockets %s", worker.address.scheme, names)
        if worker.count > 1:
            log.info("count=%d ignored: the supervisor runs the copies", worker.count)
        sockets = [sock for name, sock in inherited if name != HEALTH_LISTENER]
        probes = [sock for name, sock in inherited if name == HEALTH_LISTENER]
        return serve_in_process(worker, sockets, notifier, watchdog, probes)
    try:
        sock = bind(worker.address, worker.backlog)
    except OSError as exc:
        log.error("cannot listen on %s: %s", worker.address, exc)
        return 1
    log.info("%s: listening on %s", worker.address, sock.getsockname())
    if worker.count > 1:
        return prefork(worker, sock, notifier)
    return serve_in_process(worker, [sock], notifier, watchdog)


def preload_imports(worker: Worker) -> None:
    """Import what serving `worker` needs (its protocol, its event loop) up front."""
    from server_core.protocols import connection_class

    connection_class(worker.address.scheme)
    loop_factory(worker.event_loop)


def serve_in_process(
    worker: Worker,
    sockets: list[socket.socket],
    notifier: Notifier,
    watchdog: float | None,
    probes: Sequence[socket.socket] = (),
) -> int:
    """Run the event loop of one worker process until it has drained.

    `probes` are health-check listeners: served too, not counted in the stats.
    """

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, worker.stop)
        await worker.serve(sockets, notifier=notifier, watchdog=watchdog, probes=probes)

    try:
        with asyncio.Runner(loop_factory=loop_factory(worker.event_loop)) as runner:
            runner.run(main())
    except Exception:
        log.exception("worker failed")
        return 1
    finally:
        notifier.close()
    return 0


class _Child:
    __slots__ = ("index", "pid", "started")

    def __init__(self, index: int, pid: int) -> None:
        self.index = index
        self.pid = pid
        self.started = time.monotonic()


def prefork(worker: Worker, sock: socket.socket, notifier: Notifier) -> int:
    """Fork `worker.count` children sharing `sock`; supervise them until told to stop."""
    watched = {*STOP_SIGNALS, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    children: dict[int, _Child] = {}
    respawn_at: dict[int, float] = {}  # index -> monotonic time

    def spawn(index: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the parent's loop
            code = 1
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
                _die_with_parent()
                worker.index = index
                code = serve_in_process(worker, [sock], Notifier(None), None)
            finally:
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = _Child(index, pid)

    for index in range(worker.count):
        spawn(index)
    notifier.send(f"READY=1\nSTATUS=serving with {worker.count} processes")
    stop_deadline: float | None = None
    while children or (respawn_at and stop_deadline is None):
        info = signal.sigtimedwait(watched, PARENT_WAIT_SLICE)
        now = time.monotonic()
        if info is not None and info.si_signo in STOP_SIGNALS and stop_deadline is None:
            notifier.send("STOPPING=1")
            stop_deadline = now + drain_timeout(worker.drain_timeout) + KILL_MARGIN
            respawn_at.clear()
            for child in children.values():
                _signal(child.pid, signal.SIGTERM)
        _reap(children, respawn_at, stopping=stop_deadline is not None, now=now)
        if stop_deadline is None:
            for index, when in list(respawn_at.items()):
                if now >= when:
                    del respawn_at[index]
                    spawn(index)
        elif now >= stop_deadline:
            for child in children.values():
                _signal(child.pid, signal.SIGKILL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
    sock.close()
    notifier.close()
    return 0


def _reap(
    children: dict[int, _Child], respawn_at: dict[int, float], stopping: bool, now: float
) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        child = children.pop(pid, None)
        if child is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            continue
        log.warning("worker %d (pid %d) exited with %d: restarting", child.index, pid, code)
        young = now - child.started < RESPAWN_MIN_LIFETIME
        respawn_at[child.index] = now + (RESPAWN_PAUSE if young else 0.0)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM this child if the prefork parent dies (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
