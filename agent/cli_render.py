"""Tables for `svctl status` (rich); imported only when a table is printed.

Works on the status as plain data (the dict `svctl status --json` prints), so the
table and the JSON can never disagree about what a field means. Columns follow
Workerman's `status` (pid, memory, connections, send_fail, timers, requests, qps,
state) plus health, restarts and uptime; each service gets a summary row, the host a
summary line, and exit statuses are counted like Workerman's exit table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

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
COLUMNS = (
    "worker", "pid", "state", "health", "restarts", "uptime", "memory", "cpu",
    "conns", "requests", "qps", "send_fail", "timers",
)
RIGHT_ALIGNED = frozenset(
    {"pid", "restarts", "uptime", "memory", "cpu", "conns", "requests", "qps",
     "send_fail", "timers"}
)
KIB = 1024.0
#: Width used when stdout is not a terminal (a pipe, a file): never squeeze columns there.
PIPE_WIDTH = 200


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
    return Text(value, style=styles.get(value, ""))


def _worker_row(w: dict[str, Any]) -> list[RenderableType]:
    alive = bool(w["pid"])
    state = _styled(w["state"], STATE_STYLES)
    if w.get("last_exit") and w["state"] in ("exited", "backoff", "fatal"):
        state.append(f" ({w['last_exit']})", style="dim")
    health = _styled(w["health"], HEALTH_STYLES)
    if w.get("health_reason") and w["health"] == "failing":
        health.append(f" {w['health_reason']}", style="dim")
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


def _service_table(svc: dict[str, Any]) -> Table:
    title = Text.assemble(
        (svc["name"], "bold"),
        "  ",
        (svc["state"], STATE_STYLES.get(svc["state"], "")),
        f"  {svc['ready']}/{svc['desired']} ready  generation {svc['generation']}",
    )
    if svc.get("listen"):
        title.append("  " + " ".join(svc["listen"]), style="dim")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False, padding=(0, 1), collapse_padding=True)
    for name in COLUMNS:
        table.add_column(
            name,
            justify="right" if name in RIGHT_ALIGNED else "left",
            no_wrap=True,
            min_width=len(name),
        )
    workers = svc["workers"]
    for w in workers:
        table.add_row(*_worker_row(w))
    endings = [
        f"{w['worker']} last ended: {w['last_exit_reason']}"
        for w in workers
        if w.get("last_exit_reason") and w["restarts"]
    ]
    if endings:
        table.caption = "\n".join(endings)
        table.caption_justify = "left"
    alive = [w for w in workers if w["pid"]]
    table.add_section()
    table.add_row(
        Text("total", style="bold"),
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
        style="bold",
    )
    return table


def _host_line(status: dict[str, Any]) -> Text:
    agent = status["agent"]
    workers = [w for s in status["services"] for w in s["workers"]]
    ready = sum(1 for w in workers if w["ready"])
    desired = sum(s["desired"] for s in status["services"])
    registry = agent["registry"]
    registry_style = {"connected": "green", "disconnected": "bold red"}.get(registry, "dim")
    return Text.assemble(
        ("svcd ", "bold"),
        (agent["name"], "bold cyan"),
        f"  v{agent['version']}  pid {agent['pid']}  up {human_duration(agent['uptime_s'])}  ",
        "registry ",
        (registry, registry_style),
        f"  services {len(status['services'])}  workers {ready}/{desired} ready"
        f"  memory {human_bytes(sum(w['rss_bytes'] for w in workers if w['pid']))}"
        f"  connections {sum(w['connections'] for w in workers)}"
        f"  requests {sum(w['requests'] for w in workers)}"
        f"  qps {sum(w['qps'] for w in workers):.1f}",
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
    table = Table(title="exit status", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("service")
    table.add_column("exit")
    table.add_column("count", justify="right")
    for name, how, n in rows:
        table.add_row(name, how, str(n))
    return table


def render_status(status: dict[str, Any]) -> RenderableType:
    parts: list[RenderableType] = [_host_line(status)]
    for svc in status["services"]:
        parts.append(Text(""))
        parts.append(_service_table(svc))
    exits = _exit_table(status["services"])
    if exits is not None:
        parts.append(Text(""))
        parts.append(exits)
    if not status["services"]:
        parts.append(Text("no services configured", style="dim"))
    return Group(*parts)


def make_console() -> Console:
    """A console for stdout; as wide as the terminal, or PIPE_WIDTH when not one."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=PIPE_WIDTH)
    return console


def print_status(status: dict[str, Any], console: Console | None = None) -> None:
    (console or make_console()).print(render_status(status))


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


def watch_status(
    fetch: Callable[[], dict[str, Any]], interval: float, count: int = 0
) -> None:
    """Redraw the status in place every `interval` s; `count` refreshes (0: until Ctrl-C)."""
    qps = QpsFromDeltas()
    console = make_console()
    status = fetch()
    qps.apply(status, time.monotonic())
    with Live(render_status(status), console=console, auto_refresh=False) as live:
        n = 1
        while count == 0 or n < count:
            time.sleep(interval)
            status = fetch()
            qps.apply(status, time.monotonic())
            live.update(render_status(status), refresh=True)
            n += 1
