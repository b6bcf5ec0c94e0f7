"""The preload side of svcd's fork-server protocol: import once, fork each worker.

With `preload = true` svcd starts the program once per service generation with one
inherited socket named `svcd-forkserver` (LISTEN_FDNAMES) and no listeners. The program
imports its code and builds its Worker as usual; `Worker.run()` then lands here instead
of serving. This process (the *template*) says hello and forks one worker per request:

    template -> svcd   {"forkserver": 1, "pid": P}                  once, when ready
    svcd -> template   {"env": {...}, "fd_names": [...], "agent_pid": A}
                       + SCM_RIGHTS: the listening fds, then stdout, then stderr
    fork -> svcd       {"pid": W}  or  {"error": "why"}             one per request

Each worker is forked twice (template -> intermediate -> worker) and the intermediate
exits at once, so the worker is re-parented to svcd, a child subreaper: svcd reaps it,
signals its process group and sees its exit like any spawned worker's. In the worker,
`become_worker` does what svcd's exec trampoline does for a spawned program: its own
session, PR_SET_PDEATHSIG once svcd is its parent, fds 3.. / 1 / 2 in place, the
environment replaced by the request's (LISTEN_PID = its own pid), and returns into
`runtime.run`, which then serves exactly as if the program had just been exec'd and
ends the process with `end_worker` (`_exit`, no interpreter teardown) after the drain.

Invariants: the template never runs an event loop and never serves a connection (a
loop or its threads must not cross a fork); it exits when svcd closes the channel;
whatever the program opened while importing is shared by every worker (as with
gunicorn's --preload), which is the user's business, not ours.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, NoReturn

from server_core.runtime import FORKSERVER_CHANNEL, SD_LISTEN_FDS_START

log = logging.getLogger("server_core")

MAX_REQUEST = 1024 * 1024  # the environment travels in the request
MAX_FDS = 250  # SCM_MAX_FD is 253
PR_SET_PDEATHSIG = 1
#: How long a forked worker waits to be re-parented to svcd once the intermediate exited.
REPARENT_TIMEOUT = 5.0
REPARENT_POLL = 0.0002
EXIT_SETUP_FAILED = 125
EXIT_PARENT_GONE = 124


def channel_from_environ() -> socket.socket | None:
    """The fork-server channel passed by svcd, or None (then this is no template).

    Consumes LISTEN_* when it finds the channel, so nothing else treats fd 3 as a
    listener.
    """
    env = os.environ
    if env.get("LISTEN_FDNAMES") != FORKSERVER_CHANNEL or env.get("LISTEN_PID") != str(os.getpid()):
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    sock.set_inheritable(False)
    sock.setblocking(True)
    return sock


def serve_forks(channel: socket.socket) -> bool:
    """Fork a worker per request until svcd closes the channel.

    Returns True in a forked worker (which must go on to serve: its environment and fds
    are now its own) and False in the template once svcd is done with it.
    """
    # Inherited and not ours to keep: the template answers nobody's signals but svcd's
    # SIGTERM (default action) and must not die of a stray terminal SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel.send(json.dumps({"forkserver": 1, "pid": os.getpid()}).encode())
    log.info("preloaded: forking workers on request")
    while True:
        try:
            request, fds = _receive(channel)
        except ConnectionError:
            return False
        if request is None:
            return False  # svcd closed the channel: this generation is over
        if _fork_worker(channel, request, fds):
            return True


def _receive(channel: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    fds = array.array("i")
    data, ancdata, _flags, _addr = channel.recvmsg(
        MAX_REQUEST, socket.CMSG_SPACE(MAX_FDS * fds.itemsize)
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), list(fds)


def _fork_worker(channel: socket.socket, request: dict[str, Any], fds: list[int]) -> bool:
    """Double fork; True in the worker. The intermediate answers svcd with the pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        middle = os.fork()
    except OSError as exc:
        _reply(channel, {"error": f"fork failed: {exc.strerror}"})
        _close_all(fds)
        return False
    if middle == 0:
        code = 0
        try:
            worker = os.fork()
            if worker == 0:
                become_worker(channel, request, fds)
                return True
            _reply(channel, {"pid": worker})
        except BaseException as exc:  # the intermediate must always _exit
            _reply(channel, {"error": f"fork failed: {exc}"})
            code = 1
        os._exit(code)
    _close_all(fds)
    _, status = os.waitpid(middle, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        log.warning("fork intermediate ended with status %d", status)
    return False


def become_worker(channel: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
    """In the freshly forked worker: session, parent-death signal, fds, environment.

    Exits (never returns) when svcd is gone or a step fails, like the trampoline would.
    """
    try:
        os.setsid()
        _wait_for_reparenting(int(request["agent_pid"]))
        names = [str(n) for n in request["fd_names"]]
        _place_fds(channel.detach(), fds, len(names))
        env = {str(k): str(v) for k, v in request["env"].items()}
        if names:
            env["LISTEN_PID"] = str(os.getpid())
            env["LISTEN_FDS"] = str(len(names))
            env["LISTEN_FDNAMES"] = ":".join(names)
        if env.get("WATCHDOG_USEC"):
            env["WATCHDOG_PID"] = str(os.getpid())
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except SystemExit:
        raise
    except BaseException as exc:  # a half-made worker must not serve
        try:
            os.write(2, f"svcd preload: worker setup failed: {exc}\n".encode())
        finally:
            os._exit(EXIT_SETUP_FAILED)


def end_worker(code: int) -> NoReturn:
    """End a forked worker once it has drained: flush what it wrote, then `_exit`.

    A forked worker shares every object the template made while importing. Normal
    interpreter exit would run their finalizers and the template's atexit handlers in
    each worker (closing a pooled connection the template and its siblings still use,
    say), as multiprocessing avoids for its fork children the same way; it would also
    spend tens of milliseconds tearing down modules while svcd waits for the old
    generation to be gone. Threads the worker itself started are joined first, as at a
    normal exit.
    """
    try:
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _wait_for_reparenting(agent_pid: int) -> None:
    """Wait until the intermediate is gone and svcd adopted us; then die with svcd.

    PR_SET_PDEATHSIG fires when the *current* parent exits, so it is set only once svcd
    is the parent; if svcd itself is gone by then, nobody would ever stop us: exit.
    """
    deadline = time.monotonic() + REPARENT_TIMEOUT
    middle = os.getppid()
    while os.getppid() == middle and middle != agent_pid:
        if time.monotonic() > deadline:
            os._exit(EXIT_PARENT_GONE)
        time.sleep(REPARENT_POLL)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os.write(2, b"svcd preload: prctl(PR_SET_PDEATHSIG) failed\n")
        os._exit(EXIT_SETUP_FAILED)
    if os.getppid() != agent_pid:
        os._exit(EXIT_PARENT_GONE)  # adopted by someone else: svcd is no subreaper or gone


def _place_fds(channel_fd: int, fds: list[int], listeners: int) -> None:
    """fds[:listeners] -> 3.., fds[listeners] -> 1, fds[listeners + 1] -> 2.

    Every source is first copied above all sources and targets, so no dup2 overwrites
    a source still needed (the channel itself sits at 3, where the first listener goes).
    """
    if len(fds) != listeners + 2:
        raise ValueError(f"{len(fds)} fds for {listeners} listeners + stdout + stderr")
    targets = [SD_LISTEN_FDS_START + i for i in range(listeners)] + [1, 2]
    floor = max([*fds, *targets, channel_fd]) + 1
    copies = [os.dup2(fd, floor + i, inheritable=False) for i, fd in enumerate(fds)]
    _close_all([*fds, channel_fd])
    for copy, target in zip(copies, targets, strict=True):
        os.dup2(copy, target, inheritable=True)
    _close_all(copies)


def _reply(channel: socket.socket, message: dict[str, Any]) -> None:
    # svcd gone: nothing to tell; the worker notices through its parent-death signal
    with contextlib.suppress(OSError):
        channel.send(json.dumps(message).encode())


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
