"""The `svctl status` table: what goes in it; agent.cli_table lays it out.

Works on the status as plain data (the dict `svctl status --json` prints), so the
table and the JSON can never disagree about what a field means. Columns follow
Workerman's `status` (pid, memory, connections, send_fail, timers, requests, qps,
state) plus health, restarts and uptime; each service gets a summary row, the host a
summary line, and exit statuses are counted like Workerman's exit table.

Stdlib only (no rich): `svctl status` is a short-lived process whose wall time is
dominated by imports, and the table is measured against `supervisorctl status`
(bench/supervisor/bench_status.py). Colour only on a terminal (agent.cli_table).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import IO, Any

from agent.cli_table import RULE_UNICODE, Table, Text, rule_char, use_color

STATE_STYLES = {
    "running": "green",
    "starting": "yellow",
    "reloading": "yellow",
    "stopping": "yellow",
    "stopped": "dim",
    "exited": "dim",
    "backoff": "red",
    "fatal": "bold red",
}
HEALTH_STYLES = {"passing": "green", "failing": "bold red", "unknown": "dim"}
REGISTRY_STYLES = {"connected": "green", "disconnected": "bold red"}
COLUMNS = (
    "worker", "pid", "state", "health", "restarts", "uptime", "memory", "cpu",
    "connections", "requests", "qps", "send_fail", "timers",
)
RIGHT_ALIGNED = frozenset(
    {"pid", "restarts", "uptime", "memory", "cpu", "connections", "requests", "qps",
     "send_fail", "timers"}
)
KIB = 1024.0
#: `status --watch` on a terminal: cursor home, then each line clears what the previous
#: frame left to its right, and the end clears what is left below (no flicker).
HOME = "\x1b[H"
CLEAR_EOL = "\x1b[K"
CLEAR_BELOW = "\x1b[J"


def human_bytes(n: float) -> str:
    """Binary units, compact like ps and top: 512B, 20.0M, 1.2G."""
    for unit in ("B", "K", "M", "G"):
        if abs(n) < KIB or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= KIB
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """12s, 3m05s, 4h12m, 2d03h: two units at most, like ps and Workerman."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _styled(value: str, styles: dict[str, str]) -> Text:
    return Text(value, styles.get(value, ""))


def _worker_row(w: dict[str, Any]) -> list[str | Text]:
    alive = bool(w["pid"])
    state = _styled(w["state"], STATE_STYLES)
    if w.get("last_exit") and w["state"] in ("exited", "backoff", "fatal"):
        state.append(f" ({w['last_exit']})", "dim")
    health = _styled(w["health"], HEALTH_STYLES)
    if w.get("health_reason") and w["health"] == "failing":
        health.append(f" {w['health_reason']}", "dim")
    return [
        w["worker"] + ("" if w["ready"] else "*"),
        str(w["pid"]) if alive else "-",
        state,
        health,
        str(w["restarts"]),
        human_duration(w["uptime_s"]) if alive else "-",
        human_bytes(w["rss_bytes"]) if alive else "-",
        f"{w['cpu_percent']:.1f}%" if alive else "-",
        str(w["connections"]),
        str(w["requests"]),
        f"{w['qps']:.1f}",
        str(w.get("send_fail", 0)),
        str(w.get("timers", 0)),
    ]


def _total_row(workers: list[dict[str, Any]]) -> list[str | Text]:
    alive = [w for w in workers if w["pid"]]
    return [
        "total",
        "",
        f"{sum(1 for w in workers if w['state'] == 'running')}/{len(workers)} up",
        f"{sum(1 for w in workers if w['health'] == 'failing')} failing",
        str(sum(w["restarts"] for w in workers)),
        "",
        human_bytes(sum(w["rss_bytes"] for w in alive)),
        f"{sum(w['cpu_percent'] for w in alive):.1f}%",
        str(sum(w["connections"] for w in workers)),
        str(sum(w["requests"] for w in workers)),
        f"{sum(w['qps'] for w in workers):.1f}",
        str(sum(w.get("send_fail", 0) for w in workers)),
        str(sum(w.get("timers", 0) for w in workers)),
    ]


def _service_lines(svc: dict[str, Any], color: bool, rule: str) -> list[str]:
    """Title line, the worker table with its total row, then how workers last ended."""
    title = (
        Text(svc["name"], "bold")
        .append("  ")
        .append(svc["state"], STATE_STYLES.get(svc["state"], ""))
        .append(f"  {svc['ready']}/{svc['desired']} ready  generation {svc['generation']}")
    )
    if svc.get("listen"):
        title.append("  " + " ".join(svc["listen"]), "dim")
    table = Table(COLUMNS, right=RIGHT_ALIGNED)
    workers = svc["workers"]
    for w in workers:
        table.add_row(_worker_row(w))
    table.add_section()
    table.add_row(_total_row(workers), style="bold")
    lines = [title.render(color), *table.lines(color, rule)]
    lines.extend(
        f"{w['worker']} last ended: {w['last_exit_reason']}"
        for w in workers
        if w.get("last_exit_reason") and w["restarts"]
    )
    lines.extend(
        Text(
            f"preload template  pid {t['pid']}  generation {t['generation']}"
            f"  memory {human_bytes(t['rss_bytes'])}  forks {t['forks']}"
            f"  up {human_duration(t['uptime_s'])}",
            "dim",
        ).render(color)
        for t in svc.get("templates", ())
    )
    return lines


