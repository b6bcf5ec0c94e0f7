"""A worker that writes a lot of output, for log capture tests through a real agent.

Run it with `ready = "started"` (it speaks no sd_notify). Once `--wait-file` exists
(at once without it) it writes, to stdout:
- `--lines N`: N numbered lines `line <i> <padding>` of `--line-bytes` bytes each;
- `--burst-mb M`: M MiB of 1 KiB lines as fast as the pipe takes them;
- `--long-line-mb M`: M MiB without a newline, then one newline;
then `flood done` on stderr, and it sleeps until SIGTERM (default action: exit).
`--quiet-worker N`: worker N (SVCD_WORKER) writes only QUIET_LINES numbered lines, no
burst, and at once (it does not wait for the file), before its chatty siblings.
Every loop is bounded by its count or by WAIT_LIMIT.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

MIB = 1024 * 1024
BURST_LINE = 1024
CHUNK = 64 * 1024
POLL = 0.02
QUIET_LINES = 10
#: Longest wait for --wait-file, and for SIGTERM at the end (seconds).
WAIT_LIMIT = 600.0


def write_all(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--wait-file", default="")
    p.add_argument("--lines", type=int, default=0)
    p.add_argument("--line-bytes", type=int, default=100)
    p.add_argument("--burst-mb", type=int, default=0)
    p.add_argument("--long-line-mb", type=int, default=0)
    p.add_argument("--quiet-worker", type=int, default=None)
    args = p.parse_args()
    worker = os.environ.get("SVCD_WORKER", "?")
    if worker == str(args.quiet_worker):
        args.lines = min(args.lines, QUIET_LINES)
        args.burst_mb = args.long_line_mb = 0
        args.wait_file = ""
    print(f"flood worker {worker} pid {os.getpid()} waiting", flush=True)
    deadline = time.monotonic() + WAIT_LIMIT
    while args.wait_file and not os.path.exists(args.wait_file):
        if time.monotonic() > deadline:
            return 1
        time.sleep(POLL)
    for i in range(args.lines):
        head = f"line {i} w{worker} "
        write_all((head + "x" * max(0, args.line_bytes - len(head) - 1) + "\n").encode())
    if args.burst_mb:
        line = b"b" * (BURST_LINE - 1) + b"\n"
        chunk = line * (CHUNK // BURST_LINE)
        for _ in range(args.burst_mb * MIB // CHUNK):
            write_all(chunk)
    if args.long_line_mb:
        chunk = b"L" * CHUNK
        for _ in range(args.long_line_mb * MIB // CHUNK):
            write_all(chunk)
        write_all(b"\n")
    print(f"flood done w{worker}", file=sys.stderr, flush=True)
    time.sleep(WAIT_LIMIT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
