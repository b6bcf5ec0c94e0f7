"""Run a Python program with `{service}` and `{worker}` in its arguments filled in.

`python per_worker.py PROGRAM ARG...` execs `python PROGRAM ARG...` with every
`{service}` replaced by $SVCD_SERVICE and `{worker}` by $SVCD_WORKER, so that one
service's workers can be told apart by the test (a health-fail file per worker).
exec keeps the pid: LISTEN_PID and the notify socket still belong to the program.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    service = os.environ.get("SVCD_SERVICE", "")
    worker = os.environ.get("SVCD_WORKER", "")
    argv = [a.replace("{service}", service).replace("{worker}", worker) for a in sys.argv[1:]]
    if not argv:
        sys.exit("usage: per_worker.py PROGRAM [ARG...]")
    os.execv(sys.executable, [sys.executable, *argv])


if __name__ == "__main__":
    main()
