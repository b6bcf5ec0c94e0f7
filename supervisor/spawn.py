"""Start one worker process: socket activation, own session, parent-death signal, exec.

`spawn()` uses `os.posix_spawn` (vfork + exec: no Python code runs in the child before
exec, so it is safe while grpc's threads run, unlike `preexec_fn`) with file actions
that place the inherited fds at 3..3+N-1, stdout/stderr at 1/2 and stdin on /dev/null,
and `setsid=True` so the worker leads its own session and process group (the whole
group can be signalled, and a terminal's signals never reach it). The spawned program
is `_trampoline.py`, which finishes what posix_spawn cannot do (privileges, rlimits,
umask, cwd, PR_SET_PDEATHSIG, LISTEN_PID=getpid()) and execs the command.

Invariants:
- Call `spawn` from the event-loop thread: PR_SET_PDEATHSIG fires when the *thread*
  that forked the child exits, so a child forked from a short-lived executor thread
  would be killed when that thread ends.
- Nothing of the agent's own systemd protocol environment (NOTIFY_SOCKET, WATCHDOG_*,
  LISTEN_*) reaches a worker unless the caller puts it there on purpose (a worker's own
  NOTIFY_SOCKET); use `clean_environ` to build the base environment.
- The caller keeps ownership of every fd in the request; spawn closes none of them.
"""

from __future__ import annotations

import grp
import os
import pwd
import resource
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.errors import SupervisorError

TRAMPOLINE = str(Path(__file__).with_name("_trampoline.py"))
#: -I: ignore PYTHON* variables and the user's site dir (the worker's env must not change
#: how the trampoline runs); -S: no site import (startup time).
TRAMPOLINE_FLAGS: tuple[str, ...] = ("-I", "-S")

#: Exit codes of the trampoline (kept in sync with _trampoline.py).
EXIT_EXEC_FAILED = 127  # the command was not found or could not be executed
EXIT_SETUP_FAILED = 125  # user/group/rlimit/umask/cwd/prctl failed; reason on stderr
EXIT_PARENT_GONE = 124  # the agent died before PR_SET_PDEATHSIG was in place
TRAMPOLINE_EXIT_CODES: frozenset[int] = frozenset(
    {EXIT_EXEC_FAILED, EXIT_SETUP_FAILED, EXIT_PARENT_GONE}
)

FIRST_LISTEN_FD = 3
PRIVATE_PREFIX = "_SVCD_"

#: Variables of the agent's own service manager protocols; never inherited by a worker.
AGENT_ONLY_VARS: frozenset[str] = frozenset(
    {
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "INVOCATION_ID",
        "JOURNAL_STREAM",
        "MAINPID",
        "MANAGERPID",
        "SYSTEMD_EXEC_PID",
        "TRIGGER_UNIT",
        "TRIGGER_PATH",
        "TRIGGER_TIMER_REALTIME_USEC",
        "TRIGGER_TIMER_MONOTONIC_USEC",
    }
)

#: Signals reset to their default disposition in the child: whatever the agent ignores
#: or handles must not be inherited as "ignored" by the worker.
_RESET_SIGNALS: tuple[int, ...] = tuple(
    s
    for s in (
        signal.SIGHUP,
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGPIPE,
        signal.SIGALRM,
        signal.SIGTERM,
        signal.SIGCHLD,
        signal.SIGTSTP,
        signal.SIGTTIN,
        signal.SIGTTOU,
        signal.SIGXFSZ,
        signal.SIGWINCH,
    )
)

_EMPTY_RLIMITS: Mapping[str, int] = {}
#: Set by the child itself, whether exec'd through the trampoline or forked from a
#: preload template (LISTEN_PID and WATCHDOG_PID must be the child's own pid).
SET_BY_CHILD = frozenset({"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID"})


class SpawnError(SupervisorError):
    """The child could not be started at all (unknown user, exec of Python failed...)."""


@dataclass
class SpawnRequest:
    """Everything needed to start one worker process.

    fds: inherited sockets, placed at 3.. in this order, named by fd_names (empty: no
    LISTEN_FDNAMES). stdout/stderr: fds for 1/2 (None: the agent's own). user/group:
    names or numeric ids. rlimits: resource name (`nofile`, `RLIMIT_NOFILE`) -> limit,
    applied as soft and hard (-1 = unlimited). pdeathsig: SIGKILL the child when the
    spawning thread dies.
    """

    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str | None = None
    fds: Sequence[int] = ()
    fd_names: Sequence[str] = ()
    stdout: int | None = None
    stderr: int | None = None
    user: str | None = None
    group: str | None = None
    umask: int | None = None
    rlimits: Mapping[str, int] = field(default_factory=lambda: _EMPTY_RLIMITS)
    pdeathsig: bool = True


def clean_environ(base: Mapping[str, str]) -> dict[str, str]:
    """`base` without the agent's own service-manager variables (and our private ones)."""
    return {
        k: v
        for k, v in base.items()
        if k not in AGENT_ONLY_VARS and not k.startswith(PRIVATE_PREFIX)
    }


