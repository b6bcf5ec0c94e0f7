"""Fuzz what a worker reports about itself, all the way to what operators read.

A worker (possibly running as another, less trusted user) chooses every byte of its
`X_SVCD_STATS=<json>` reports and of the etcd values other agents read back. Whatever it
sends must never break the agent's views for everybody else:
- `WorkerStats.apply_report` never raises (supervisor/stats.py);
- the resulting status converts to the control API's messages (`svctl status`:
  agent/api.py `fill`), whose int64 fields reject out-of-range integers;
- the Prometheus scrape renders and parses (agent/metrics.py);
- discovery's `WorkerRecord.parse` (agent/discovery.py) turns any etcd value into a
  record or None.

Found by these tests and fixed with them: Infinity or an integer beyond int64 in a
report broke `svctl status` (stats.py `_int`), an integer beyond a double broke the
scrape (metrics.py `_parse_app_metric`), deep nesting or huge numbers in an etcd value
crashed discovery (discovery.py `WorkerRecord.parse`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from agent._pb import agent_pb2 as pb
from agent.api import fill
from agent.discovery import WorkerRecord, endpoints_from
from agent.metrics import MetricsCollector, MetricsServer
from supervisor.stats import WorkerStats
from supervisor.status import ServiceStatus, WorkerStatus
from tests.test_registry import WORKER_FIELDS  # the SPEC's worker value fields

EXAMPLES = int(os.environ.get("SVCD_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---------------------------------------------------------------- strategies

#: Numbers JSON can carry: any int (Python's json has no limit), any float (NaN/Infinity
#: are accepted by json.loads), booleans, and strings that look like numbers.
numbers = st.one_of(
    st.integers(-3, 3),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(["1", "1e400", "", "NaN"]),
    st.none(),
)
scalars = st.one_of(numbers, st.text(max_size=20))
json_any = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
metric_entries = st.one_of(
    st.fixed_dictionaries(
        {"name": st.text(max_size=30), "value": numbers},
        optional={
            "type": st.sampled_from(["counter", "gauge", "histogram", "", 1]),
            "labels": st.dictionaries(st.text(max_size=10), scalars, max_size=5) | json_any,
        },
    ),
    json_any,
)
REPORT_KEYS = ["connections", "requests", "send_fail", "timers", "bytes_in", "bytes_out"]
reports = st.fixed_dictionaries(
    {},
    optional={
        **{key: numbers for key in REPORT_KEYS},
        "bytes": st.dictionaries(st.sampled_from(["in", "out", "x"]), numbers) | json_any,
        "metrics": st.lists(metric_entries, max_size=6)
        | st.dictionaries(st.text(max_size=10), numbers, max_size=6)
        | json_any,
    },
)


def _status_of(stats: WorkerStats) -> WorkerStatus:
    """What supervisor/worker.py builds from a live worker's stats."""
    return WorkerStatus(
        worker="api:0", index=0, pid=1000, generation=1, state="running", ready=True,
        health="passing", restarts=0, uptime_s=1.0, rss_bytes=float(stats.rss_bytes),
        cpu_percent=stats.cpu_percent, cpu_seconds=stats.cpu_seconds,
        connections=stats.connections, requests=stats.requests, qps=stats.qps,
        send_fail=stats.send_fail, timers=stats.timers, bytes_in=stats.bytes_in,
        bytes_out=stats.bytes_out, metrics=list(stats.metrics),
    )  # fmt: skip


def _service(worker: WorkerStatus) -> ServiceStatus:
    return ServiceStatus(
        name="api", state="running", desired=1, ready=1, generation=1, workers=(worker,),
        required_ready=1,
    )  # fmt: skip


# ---------------------------------------------------------------- the tests


@FUZZ
@given(report_list=st.lists(reports, min_size=1, max_size=4))
def test_any_stats_report_is_folded_in_without_raising(report_list: list[dict[str, Any]]) -> None:
    stats = WorkerStats()
    for now, report in enumerate(report_list):
        # through JSON, as it arrives (Infinity, NaN and big ints survive the trip)
        stats.apply_report(json.loads(json.dumps(report)), float(now))


@FUZZ
@example(report={"requests": 10**30})
@example(report={"connections": float("inf")})
@given(report=reports)
def test_a_worker_report_never_breaks_status_or_metrics(report: dict[str, Any]) -> None:
    stats = WorkerStats()
    stats.apply_report(json.loads(json.dumps(report)), 0.0)
    worker = _status_of(stats)
    fill(pb.WorkerStatus(), worker)
    _render([_service(worker)])


@FUZZ
@example(entries=[{"name": "x", "value": 10**400}])
@given(entries=st.lists(metric_entries, max_size=8))
def test_any_app_metrics_render_as_valid_prometheus_text(entries: list[Any]) -> None:
    worker = dataclasses.replace(_status_of(WorkerStats()), metrics=entries)
    text = _render([_service(worker)])
    assert "svcd_worker_up" in text


def _render(services: list[ServiceStatus]) -> str:
    collector = MetricsCollector(lambda: services)
    text = MetricsServer("127.0.0.1:0", collector).render().decode()
    families = list(text_string_to_metric_families(text))  # raises on invalid text
    assert families
    return text


@FUZZ
@example(value=b"[" * 100_000)
@example(value=json.dumps({"service": "a", "agent": "a", "worker": "a:0", "addr": "h:1",
         "pid": 1, "state": "running", "ready": True, "health": "passing", "generation": 1,
         "started_at": 10**400}).encode())  # fmt: skip
@example(value=b'{"pid": Infinity}')
@given(
    value=st.one_of(
        st.binary(max_size=300),
        json_any.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {k: scalars for k in sorted(WORKER_FIELDS - {"meta"})},
            optional={"meta": json_any},
        ).map(lambda v: json.dumps(v).encode()),
    )
)
def test_any_etcd_value_gives_a_record_or_none(value: bytes) -> None:
    record = WorkerRecord.parse("/svcd/services/api/a/0-1", value)
    assert record is None or isinstance(record, WorkerRecord)
    if record is not None:
        endpoints_from([record])  # and what discovery does with it next
