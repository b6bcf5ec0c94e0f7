"""Metrics: the collector over synthetic status views, /metrics over HTTP, alerts, dashboard."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import (
    METRIC_NAMES,
    MetricsCollector,
    MetricsServer,
    StaticCollector,
    parse_address,
    render_text,
    sanitize_label,
    sanitize_name,
)
from supervisor.status import ServiceStatus, WorkerStatus
from tests.conftest import free_port
from tests.waiting import wait_for_sync

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "svcd-dashboard.json"
TEST_TIMEOUT = 20.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

#: The series SPEC.md names, with the labels each must carry.
SPEC_WORKER_SERIES = (
    "svcd_worker_up",
    "svcd_worker_ready",
    "svcd_worker_restarts_total",
    "svcd_worker_rss_bytes",
    "svcd_worker_cpu_seconds_total",
    "svcd_worker_connections",
    "svcd_worker_requests_total",
)
SPEC_SERVICE_SERIES = (
    "svcd_service_ready_workers",
    "svcd_service_desired_workers",
    "svcd_reloads_total",
)


def worker(index: int, **kw: Any) -> WorkerStatus:
    base: dict[str, Any] = {
        "worker": f"api:{index}",
        "index": index,
        "pid": 1000 + index,
        "generation": 1,
        "state": "running",
        "ready": True,
        "health": "passing",
        "restarts": 2,
        "uptime_s": 12.5,
        "rss_bytes": 2.5e7,
        "cpu_percent": 1.5,
        "cpu_seconds": 3.25,
        "connections": 7,
        "requests": 1234,
        "qps": 56.5,
        "send_fail": 3,
        "timers": 2,
        "num_fds": 11,
        "num_threads": 4,
        "started_at": 1.7e9,
        "exit_counts": {"code 1": 2},
    }
    base.update(kw)
    return WorkerStatus(**base)


def service(name: str = "api", workers: Sequence[WorkerStatus] = (), **kw: Any) -> ServiceStatus:
    base: dict[str, Any] = {
        "name": name,
        "state": "running",
        "desired": len(workers),
        "ready": sum(w.ready for w in workers),
        "generation": 1,
        "workers": tuple(workers),
        "required_ready": len(workers),
    }
    base.update(kw)
    return ServiceStatus(**base)


def scrape(collector: MetricsCollector) -> tuple[str, Samples]:
    server = MetricsServer("127.0.0.1:0", collector)
    text = server.render().decode()
    return text, parse(text)


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def labels_of(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(lbl) for n, lbl in samples if n == name]


def test_every_spec_series_with_labels_and_values() -> None:
    statuses = [service("api", [worker(0), worker(1, ready=False, connections=0)],
                        log_lines_dropped=7, log_lines_cut=3)]  # fmt: skip
    collector = MetricsCollector(
        lambda: statuses, reloads=lambda: {"api": 4}, registry_connected=lambda: True,
        reload_failures=lambda: {"api": 1},
    )
    _, s = scrape(collector)
    w0 = {"service": "api", "worker": "api:0"}
    w1 = {"service": "api", "worker": "api:1"}
    for name in SPEC_WORKER_SERIES:
        assert sorted(map(sorted, labels_of(s, name))) == sorted(
            map(sorted, [w0, w1])
        ), name
    assert value(s, "svcd_worker_up", **w0) == 1
    assert value(s, "svcd_worker_ready", **w0) == 1
    assert value(s, "svcd_worker_ready", **w1) == 0
    assert value(s, "svcd_worker_restarts_total", **w0) == 2
    assert value(s, "svcd_worker_rss_bytes", **w0) == 2.5e7
    assert value(s, "svcd_worker_cpu_seconds_total", **w0) == 3.25
    assert value(s, "svcd_worker_connections", **w0) == 7
    assert value(s, "svcd_worker_connections", **w1) == 0
    assert value(s, "svcd_worker_requests_total", **w0) == 1234
    assert value(s, "svcd_worker_send_fail_total", **w0) == 3
    assert value(s, "svcd_worker_qps", **w0) == 56.5
    assert value(s, "svcd_worker_open_fds", **w0) == 11
    assert value(s, "svcd_worker_threads", **w0) == 4
    assert value(s, "svcd_worker_generation", **w0) == 1
    assert value(s, "svcd_worker_healthy", **w0) == 1
    assert value(s, "svcd_worker_health", health="passing", **w0) == 1
    assert value(s, "svcd_worker_health", health="failing", **w0) == 0
    assert value(s, "svcd_worker_state", state="running", **w0) == 1
    assert value(s, "svcd_worker_state", state="fatal", **w0) == 0
    assert value(s, "svcd_worker_exits_total", exit="code 1", **w0) == 2

    for name in SPEC_SERVICE_SERIES:
        assert labels_of(s, name) == [{"service": "api"}], name
    assert value(s, "svcd_service_ready_workers", service="api") == 1
    assert value(s, "svcd_service_desired_workers", service="api") == 2
    assert value(s, "svcd_service_ready", service="api") == 0  # 1 of 2 required
    assert value(s, "svcd_service_up", service="api") == 1
    assert value(s, "svcd_service_state", service="api", state="running") == 1
    assert value(s, "svcd_reloads_total", service="api") == 4
    assert value(s, "svcd_reload_failures_total", service="api") == 1
    assert value(s, "svcd_log_lines_dropped_total", service="api") == 7
    assert value(s, "svcd_log_lines_cut_total", service="api") == 3
    assert value(s, "svcd_registry_connected") == 1
    assert value(s, "svcd_registry_enabled") == 1

    for name in ("svcd_agent_cpu_seconds_total", "svcd_agent_rss_bytes",
                 "svcd_agent_open_fds", "svcd_agent_threads"):
        assert value(s, name) > 0, name
    assert value(s, "svcd_agent_info", version="0.1.0") == 1


def test_metric_names_list_matches_what_is_rendered() -> None:
    statuses = [service("api", [worker(0)])]
    _, s = scrape(MetricsCollector(lambda: statuses))
    assert names(s) == METRIC_NAMES


def test_configured_service_is_exported_from_the_start() -> None:
    # A service whose workers have not started yet, and no registry configured.
    statuses = [service("api", [], desired=2, ready=0, state="starting", required_ready=2)]
    _, s = scrape(MetricsCollector(lambda: statuses, reloads=lambda: {}))
    assert value(s, "svcd_reloads_total", service="api") == 0
    assert value(s, "svcd_reload_failures_total", service="api") == 0
    assert value(s, "svcd_log_lines_dropped_total", service="api") == 0
    assert value(s, "svcd_log_lines_cut_total", service="api") == 0
    assert value(s, "svcd_service_ready_workers", service="api") == 0
    assert value(s, "svcd_service_desired_workers", service="api") == 2
    assert value(s, "svcd_registry_connected") == 0
    assert value(s, "svcd_registry_enabled") == 0


def test_stopped_service_is_not_ready_but_not_up_either() -> None:
    statuses = [service("api", [], desired=2, ready=0, state="stopped", required_ready=2)]
    _, s = scrape(MetricsCollector(lambda: statuses))
    assert value(s, "svcd_service_up", service="api") == 0
    assert value(s, "svcd_service_ready", service="api") == 0


def test_gone_workers_disappear() -> None:
    statuses = [service("api", [worker(0), worker(1)])]
    collector = MetricsCollector(lambda: statuses)
    _, before = scrape(collector)
    assert {lbl["worker"] for lbl in labels_of(before, "svcd_worker_up")} == {"api:0", "api:1"}
    statuses[0] = service("api", [worker(0)])  # scaled down
    _, after = scrape(collector)
    assert {lbl["worker"] for lbl in labels_of(after, "svcd_worker_up")} == {"api:0"}
    assert not any(dict(lbl).get("worker") == "api:1" for _, lbl in after)
    statuses.clear()  # the service was removed
    _, empty = scrape(collector)
    assert not any(dict(lbl).get("service") == "api" for _, lbl in empty)


def test_reload_overlap_renders_one_process_per_slot() -> None:
    old = worker(0, generation=1, requests=10)
    new_starting = worker(0, generation=2, state="starting", ready=False, requests=0)
    new_running = dataclasses.replace(new_starting, state="running", ready=True, requests=1)
    collector_input = [service("api", [old, new_starting], desired=1)]
    collector = MetricsCollector(lambda: collector_input)
    _, s = scrape(collector)  # the old process still serves: it is the slot's figure
    assert value(s, "svcd_worker_requests_total", service="api", worker="api:0") == 10
    collector_input[0] = service("api", [old, new_running], desired=1)
    _, s = scrape(collector)
    assert value(s, "svcd_worker_requests_total", service="api", worker="api:0") == 1
    assert value(s, "svcd_worker_generation", service="api", worker="api:0") == 2


def test_user_metrics_are_exported_with_their_labels() -> None:
    reported: list[dict[str, Any]] = [
        {"name": "jobs.done", "type": "counter", "labels": {"queue": "a"}, "value": 5},
        {"name": "jobs_failed_total", "type": "counter", "labels": {}, "value": 1},
        {"name": "queue depth", "type": "gauge", "labels": {"service": "x", "0bad": "y"},
         "value": 2.5},
        {"name": "no_type", "value": 7},  # the stats mapping form: a gauge
        # malformed or clashing entries are dropped, not fatal to the scrape:
        {"name": "jobs.done", "type": "counter", "labels": {"queue": "a"}, "value": 9},
        {"name": "jobs_done", "type": "gauge", "labels": {}, "value": 1},
        {"name": "bad_value", "type": "gauge", "value": "lots"},
        {"name": "hist", "type": "histogram", "value": 1},
        "garbage",
    ]
    statuses = [service("api", [worker(0, metrics=reported), worker(1, metrics=reported[:1])])]
    text, s = scrape(MetricsCollector(lambda: statuses))
    w0 = {"service": "api", "worker": "api:0"}
    assert value(s, "svcd_app_jobs_done_total", queue="a", **w0) == 5
    assert value(s, "svcd_app_jobs_done_total", queue="a", service="api", worker="api:1") == 5
    assert value(s, "svcd_app_jobs_failed_total", **w0) == 1
    assert value(s, "svcd_app_queue_depth", app_service="x", _0bad="y", **w0) == 2.5
    assert value(s, "svcd_app_no_type", **w0) == 7
    assert "# TYPE svcd_app_jobs_done_total counter" in text
    assert "# TYPE svcd_app_queue_depth gauge" in text
    assert not any(n.startswith(("svcd_app_bad_value", "svcd_app_hist")) for n in names(s))


def test_sanitizers() -> None:
    assert sanitize_name("http.requests-in") == "http_requests_in"
    assert sanitize_name("...") == "unnamed"
    assert sanitize_label("worker") == "app_worker"
    assert sanitize_label("__name__") == "name__"
    assert sanitize_label("1x") == "_1x"
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError):
        parse_address("localhost")


def test_fast_renderer_matches_generate_latest_byte_for_byte() -> None:
    tricky = {"q": 'a"b\\c\nd', "unicode": "zürich ✓", "empty": ""}
    statuses = [
        service("api", [worker(0, metrics=[
            {"name": "jobs", "type": "counter", "labels": tricky, "value": 1e21},
            {"name": "temp", "type": "gauge", "labels": {}, "value": float("nan")},
            {"name": "inf", "type": "gauge", "labels": {}, "value": float("inf")},
        ])]),
        service("we\"ird", [worker(0, worker='we"ird:0')]),
    ]
    families = list(MetricsCollector(lambda: statuses).collect())
    histogram = HistogramMetricFamily("other_latency", "help\nwith \\", labels=["x"])
    histogram.add_metric(["1"], buckets=[("1.0", 1), ("+Inf", 2)], sum_value=3.0)
    created = CounterMetricFamily("other_ops", "ops", labels=["x"], created=1.5)
    created.add_metric(["1"], 2.0, created=1.5)
    families += [histogram, created]
    assert render_text(families) == generate_latest(StaticCollector(families))


def test_exposition_passes_promtool_lint() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    statuses = [service("api", [worker(0, metrics=[
        {"name": "jobs", "type": "counter", "labels": {"q": "a"}, "value": 1}])])]
    text, _ = scrape(MetricsCollector(lambda: statuses))
    run = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stdout + run.stderr


# -- /metrics over HTTP -------------------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[MetricsServer]:
    statuses = [service("api", [worker(0)])]
    srv = MetricsServer("127.0.0.1:0", MetricsCollector(lambda: statuses))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def http(port: int, raw: bytes) -> tuple[int, Mapping[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await reader.read()  # the server closes after one response
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


async def test_scrape_over_http(server: MetricsServer) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        status, headers, body = await http(
            server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n"
        )
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        assert int(headers["content-length"]) == len(body)
        s = parse(body.decode())
        assert value(s, "svcd_worker_up", service="api", worker="api:0") == 1

        status, _, body = await http(server.port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert status == 200 and body == b""
        status, _, _ = await http(server.port, b"GET / HTTP/1.1\r\n\r\n")
        assert status == 404
        status, _, _ = await http(server.port, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert status == 405
        status, _, _ = await http(server.port, b"nonsense\r\n\r\n")
        assert status == 400
        huge = b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n"
        status, _, _ = await http(server.port, huge)
        assert status == 400


async def test_stop_closes_the_listener_and_idle_connections() -> None:
    srv = MetricsServer("127.0.0.1:0", MetricsCollector(list))
    async with asyncio.timeout(TEST_TIMEOUT):
        await srv.start()
        port = srv.port
        # A client that connects and never sends a request must not hold stop() up.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await srv.stop()
        assert await reader.read() == b""
        writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)


# -- alert rules and dashboard ------------------------------------------------------------

_SVCD_NAME = re.compile(r"\bsvcd_[a-z0-9_]+")


def _exprs_metric_names(text: str) -> set[str]:
    return set(_SVCD_NAME.findall(text))


def test_alert_rules_name_only_real_metrics() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert {"SvcdWorkerCrashLooping", "SvcdServiceNotReady", "SvcdRegistryDisconnected",
            "SvcdReloadRolledBack"} <= {r["alert"] for r in alerts}
    for rule in alerts:
        used = _exprs_metric_names(rule["expr"])
        assert used, rule["alert"]
        assert used <= METRIC_NAMES, (rule["alert"], used - METRIC_NAMES)
        assert rule["annotations"]["summary"]


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    run = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_dashboard_is_valid_and_names_only_real_metrics() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] and board["uid"] and board["schemaVersion"] >= 36
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert len(exprs) >= 10
    used = set().union(*map(_exprs_metric_names, exprs))
    assert used <= METRIC_NAMES, used - METRIC_NAMES
    for p in panels:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "instance", "service"} <= variables


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    return promtool


def test_alert_rules_fire_when_they_should(tmp_path: Path) -> None:
    """`promtool test rules` on synthetic series (annotations stripped: labels matter)."""
    promtool = _promtool()
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))

    def alert(name: str, severity: str, **labels: str) -> dict[str, Any]:
        return {"eval_time": "10m", "alertname": name,
                "exp_alerts": [{"exp_labels": {"severity": severity, **labels}}]}

    def silent(name: str) -> dict[str, Any]:
        return {"eval_time": "10m", "alertname": name, "exp_alerts": []}

    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m", "input_series": [
                # a:0 restarts every minute; b:0 restarted twice long ago
                {"series": 'svcd_worker_restarts_total{service="a",worker="a:0"}',
                 "values": "0+1x20"},
                {"series": 'svcd_worker_restarts_total{service="b",worker="b:0"}',
                 "values": "2x20"},
                {"series": 'svcd_worker_state{service="a",worker="a:0",state="fatal"}',
                 "values": "0x20"},
             ], "alert_rule_test": [
                alert("SvcdWorkerCrashLooping", "warning", service="a", worker="a:0"),
                silent("SvcdWorkerFatal"),
            ]},
            {"interval": "1m", "input_series": [
                # a is running below min_ready; b was stopped on purpose
                {"series": 'svcd_service_ready{service="a"}', "values": "0x20"},
                {"series": 'svcd_service_up{service="a"}', "values": "1x20"},
                {"series": 'svcd_service_ready{service="b"}', "values": "0x20"},
                {"series": 'svcd_service_up{service="b"}', "values": "0x20"},
            ], "alert_rule_test": [alert("SvcdServiceNotReady", "critical", service="a")]},
            {"interval": "1m", "input_series": [
                {"series": 'svcd_registry_connected{instance="h1"}', "values": "0x20"},
                {"series": 'svcd_registry_enabled{instance="h1"}', "values": "1x20"},
                {"series": 'svcd_registry_connected{instance="h2"}', "values": "0x20"},
                {"series": 'svcd_registry_enabled{instance="h2"}', "values": "0x20"},
            ], "alert_rule_test": [
                alert("SvcdRegistryDisconnected", "critical", instance="h1"),
            ]},
            {"interval": "1m", "input_series": [
                {"series": 'svcd_reload_failures_total{service="a"}', "values": "0x8 1x12"},
                {"series": 'svcd_reload_failures_total{service="b"}', "values": "0x20"},
            ], "alert_rule_test": [alert("SvcdReloadRolledBack", "warning", service="a")]},
        ],
    }
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    run = subprocess.run(
        [promtool, "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True,
        text=True, timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """Each panel query, Grafana variables filled in, as a recording rule for promtool."""
    promtool = _promtool()
    board = json.loads(DASHBOARD.read_text())
    fill = {"$__rate_interval": "5m", "$instance": ".*", "$service": ".*"}
    rules = []
    for panel in board["panels"]:
        for i, target in enumerate(panel.get("targets", [])):
            expr = target["expr"]
            for var, sub in fill.items():
                expr = expr.replace(var, sub)
            assert "$" not in expr, expr
            rules.append({"record": f"dashboard:panel{panel['id']}:{i}", "expr": expr})
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [
        {"name": "dashboard", "rules": rules}]}))
    run = subprocess.run(
        [promtool, "check", "rules", str(tmp_path / "queries.yml")], capture_output=True,
        text=True, timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_service_ready_follows_min_ready() -> None:
    two = [worker(0), worker(1, ready=False)]
    for min_ready, ready in ((1, 1), (2, 0), (0, 1)):
        statuses = [service("api", two, required_ready=min_ready)]
        _, s = scrape(MetricsCollector(statuses.copy))
        assert value(s, "svcd_service_ready", service="api") == ready, min_ready
        assert value(s, "svcd_service_required_ready_workers", service="api") == max(min_ready, 1)
    none_ready = [service("api", [worker(0, ready=False)], required_ready=0)]
    _, s = scrape(MetricsCollector(lambda: none_ready))
    assert value(s, "svcd_service_ready", service="api") == 0  # min_ready 0 still needs one


# -- against a running agent ---------------------------------------------------------------

#: A worker with no sockets that reports one user counter and one gauge over sd_notify.
APP_WORKER = r'''
import json, os, socket, time
def notify(msg):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = os.environ["NOTIFY_SOCKET"]
    s.sendto(msg.encode(), "\0" + path[1:] if path.startswith("@") else path)
    s.close()
notify("READY=1")
jobs = 0
while True:
    jobs += 1
    notify("X_SVCD_STATS=" + json.dumps({"metrics": [
        {"name": "jobs.done", "type": "counter", "labels": {"queue": "q"}, "value": jobs},
        {"name": "queue_depth", "type": "gauge", "labels": {}, "value": 3},
    ]}))
    time.sleep(0.1)
'''


def _scrape_url(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        return parse(resp.read().decode())


@pytest.mark.slow
def test_metrics_of_a_running_agent(tmp_path: Path) -> None:
    from tests.agent_proc import AgentProcess, worker_command  # only this test runs an agent

    metrics_port, web_port = free_port(), free_port()
    app = tmp_path / "app_worker.py"
    app.write_text(APP_WORKER)
    services = f"""