def passed_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without our private variables and those the child sets for itself."""
    return {
        k: v for k, v in env.items() if not k.startswith(PRIVATE_PREFIX) and k not in SET_BY_CHILD
    }


def spawn(req: SpawnRequest) -> int:
    """Start the process described by `req`; return its pid (= its process group id).

    Returns as soon as the child exists; exec failures of the *command* show up later
    as exit code 127 (message on its stderr). Raises SpawnError when the request is
    invalid (unknown user, bad rlimit, fd names) or the trampoline cannot be started.
    Register the pid with the Reaper right away, before awaiting anything.
    """
    if not req.argv:
        raise SpawnError("empty command")
    env = _child_env(req)
    argv = [sys.executable, *TRAMPOLINE_FLAGS, TRAMPOLINE, *req.argv]
    try:
        return os.posix_spawn(
            sys.executable,
            argv,
            env,
            file_actions=fd_actions(req.fds, req.stdout, req.stderr),
            setsid=True,
            setsigmask=(),
            setsigdef=_RESET_SIGNALS,
        )
    except (OSError, ValueError, TypeError) as exc:  # ValueError: NUL or '=' in env/argv
        raise SpawnError(f"cannot start {req.argv[0]!r}: {exc}") from exc


def _child_env(req: SpawnRequest) -> dict[str, str]:
    if req.fd_names and len(req.fd_names) != len(req.fds):
        raise SpawnError(f"{len(req.fds)} fds but {len(req.fd_names)} fd names")
    for name in req.fd_names:
        if ":" in name or not name:
            raise SpawnError(f"bad fd name {name!r} (empty or contains ':')")
    env = passed_env(req.env)
    private = {
        "PPID": str(os.getpid()),
        "NFDS": str(len(req.fds)),
        "FDNAMES": ":".join(req.fd_names),
        "PDEATHSIG": "1" if req.pdeathsig else "0",
        "CWD": req.cwd or "",
        "UMASK": "" if req.umask is None else format(req.umask, "o"),
        "RLIMITS": _encode_rlimits(req.rlimits),
    }
    ids = _resolve_ids(req.user, req.group)
    if ids is not None:
        uid, gid, groups, passwd = ids
        private["UID"] = "" if uid is None else str(uid)
        private["GID"] = str(gid)
        private["GROUPS"] = ",".join(str(g) for g in groups)
        if passwd is not None:
            # like systemd's User=: the worker's identity, not the agent's
            env["USER"] = env["LOGNAME"] = passwd.pw_name
            env["HOME"] = passwd.pw_dir
    env.update({PRIVATE_PREFIX + k: v for k, v in private.items()})
    return env


def _resolve_ids(
    user: str | None, group: str | None
) -> tuple[int | None, int, list[int], pwd.struct_passwd | None] | None:
    """(uid, gid, supplementary groups, passwd entry), or None when nothing changes."""
    if user is None and group is None:
        return None
    passwd = None
    uid: int | None = None
    gid: int | None = None
    if user is not None:
        try:
            passwd = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except (KeyError, OverflowError):
            if not user.isdigit():
                raise SpawnError(f"unknown user {user!r}") from None
            uid = int(user)  # a numeric uid without a passwd entry is allowed
        else:
            uid, gid = passwd.pw_uid, passwd.pw_gid
    if group is not None:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise SpawnError(f"unknown group {group!r}") from None
    if gid is None:
        gid = uid if uid is not None else os.getgid()
    groups = os.getgrouplist(passwd.pw_name, gid) if passwd is not None else [gid]
    if os.geteuid() != 0:
        # Without root nothing can change; being asked for who we already are is fine.
        if uid in (None, os.getuid()) and gid == os.getgid():
            return None
        raise SpawnError(f"cannot run as user={user} group={group}: the agent is not root")
    return uid, gid, groups, passwd


def _encode_rlimits(rlimits: Mapping[str, int]) -> str:
    items = []
    for name, value in rlimits.items():
        key = name.upper()
        if not key.startswith("RLIMIT_"):
            key = "RLIMIT_" + key
        res = getattr(resource, key, None)
        if not isinstance(res, int):
            raise SpawnError(f"unknown rlimit {name!r}")
        limit = resource.RLIM_INFINITY if value < 0 else value
        items.append(f"{res}={limit}:{limit}")
    return ",".join(items)


def fd_actions(
    fds: Sequence[int], stdout: int | None, stderr: int | None
) -> list[tuple[int | str, ...]]:
    """posix_spawn file actions: stdin </dev/null, fds -> 3.., stdout -> 1, stderr -> 2.

    A source fd may already sit where another one must go (fd 4 must become 3 while fd
    3 must become 4, stdout is fd 3, a socket is fd 0): each source is first copied to a temporary
    number above all sources and targets, then moved to its target, so no dup2
    overwrites a source still needed. dup2 onto a different number also clears
    O_CLOEXEC, which a dup2 of an fd onto itself would not.
    """
    moves: list[tuple[int, int]] = [(fd, FIRST_LISTEN_FD + i) for i, fd in enumerate(fds)]
    if stdout is not None:
        moves.append((stdout, 1))
    if stderr is not None:
        moves.append((stderr, 2))
    for src, _ in moves:
        if src < 0:
            raise SpawnError(f"bad fd {src}")
    stdin = (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)
    if not moves:
        return [stdin]
    base = max(max(src for src, _ in moves), FIRST_LISTEN_FD + len(fds), 2) + 1
    actions: list[tuple[int | str, ...]] = [
        (os.POSIX_SPAWN_DUP2, src, base + i) for i, (src, _) in enumerate(moves)
    ]
    actions.append(stdin)  # after the copies: a source may be fd 0 itself
    for i, (_, dst) in enumerate(moves):
        actions.append((os.POSIX_SPAWN_DUP2, base + i, dst))
    for i in range(len(moves)):
        actions.append((os.POSIX_SPAWN_CLOSE, base + i))
    return actions
