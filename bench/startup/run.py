"""Start-up latency of a server_core worker: exec -> READY=1, as svcd sees it.

    .venv/bin/python bench/startup/run.py [--runs 20] [--program examples/hello.py]
                                          [--root DIR ...]

Each run spawns the program the way svcd does (socket activation: a listening TCP
socket on fd 3, LISTEN_FDS=1, LISTEN_PID = the child's pid, and a NOTIFY_SOCKET this
script listens on), times from just before fork/exec to the READY=1 datagram, then
stops the worker with SIGTERM. Prints each run and the median: this is the part of a
reload's or restart's latency that the worker itself costs. `--root DIR` runs the program
from another tree (cwd and PYTHONPATH), e.g. an older server_core from `git archive`;
given more than once, the trees take turns run by run (A B A B ...), so that load from
elsewhere on a busy machine spreads over all of them, and each gets its own median.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
READY_TIMEOUT = 30.0  # seconds one worker may take to send READY=1
STOP_TIMEOUT = 10.0  # seconds one worker may take to exit after SIGTERM
LISTEN_FD = 3
DATAGRAM_MAX = 65536


def _activate(listener_fd: int, notify_path: str, root: Path) -> None:
    # In the child between fork and exec: the listener to fd 3 and LISTEN_PID = our
    # pid (only known here). putenv reaches the exec'd program (Popen passes env=None).
    os.dup2(listener_fd, LISTEN_FD)
    os.environ.update(
        LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="bench",
        NOTIFY_SOCKET=notify_path,
    )
    if root != REPO:
        os.environ["PYTHONPATH"] = str(root)  # ahead of the editable install's finder


def wait_ready(notify: socket.socket, deadline: float) -> float:
    """Receive datagrams until READY=1; the monotonic time it arrived."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no READY=1")
        notify.settimeout(left)
        data = notify.recv(DATAGRAM_MAX)
        if b"READY=1" in data.split(b"\n"):
            return time.monotonic()


def one_run(program: list[str], root: Path, listener: socket.socket, notify: socket.socket,
            notify_path: str) -> float:
    fd = listener.fileno()
    started = time.monotonic()
    proc = subprocess.Popen(  # preexec_fn is safe: this script has one thread
        program, cwd=root, preexec_fn=lambda: _activate(fd, notify_path, root),
        pass_fds=(fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        ready = wait_ready(notify, started + READY_TIMEOUT)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return ready - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20, help="runs per tree")
    parser.add_argument("--program", default="examples/hello.py")
    parser.add_argument("--root", type=Path, action="append",
                        help="tree to run the program from (default: this repo)")
    args = parser.parse_args()
    roots = [r.resolve() for r in args.root] if args.root else [REPO]
    program = [sys.executable, args.program]
    times: dict[Path, list[float]] = {root: [] for root in roots}
    with tempfile.TemporaryDirectory() as tmp, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        notify_path = os.path.join(tmp, "notify")
        notify.bind(notify_path)
        for i in range(args.runs):
            for root in roots:
                took = one_run(program, root, listener, notify, notify_path)
                times[root].append(took)
                print(f"run {i + 1:2d} {root}: {took * 1000:7.1f} ms")
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    for root, runs in times.items():
        print(f"{root}: median {statistics.median(runs) * 1000:.1f} ms over {len(runs)} runs "
              f"(min {min(runs) * 1000:.1f}, max {max(runs) * 1000:.1f})")
    print(f"load average at the end: {load}")


if __name__ == "__main__":
    main()