[services.web]
command = {worker_command()}
count = 2
listen = ["tcp://127.0.0.1:{web_port}"]
graceful_timeout = 5
[services.web.health]
kind = "http"
path = "/healthz"
interval = 0.5
timeout = 0.4
rise = 1
start_period = 30

[services.app]
command = {json.dumps([sys.executable, str(app)])}
"""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    extra = f'metrics_address = "127.0.0.1:{metrics_port}"'
    with AgentProcess(tmp_path, services, extra_agent=extra) as agent:
        web0 = {"service": "web", "worker": "web:0"}
        s = _scrape_url(url)
        for w in ("web:0", "web:1"):
            assert value(s, "svcd_worker_up", service="web", worker=w) == 1
            assert value(s, "svcd_worker_ready", service="web", worker=w) == 1
            assert value(s, "svcd_worker_restarts_total", service="web", worker=w) == 0
        for svc, n in (("web", 2), ("app", 1)):
            assert value(s, "svcd_service_ready_workers", service=svc) == n
            assert value(s, "svcd_service_desired_workers", service=svc) == n
            assert value(s, "svcd_reloads_total", service=svc) == 0
        assert value(s, "svcd_registry_connected") == 0
        assert value(s, "svcd_agent_rss_bytes") > 0

        wait_for_sync(
            lambda: value(_scrape_url(url), "svcd_worker_healthy", **web0) == 1, 15, "healthy"
        )
        wait_for_sync(  # psutil samples once a second
            lambda: value(_scrape_url(url), "svcd_worker_rss_bytes", **web0) > 0, 15, "rss"
        )
        app0 = {"service": "app", "worker": "app:0"}
        wait_for_sync(
            lambda: value(_scrape_url(url), "svcd_app_jobs_done_total", queue="q", **app0) > 0,
            15, "the app's own counter",
        )
        assert value(_scrape_url(url), "svcd_app_queue_depth", **app0) == 3

        for _ in range(5):
            with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/", timeout=5) as resp:
                resp.read()

        def requests_total() -> float:
            s = _scrape_url(url)
            return sum(value(s, "svcd_worker_requests_total", service="web", worker=w)
                       for w in ("web:0", "web:1"))

        wait_for_sync(lambda: requests_total() >= 5, 15, "requests counted")

        victim = next(
            w["pid"] for svc in agent.status()["services"] if svc["name"] == "web"
            for w in svc["workers"] if w["worker"] == "web:0"
        )
        os.kill(victim, signal.SIGKILL)
        last: list[Samples] = []

        def restarted() -> bool:
            last[:] = [_scrape_url(url)]
            return (value(last[0], "svcd_worker_restarts_total", **web0) == 1
                    and value(last[0], "svcd_worker_up", **web0) == 1)

        try:
            wait_for_sync(restarted, 15, "restart counted")
        except AssertionError:
            print({k: v for k, v in last[0].items() if dict(k[1]).get("worker") == "web:0"})
            print(agent.stderr())
            raise
        s = _scrape_url(url)
        assert value(s, "svcd_worker_exits_total", exit="signal SIGKILL", **web0) == 1
