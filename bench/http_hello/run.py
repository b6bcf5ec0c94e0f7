"""HTTP keep-alive GET `hello`: server_core vs uvicorn (raw ASGI) vs a bare uvloop Protocol.

    .venv/bin/python bench/http_hello/run.py [--rounds 3] [--duration 10] [--ws]

Each server runs alone as one process pinned to core 0 (`taskset -c 0`); `wrk -t1
-c64` runs pinned to core 1. Rounds interleave the servers (sc, uvicorn, bare, sc, ...)
so that load from elsewhere on the machine spreads over all of them; the report gives
each server's median and the ratios of medians. It also reads the server's CPU time
(/proc/PID/stat) around each measured run and reports requests per CPU-second of the
server: on a machine shared with other work that is the steadier figure of efficiency.
`--ws` adds WebSocket echo messages/s: server_core's ws:// echo against the `websockets`
library's own server, both driven by the same client (`ws_client.py`, pinned to core 1).

`--drain` measures the drain instead: `examples/hello.py --count 2` (prefork: one
shared socket) under `wrk -t1 -c50 -d12s`, SIGTERM to one child at 3 s and to the
other at 7 s (the parent starts a replacement each time, as svcd's reload does);
it prints wrk's socket errors and non-2xx count, which should be zero.

Needs: wrk (`apt-get install -y wrk`), uvicorn (the `bench` extra), Linux taskset.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for benchlib

from benchlib import PYTHON as PY
from benchlib import REPO, cpu_model, free_port

HERE = Path(__file__).resolve().parent
SERVER_CORE = "0"
CLIENT_CORE = "1"
STARTUP_TIMEOUT = 15.0
WARMUP_SECONDS = 2


def http_servers(port: int) -> dict[str, list[str]]:
    return {
        "server_core": [PY, str(HERE / "server_core_app.py"), str(port)],
        "uvicorn": [
            PY, "-m", "uvicorn", "--loop", "uvloop", "--http", "httptools",
            "--no-access-log", "--log-level", "warning", "--port", str(port),
            "--app-dir", str(HERE), "uvicorn_app:app",
        ],
        "bare_protocol": [PY, str(HERE / "bare_protocol.py"), str(port)],
    }


def ws_servers(port: int) -> dict[str, list[str]]:
    return {
        "server_core_ws": [PY, str(HERE / "ws_server_core.py"), str(port)],
        "websockets_ws": [PY, str(HERE / "ws_websockets.py"), str(port)],
    }


@contextlib.contextmanager
def running(argv: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        ["taskset", "-c", SERVER_CORE, *argv], env=env, cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {argv}") from None
                time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(port: int, seconds: int) -> tuple[float, str]:
    out = subprocess.run(
        ["taskset", "-c", CLIENT_CORE, "wrk", "-t1", "-c64", f"-d{seconds}s",
         f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True, timeout=seconds + 30,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        raise RuntimeError(f"no Requests/sec in wrk output:\n{out}")
    errors = re.search(r"Socket errors:.*|Non-2xx.*", out)
    return float(match.group(1)), errors.group(0) if errors else ""


def ws_client(port: int, seconds: int) -> float:
    out = subprocess.run(
        ["taskset", "-c", CLIENT_CORE, PY, str(HERE / "ws_client.py"), str(port), str(seconds)],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ).stdout
    return float(out.strip().splitlines()[-1])


def drain(seconds: int = 12) -> int:
    """SIGTERM each of two prefork children under wrk; returns the error count."""
    port = free_port()
    argv = [PY, str(REPO / "examples" / "hello.py"), "--count", "2",
            "--listen", f"http://127.0.0.1:{port}"]
    with running(argv, port) as parent:
        wrk_proc = subprocess.Popen(
            ["wrk", "-t1", "-c50", f"-d{seconds}s", f"http://127.0.0.1:{port}/"],
            stdout=subprocess.PIPE, text=True,
        )
        for at in (3, 7):
            time.sleep(at - (3 if at == 7 else 0))
            children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
            victim = int(children[0])
            os.kill(victim, 15)
            print(f"t={at}s: SIGTERM to worker pid {victim}", flush=True)
        out, _ = wrk_proc.communicate(timeout=seconds + 30)
    print(out)
    errors = 0
    for match in re.finditer(r"(connect|read|write|timeout) (\d+)", out):
        errors += int(match.group(2))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    print(f"drain: {errors} errors")
    return errors


def machine() -> str:
    cpu = cpu_model() or "unknown"
    load = Path("/proc/loadavg").read_text().split()[:3]
    return (
        f"nproc {os.cpu_count()}, kernel {platform.release()}, CPU {cpu}, "
        f"Python {platform.python_version()}, load average at start {' '.join(load)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--ws", action="store_true", help="also WebSocket echo msgs/s")
    parser.add_argument("--only", default="", help="comma-separated server names")
    parser.add_argument("--drain", action="store_true", help="measure the drain only")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is missing: apt-get install -y wrk", file=sys.stderr)
        return 2
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {machine()}")
    if args.drain:
        return 1 if drain() else 0
    only = set(filter(None, args.only.split(",")))
    results: dict[str, list[float]] = {}
    per_cpu: dict[str, list[float]] = {}
    for round_no in range(1, args.rounds + 1):
        port = free_port()
        for name, argv in http_servers(port).items():
            if only and name not in only:
                continue
            with running(argv, port) as proc:
                wrk(port, WARMUP_SECONDS)
                cpu_before = cpu_seconds(proc.pid)
                rps, errors = wrk(port, args.duration)
                cpu = cpu_seconds(proc.pid) - cpu_before
            results.setdefault(name, []).append(rps)
            efficiency = rps * args.duration / cpu if cpu > 0 else 0.0
            per_cpu.setdefault(name, []).append(efficiency)
            print(
                f"round {round_no} {name}: {rps:,.0f} req/s, server CPU {cpu:.1f}s "
                f"of {args.duration}s, {efficiency:,.0f} req per CPU-second {errors}",
                flush=True,
            )
        if args.ws:
            for name, argv in ws_servers(port).items():
                if only and name not in only:
                    continue
                with running(argv, port) as proc:
                    cpu_before = cpu_seconds(proc.pid)
                    msgs = ws_client(port, args.duration)
                    cpu = cpu_seconds(proc.pid) - cpu_before
                results.setdefault(name, []).append(msgs)
                # the client warms up for 1 s before it counts, inside the CPU window
                efficiency = msgs * (args.duration + 1) / cpu if cpu > 0 else 0.0
                per_cpu.setdefault(name, []).append(efficiency)
                print(
                    f"round {round_no} {name}: {msgs:,.0f} msgs/s, "
                    f"{efficiency:,.0f} msgs per CPU-second",
                    flush=True,
                )
    medians = {name: statistics.median(values) for name, values in results.items()}
    cpu_medians = {name: statistics.median(values) for name, values in per_cpu.items()}
    print("\n| server | runs (per s) | median | per CPU-second, median |\n|---|---|---|---|")
    for name, values in results.items():
        runs = ", ".join(f"{v / 1000:.1f}k" for v in values)
        print(
            f"| {name} | {runs} | {medians[name] / 1000:.1f}k "
            f"| {cpu_medians[name] / 1000:.1f}k |"
        )
    pairs = [("server_core", "uvicorn"), ("server_core", "bare_protocol"),
             ("server_core_ws", "websockets_ws")]
    for ours, peer in pairs:
        if medians.get(ours) and medians.get(peer):
            print(
                f"{ours} / {peer}: {medians[ours] / medians[peer]:.2f}x throughput, "
                f"{cpu_medians[ours] / cpu_medians[peer]:.2f}x per CPU-second"
            )
    print(f"load average at end {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
