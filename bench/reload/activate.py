"""Socket activation for supervisors that pass a bare fd number (circus): then exec.

    python activate.py FD PROGRAM [ARGS...]

Moves FD to 3, sets LISTEN_FDS=1 and LISTEN_PID to our pid (exec keeps the pid, which
is how systemd does it too) and execs PROGRAM, so the same server_core worker that svcd
runs can run under circus unchanged.
"""

from __future__ import annotations

import os
import sys

SD_LISTEN_FDS_START = 3


def main() -> None:
    fd = int(sys.argv[1])
    if fd != SD_LISTEN_FDS_START:
        os.dup2(fd, SD_LISTEN_FDS_START)  # dup2 leaves the new fd inheritable
        os.close(fd)
    os.set_inheritable(SD_LISTEN_FDS_START, True)
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="web")
    os.execv(sys.argv[2], sys.argv[2:])


if __name__ == "__main__":
    main()
