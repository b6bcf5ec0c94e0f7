"""Exec trampoline: the few steps between posix_spawn and the worker's own program.

Run as `python -I -S _trampoline.py ARGV...` by `supervisor.spawn` (never imported).
posix_spawn has already placed the inherited sockets at fds 3.., stdout/stderr at 1/2,
stdin on /dev/null and started a new session. This script then, in this order:

1. reads (and removes) its private `_SVCD_*` variables from the environment; closes
   every fd above the inherited ones (nothing of the agent's leaks into the worker);
2. sets rlimits and the umask (before dropping privileges: raising a hard limit needs
   root);
3. drops privileges (setgroups, setgid, setuid);
4. sets PR_SET_PDEATHSIG=SIGKILL, *after* the uid change (which clears it), then checks
   that its parent is still the agent (it may have died before the prctl: then nobody
   would ever kill this process, so it exits instead);
5. changes directory (as the target user, so permissions apply);
6. sets LISTEN_PID to its own pid (which the target keeps across exec), LISTEN_FDS,
   LISTEN_FDNAMES; restores the signal dispositions Python changed at startup
   (SIGPIPE, SIGXFSZ ignored);
7. execs the command, searching PATH of the child's environment.

Startup cost matters (it is on the restart path), so this imports only builtin modules
(`posix`, `_signal`, `_ctypes`) instead of `os`, `signal` or `ctypes`. It must not
import anything from svcd: it runs under `-I -S` with no site-packages.

Exit codes (mirrored in supervisor.spawn): 127 the command could not be executed,
125 a setup step failed (message on stderr), 124 the agent died before the prctl.
"""

import _signal  # type: ignore[import-not-found]  # `signal` would import enum
import posix
import sys

TYPE_CHECKING = False  # typing/collections.abc would cost startup time
if TYPE_CHECKING:
    from collections.abc import Callable

EXIT_EXEC_FAILED = 127
EXIT_SETUP_FAILED = 125
EXIT_PARENT_GONE = 124

PR_SET_PDEATHSIG = 1
SIGKILL = 9
FIRST_LISTEN_FD = 3

PRIVATE_PREFIX = b"_SVCD_"


def fail(code: int, message: str) -> None:
    try:
        posix.write(2, f"svcd: {message}\n".encode(errors="replace"))
    finally:
        posix._exit(code)


def load_prctl() -> "Callable[..., int]":
    """libc's prctl through _ctypes (the ctypes package costs more startup time).

    Loaded before the uid change: the new user may not be able to read the agent's
    Python installation.
    """
    import _ctypes

    class CInt(_ctypes._SimpleCData):  # type: ignore[type-arg]
        _type_ = "i"

    class Prctl(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
        _restype_ = CInt

    class Libc:
        _handle = _ctypes.dlopen(None, 0)  # type: ignore[arg-type]  # None: the program itself

    prctl = Prctl(("prctl", Libc()))  # type: ignore[arg-type]  # needs only ._handle
    prctl.argtypes = (CInt, CInt, CInt, CInt, CInt)
    return prctl


def close_other_fds(keep_below: int) -> None:
    """Close every fd >= keep_below: nothing of the agent's leaks into the worker."""
    try:
        names = posix.listdir("/proc/self/fd")
    except OSError:  # no /proc: close_range(2) underneath makes this cheap
        posix.closerange(keep_below, posix.sysconf("SC_OPEN_MAX"))
        return
    for name in names:
        fd = int(name)
        if fd >= keep_below:
            try:  # noqa: SIM105 - contextlib costs an import
                posix.close(fd)
            except OSError:
                pass  # the fd of the listdir itself, already closed


def exec_path(argv: list[str], env: dict[bytes, bytes]) -> None:
    """execve argv[0], searched in the child's PATH when it has no slash (like execvpe)."""
    cmd = argv[0].encode(sys.getfilesystemencoding(), "surrogateescape")
    if b"/" in cmd:
        candidates = [cmd]
    else:
        path = env.get(b"PATH", b"/usr/local/bin:/usr/bin:/bin")
        candidates = [(d or b".") + b"/" + cmd for d in path.split(b":")]
    first_error: OSError | None = None
    for candidate in candidates:
        try:
            posix.execve(candidate, argv, env)
        except OSError as exc:
            # like execvp: remember a real error (EACCES) over "not here" (ENOENT)
            if first_error is None or first_error.errno in (2, 20):  # ENOENT, ENOTDIR
                first_error = exc
    reason = first_error.strerror if first_error is not None else "not found"
    fail(EXIT_EXEC_FAILED, f"cannot execute {argv[0]!r}: {reason}")


def main() -> None:
    argv = sys.argv[1:]
    if not argv:
        fail(EXIT_SETUP_FAILED, "trampoline: no command")
    env = dict(posix.environ)
    private = {
        k[len(PRIVATE_PREFIX) :]: env.pop(k) for k in list(env) if k.startswith(PRIVATE_PREFIX)
    }

    prctl = load_prctl() if private.get(b"PDEATHSIG") == b"1" else None
    nfds = int(private.get(b"NFDS", b"0") or b"0")
    # Before the uid change: that resets the dumpable flag, after which /proc/self/fd
    # belongs to root and cannot be listed any more.
    close_other_fds(FIRST_LISTEN_FD + nfds)

    step = "setup"
    try:
        step = "rlimits"
        if private.get(b"RLIMITS"):
            import resource

            for item in private[b"RLIMITS"].split(b","):
                res, soft, hard = (int(x) for x in item.replace(b"=", b":").split(b":"))
                resource.setrlimit(res, (soft, hard))
        step = "umask"
        if private.get(b"UMASK"):
            posix.umask(int(private[b"UMASK"], 8))
        step = "setgroups/setgid/setuid"
        if private.get(b"GID"):
            groups = private.get(b"GROUPS", b"")
            posix.setgroups([int(g) for g in groups.split(b",") if g])
            posix.setgid(int(private[b"GID"]))
        if private.get(b"UID"):
            posix.setuid(int(private[b"UID"]))
    except (OSError, ValueError) as exc:
        fail(EXIT_SETUP_FAILED, f"{step}: {exc}")

    if prctl is not None:
        if prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0:
            fail(EXIT_SETUP_FAILED, "prctl(PR_SET_PDEATHSIG) failed")
        if posix.getppid() != int(private.get(b"PPID", b"0")):
            posix._exit(EXIT_PARENT_GONE)  # the agent died before the prctl took hold

    if private.get(b"CWD"):
        try:
            posix.chdir(private[b"CWD"])
        except OSError as exc:
            cwd = private[b"CWD"].decode(errors="replace")
            fail(EXIT_SETUP_FAILED, f"cannot change directory to {cwd!r}: {exc.strerror}")

    for key in (b"LISTEN_PID", b"LISTEN_FDS", b"LISTEN_FDNAMES"):
        env.pop(key, None)
    if nfds:
        env[b"LISTEN_PID"] = str(posix.getpid()).encode()
        env[b"LISTEN_FDS"] = str(nfds).encode()
        if private.get(b"FDNAMES"):
            env[b"LISTEN_FDNAMES"] = private[b"FDNAMES"]
    if env.get(b"WATCHDOG_USEC"):
        # like LISTEN_PID: only the child knows its pid, and sd_watchdog_enabled checks it
        env[b"WATCHDOG_PID"] = str(posix.getpid()).encode()

    # Python ignores these at startup; ignored dispositions survive exec.
    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_DFL)

    exec_path(argv, env)


main()