def _host_line(status: dict[str, Any]) -> Text:
    agent = status["agent"]
    workers = [w for s in status["services"] for w in s["workers"]]
    ready = sum(1 for w in workers if w["ready"])
    desired = sum(s["desired"] for s in status["services"])
    registry = agent["registry"]
    return (
        Text("svcd ", "bold")
        .append(agent["name"], "bold cyan")
        .append(f"  v{agent['version']}  pid {agent['pid']}"
                f"  up {human_duration(agent['uptime_s'])}  registry ")
        .append(registry, REGISTRY_STYLES.get(registry, "dim"))
        .append(
            f"  services {len(status['services'])}  workers {ready}/{desired} ready"
            f"  memory {human_bytes(sum(w['rss_bytes'] for w in workers if w['pid']))}"
            f"  connections {sum(w['connections'] for w in workers)}"
            f"  requests {sum(w['requests'] for w in workers)}"
            f"  qps {sum(w['qps'] for w in workers):.1f}"
        )
    )


def _exit_table(services: Iterable[dict[str, Any]]) -> Table | None:
    """Workerman's exit table: how often each service's workers exited, and how."""
    rows: list[tuple[str, str, int]] = []
    for svc in services:
        counts: dict[str, int] = {}
        for w in svc["workers"]:
            for how, n in w.get("exit_counts", {}).items():
                counts[how] = counts.get(how, 0) + n
        rows.extend((svc["name"], how, n) for how, n in sorted(counts.items()))
    if not rows:
        return None
    table = Table(("service", "exit", "count"), right=("count",))
    for name, how, n in rows:
        table.add_row([name, how, str(n)])
    return table


def status_lines(status: dict[str, Any], color: bool = False,
                 rule: str = RULE_UNICODE) -> list[str]:
    """The whole `svctl status` output, line by line (no newlines)."""
    lines = [_host_line(status).render(color)]
    for svc in status["services"]:
        lines.append("")
        lines.extend(_service_lines(svc, color, rule))
    exits = _exit_table(status["services"])
    if exits is not None:
        lines.append("")
        lines.append(Text("exit status", "bold").render(color))
        lines.extend(exits.lines(color, rule))
    if not status["services"]:
        lines.append(Text("no services configured", "dim").render(color))
    return lines


def print_status(status: dict[str, Any], out: IO[str] | None = None) -> None:
    stream = out or sys.stdout
    lines = status_lines(status, use_color(stream), rule_char(stream))
    stream.write("\n".join(lines) + "\n")


class QpsFromDeltas:
    """Replace each worker's qps with requests/second since the previous sample
    (the same process only: a new pid starts over)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int, float]] = {}

    def apply(self, status: dict[str, Any], now: float) -> None:
        seen: dict[str, tuple[int, int, float]] = {}
        for svc in status["services"]:
            for w in svc["workers"]:
                key = w["worker"] + f"@{w['generation']}"
                previous = self._last.get(key)
                if previous is not None and previous[0] == w["pid"] and now > previous[2]:
                    w["qps"] = max(0.0, (w["requests"] - previous[1]) / (now - previous[2]))
                seen[key] = (w["pid"], w["requests"], now)
        self._last = seen


def _terminal_lines(stream: IO[str]) -> int:
    """Rows of the terminal behind `stream`; 0 when it will not say (a pty of size 0x0)."""
    try:
        return os.get_terminal_size(stream.fileno()).lines
    except (AttributeError, ValueError, OSError):
        return 0


def watch_status(
    fetch: Callable[[], dict[str, Any]], interval: float, count: int = 0,
    out: IO[str] | None = None,
) -> None:
    """Redraw the status every `interval` s; `count` refreshes (0: until Ctrl-C).

    On a terminal each frame replaces the previous one in place; elsewhere (a pipe, a
    file) frames follow one another, a blank line apart.
    """
    stream = out or sys.stdout
    color = use_color(stream)
    in_place = bool(getattr(stream, "isatty", None) and stream.isatty())
    rule = rule_char(stream)
    qps = QpsFromDeltas()
    n = 0
    while count == 0 or n < count:
        if n:
            time.sleep(interval)
        status = fetch()
        qps.apply(status, time.monotonic())
        lines = status_lines(status, color, rule)
        if in_place:
            # like watch(1): a frame taller than the terminal would scroll, and the
            # next one would no longer start at the top
            rows = _terminal_lines(stream)
            if rows > 1:
                lines = lines[: rows - 1]
            stream.write(HOME + "".join(line + CLEAR_EOL + "\n" for line in lines) + CLEAR_BELOW)
        else:
            stream.write(("\n" if n else "") + "\n".join(lines) + "\n")
        stream.flush()
        n += 1
