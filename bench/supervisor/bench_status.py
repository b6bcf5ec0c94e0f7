"""`svctl status` wall time against the peers' status commands (issue 2). Goal: <= 1.5x
`supervisorctl status`, both managing two workers.

svctl is measured as users install it: `pip install .` (a regular, non-editable
install) into a venv of its own, bench/.work/venv-svcd, rebuilt from the working tree
at every run (its dependencies are installed once). The editable install of the dev
venv (.venv) is measured beside it and labelled so: its site hook
(`__editable___svcd_*_finder`) costs every `python` there ~25 ms. supervisorctl,
circusctl and PM2 come from their own venvs / prefix (bench/peers/install.sh).

One run: svcd (one service, 2 workers of the stdlib test worker), supervisord (2
programs), circusd (one watcher, 2 processes) and PM2 (fork mode, 2 apps) all run at
once, each with the same worker program; then

1. hyperfine (if installed) times every status command in one invocation:
   `hyperfine -N --warmup 3 --runs 30 --export-json ...` (no shell in between);
2. our own loop of 30 rounds runs the commands interleaved (round i runs each once), so
   a burst of load from elsewhere hits every command alike;
3. reference points in the same run: `python -c pass` of each venv (and with -S:
   without any site hook), `python -c "import grpc"`, and the import of everything
   `svctl status` loads, which split svctl's time into interpreter start, imports and
   the call itself;
4. `python -X importtime` of `svctl status` (and of `--json`), installed and editable:
   the heaviest imports.

Run: .venv/bin/python bench/supervisor/bench_status.py [--runs 30] [--no-install]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    PYTHON,
    REPO,
    SVCD_VENV,
    SVCTL,
    BenchError,
    Procs,
    Svcd,
    free_port,
    install_svcd,
    machine,
    peers,
    run_dir,
    stdlib_command,
    summary,
    svcd_service,
    write_result,
)
from peers import Circus, Peer, Pm2, Supervisord

GOAL_RATIO = 1.5
WORKERS = 2
IMPORTTIME_RUNS = 3  # importtime is noisy too: keep the run with the least total
TOP_IMPORTS = 15


def hyperfine(commands: dict[str, list[str]], runs: int, out: Path,
              env: dict[str, str]) -> dict[str, Any]:
    argv = ["hyperfine", "-N", "--warmup", "3", "--runs", str(runs), "--export-json", str(out),
            "--style", "basic"]
    for name, cmd in commands.items():
        argv += ["-n", name, shlex.join(cmd)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise BenchError(f"hyperfine failed: {proc.stderr[-2000:]}")
    data = json.loads(out.read_text())
    results: dict[str, Any] = {}
    for entry in data["results"]:
        times = [t * 1000 for t in entry["times"]]
        results[entry["command"]] = {
            **summary(times),
            "mean": round(entry["mean"] * 1000, 1),
            "stddev": round((entry["stddev"] or 0) * 1000, 1),
            "user_ms": round(entry["user"] * 1000, 1),
            "system_ms": round(entry["system"] * 1000, 1),
        }
    return results


def run_once(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall ms, user+system CPU ms) of one run of `cmd`, from fork to reaped exit."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = (time.monotonic() - t0) * 1000
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise BenchError(f"{shlex.join(cmd)} exited {proc.returncode}")
    return wall, (usage.ru_utime + usage.ru_stime) * 1000


def own_loop(commands: dict[str, list[str]], runs: int, env: dict[str, str]) -> dict[str, Any]:
    """Interleaved rounds (round i runs every command once): wall and CPU ms per command.

    CPU time (user+system of the command, from wait4) barely moves with the load other
    processes put on the machine, where wall time on 2 busy cores can double.
    """
    wall: dict[str, list[float]] = {name: [] for name in commands}
    cpu: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(3):  # warm-up
        for cmd in commands.values():
            run_once(cmd, env)
    for _ in range(runs):
        for name, cmd in commands.items():
            w, c = run_once(cmd, env)
            wall[name].append(w)
            cpu[name].append(c)
    return {name: {**summary(wall[name]), "cpu_ms": summary(cpu[name])} for name in commands}


IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def importtime(python: str, cmd: list[str], cwd: Path) -> dict[str, Any]:
    """Top-level imports of `cmd` (a python -m ... command) by cumulative µs, best of N.
    `cwd` matters: `-m` puts it first on sys.path (the repo would shadow an install)."""
    best: dict[str, Any] | None = None
    for _ in range(IMPORTTIME_RUNS):
        proc = subprocess.run([python, "-X", "importtime", *cmd], capture_output=True,
                              text=True, timeout=60, cwd=cwd)
        rows: list[tuple[str, int]] = []
        for line in proc.stderr.splitlines():
            m = IMPORT_LINE.match(line)
            if m and len(m.group(3)) == 1:  # one space of indent: imported at top level
                rows.append((m.group(4), int(m.group(2))))
        total = sum(us for _, us in rows)
        if best is None or total < best["total_ms"] * 1000:
            top = sorted(rows, key=lambda r: -r[1])[:TOP_IMPORTS]
            best = {"total_ms": round(total / 1000, 1),
                    "top_ms": {name: round(us / 1000, 1) for name, us in top}}
    assert best is not None
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--no-install", action="store_true",
                        help=f"measure the svcd already installed in {SVCD_VENV}")
    args = parser.parse_args()
    tools = peers()
    result: dict[str, Any] = {"machine": machine(load_and_memory=True),
                              "command": " ".join(sys.argv),
                              "workers": WORKERS}
    result["svcd_install"] = install_svcd(SVCD_VENV, reinstall=not args.no_install)
    installed_python = str(SVCD_VENV / "bin" / "python")
    installed_svctl = str(SVCD_VENV / "bin" / "svctl")
    procs = Procs()
    agent: Svcd | None = None
    with run_dir("sb-status-") as tmp:
        try:
            port = free_port()
            agent = Svcd(procs, tmp, svcd_service("api", stdlib_command(), port, WORKERS)).start()
            started: dict[str, Peer] = {}
            for name, tool, make in [
                ("supervisorctl status", "supervisord", Supervisord),
                ("circusctl status", "circusd", Circus),
                ("pm2 jlist", "pm2", Pm2),
            ]:
                if tool in tools:
                    started[name] = make(procs, tmp, tools, WORKERS).start()
            env = dict(os.environ)
            status = ["--socket", agent.socket, "status"]
            commands: dict[str, list[str]] = {
                "svctl status": [installed_svctl, *status],
                "svctl status --json": [installed_svctl, *status, "--json"],
                "svctl status (editable dev venv)": [SVCTL, *status],
                "svctl status --json (editable dev venv)": [SVCTL, *status, "--json"],
            }
            for name, peer in started.items():
                commands[name] = peer.status_argv
                env.update(peer.status_env)
            svctl_imports = "import agent.cli, agent.cli_render, agent._pb.agent_pb2, grpc"
            references = {
                "python -c pass (svcd venv)": [installed_python, "-c", "pass"],
                "python -c pass (editable dev venv)": [PYTHON, "-c", "pass"],
                "python -S -c pass (no site hook)": [installed_python, "-S", "-c", "pass"],
                "python -c 'import grpc'": [installed_python, "-c", "import grpc"],
                "python: svctl status's imports": [installed_python, "-c", svctl_imports],
            }
            if "supervisorctl" in tools:
                supervisor_python = str(Path(tools["supervisorctl"]).parent / "python")
                references["python -c pass (supervisor's venv)"] = [
                    supervisor_python, "-c", "pass"]
            for cmd in commands.values():  # every command works before it is timed
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
                if out.returncode != 0:
                    raise BenchError(f"{cmd}: exit {out.returncode}: {out.stderr[-500:]}")
            procs.remember_tree()
            everything = {**commands, **references}
            if shutil.which("hyperfine"):
                result["hyperfine"] = hyperfine(everything, args.runs, tmp / "hyperfine.json", env)
                result["hyperfine_command"] = (
                    f"hyperfine -N --warmup 3 --runs {args.runs} --export-json FILE "
                    + " ".join(f"-n {shlex.quote(n)} CMD" for n in everything))
            result["own_loop"] = own_loop(everything, args.runs, env)
            svctl_cmd = ["-m", "agent.cli", *status]
            result["importtime"] = {
                "svctl status": importtime(installed_python, svctl_cmd, tmp),
                "svctl status --json": importtime(installed_python, [*svctl_cmd, "--json"], tmp),
                "svctl status (editable dev venv)": importtime(PYTHON, svctl_cmd, REPO),
            }
            for source in ("hyperfine", "own_loop"):
                figures = result.get(source)
                if not figures or "supervisorctl status" not in figures:
                    continue
                base = figures["supervisorctl status"]["median"]
                result[f"{source}_ratios"] = {
                    name: round(v["median"] / base, 2) for name, v in figures.items()
                }
                if source == "own_loop":
                    cpu_base = figures["supervisorctl status"]["cpu_ms"]["median"]
                    result["own_loop_cpu_ratios"] = {
                        name: round(v["cpu_ms"]["median"] / cpu_base, 2)
                        for name, v in figures.items()
                    }
            result["goal_ratio"] = GOAL_RATIO
        finally:
            if agent is not None:
                agent.stop()
            procs.close()
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    path = write_result("status", result)
    for source in ("hyperfine", "own_loop"):
        if source in result:
            print(f"{source}: median ms (ratio to supervisorctl)")
            ratios = result.get(f"{source}_ratios", {})
            for name, v in result[source].items():
                line = f"  {name:42s} {v['median']:8.1f}  {ratios.get(name, '')}"
                if "cpu_ms" in v:
                    line += (f"   cpu {v['cpu_ms']['median']:7.1f} ms "
                             f"{result['own_loop_cpu_ratios'].get(name, '')}")
                print(line)
    print(json.dumps(result["importtime"], indent=1))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
