"""svcd at 200 workers (issue 7): agent CPU and RSS, `/metrics` scrape time, status time.

One svcd with `metrics_address` set runs 20 services x 10 workers of server_core's HTTP
hello (examples/hello.py), each of which sends X_SVCD_STATS once a second (server_core's
tick), i.e. 200 stats datagrams a second into the agent. Once every worker is ready and
SETTLE seconds have passed:

1. CPU: the agent process's user+system time over WINDOW seconds (default 60) divided by
   the wall time: percent of one core, all its threads included. RSS is read every
   5 s in the window (median and max).
2. `/metrics`: 20 scrapes in a row (a fresh connection each), wall time of each, the
   body's size and its number of series.
3. `svctl status --json` and `svctl status` at that size (5 runs each).

Memory: 200 server_core workers need about 200 x 30 MiB; the script refuses to start
with less than that available (lower --services/--per to fit).

Run: .venv/bin/python bench/supervisor/bench_200.py [--services 20] [--per 10] [--window 60]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import urllib.request
from typing import Any

import psutil
from common import (
    MIB,
    SVCTL,
    BenchError,
    Procs,
    Svcd,
    free_port,
    hello_command,
    machine,
    run_dir,
    summary,
    svcd_service,
    write_result,
)

SETTLE = 10.0  # seconds after the last worker turned ready, before measuring
RSS_EVERY = 5.0
SCRAPES = 20
STATUS_RUNS = 5
WORKER_MIB = 30  # a server_core hello worker's RSS, rounded up
READY_WITHIN = 900.0  # 200 interpreters starting on 2 busy cores take a while
SCRAPE_TIMEOUT = 60.0


def scrape(url: str) -> tuple[float, bytes]:
    t0 = time.monotonic()
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as resp:
        body = resp.read()
    return (time.monotonic() - t0) * 1000, body


def restarts(agent: Svcd) -> int | None:
    """Restarts of every worker so far; None when svctl gets no answer in time."""
    try:
        status = agent.status()
    except BenchError:
        return None
    return sum(int(w["restarts"]) for s in status["services"] for w in s["workers"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=20)
    parser.add_argument("--per", type=int, default=10, help="workers per service")
    parser.add_argument("--window", type=float, default=60.0, help="CPU window, seconds")
    args = parser.parse_args()
    workers = args.services * args.per
    available = psutil.virtual_memory().available / MIB
    if available < workers * WORKER_MIB * 1.5:
        raise BenchError(f"{available:.0f} MiB available, {workers} workers need about "
                         f"{workers * WORKER_MIB * 1.5:.0f}: lower --services/--per")
    result: dict[str, Any] = {"machine": machine(load_and_memory=True),
                              "command": " ".join(sys.argv),
                              "services": args.services, "workers_per_service": args.per,
                              "workers": workers}
    procs = Procs()
    agent: Svcd | None = None
    with run_dir("sb-200-") as tmp:
        try:
            metrics_port = free_port()
            services = ""
            for i in range(args.services):
                port = free_port()
                services += svcd_service(f"s{i:02d}", hello_command(port), port, args.per)
            agent = Svcd(procs, tmp, services,
                         agent_extra=f'metrics_address = "127.0.0.1:{metrics_port}"')
            t0 = time.monotonic()
            agent.start(ready_within=READY_WITHIN, metrics_port=metrics_port)
            result["all_ready_s"] = round(time.monotonic() - t0, 1)
            procs.remember_tree()
            time.sleep(SETTLE)
            me = psutil.Process(agent.pid)
            restarts_before = restarts(agent)

            # 1. CPU and RSS over the window
            cpu0, w0 = me.cpu_times(), time.monotonic()
            rss: list[float] = []
            load: list[float] = []
            end = w0 + args.window
            while True:
                rss.append(me.memory_info().rss / MIB)
                load.append(os.getloadavg()[0])
                if time.monotonic() >= end:
                    break
                time.sleep(min(RSS_EVERY, max(0.0, end - time.monotonic())))
            cpu1, w1 = me.cpu_times(), time.monotonic()
            loop_thread = next(t for t in me.threads() if t.id == me.pid)
            busy = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
            result["cpu"] = {
                "window_s": round(w1 - w0, 1),
                "cpu_s": round(busy, 2),
                "percent_of_one_core": round(100 * busy / (w1 - w0), 1),
                "user_s": round(cpu1.user - cpu0.user, 2),
                "system_s": round(cpu1.system - cpu0.system, 2),
                "threads": me.num_threads(),
                "main_thread_cpu_s_since_start": round(
                    loop_thread.user_time + loop_thread.system_time, 1),
                "loadavg_during": round(statistics.median(load), 2),
            }
            result["rss_mib"] = {"median": round(statistics.median(rss), 1),
                                 "max": round(max(rss), 1)}
            workers_rss = sum(c.memory_info().rss for c in me.children(recursive=True)) / MIB
            result["workers_rss_total_mib"] = round(workers_rss)

            # 2. /metrics scrapes
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            scrape(url)  # the first one may build caches: not counted
            times: list[float] = []
            body = b""
            failed = 0
            for _ in range(SCRAPES):
                try:
                    ms, body = scrape(url)
                except OSError:
                    failed += 1
                    continue
                times.append(ms)
            text = body.decode()
            series = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
            hello_series = [ln for ln in series if "hello_requests_total" in ln]
            result["metrics"] = {
                "scrape_ms": summary(times),
                "bytes": len(body),
                "series": len(series),
                "worker_custom_series": len(hello_series),
                "failed": failed,
            }

            # 3. svctl status at this size (exit 3: no answer within svctl's deadline)
            status_ms: dict[str, list[float]] = {"svctl status --json": [], "svctl status": []}
            unanswered: dict[str, int] = {name: 0 for name in status_ms}
            for _ in range(STATUS_RUNS):
                for name in status_ms:
                    argv = name.split()[1:]
                    t = time.monotonic()
                    out = agent.svctl(*argv)
                    elapsed = (time.monotonic() - t) * 1000
                    if out.returncode == 0:
                        status_ms[name].append(elapsed)
                    elif out.returncode == 3:
                        unanswered[name] += 1
                    else:
                        raise BenchError(f"{name}: {out.returncode} {out.stderr}")
            result["status_ms"] = {
                name: {**summary(v), "unanswered": unanswered[name]}
                for name, v in status_ms.items()
            }
            after = restarts(agent)
            result["restarts_during"] = (
                None if after is None or restarts_before is None else after - restarts_before)
            ready = [ln for ln in text.splitlines()
                     if ln.startswith("svcd_service_ready_workers")]
            result["ready_at_end"] = sum(int(float(ln.split()[-1])) for ln in ready)
            result["svctl"] = SVCTL
        finally:
            if agent is not None:
                t = time.monotonic()
                agent.stop()
                result["sigterm_stop_s"] = round(time.monotonic() - t, 1)
            procs.close()
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    path = write_result(f"workers_{workers}", result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
