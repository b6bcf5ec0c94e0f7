"""End to end: a server_core worker's stats under a real svcd leave out the health checks.

svcd gives each worker of a service with an http check a private `svcd-health`
listener and checks it every `interval`. Those requests are the agent's probes, not
traffic: an idle worker must show 0 requests and qps 0 in `svctl status` and in
`svcd_worker_requests_total`, however many checks ran, and real requests still count.
The worker counts the checks it answers in a counter of its own, so the test knows
they ran (and reads both from one scrape, which is one stats report of the worker).
"""

from __future__ import annotations

import json
import textwrap
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.agent_proc import argv, running, svctl
from tests.conftest import free_port
from tests.test_metrics import Samples, parse, value
from tests.waiting import wait_for_sync

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

#: Deadline for conditions that need the worker started, checked or reported.
WAIT = 30.0
HTTP_TIMEOUT = 5.0
CHECK_INTERVAL = 0.2
#: Health checks the worker must have answered before the idle stats are read.
CHECKS_FIRST = 10
REQUESTS = 5

PROGRAM = """
from server_core import Request, Response, Worker

worker = Worker("http://127.0.0.1:0")
checks = worker.counter("health_checks_total")


@worker.on_message
def handle(conn: object, request: Request) -> str | Response:
    if request.path == "/healthz":
        checks.inc()
        return Response("ok\\n")
    return "hello"


worker.run()
"""


def http_get(port: int, path: str = "/") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=HTTP_TIMEOUT) as resp:
        return str(resp.read().decode())


def test_health_checks_are_not_counted_as_requests(tmp_path: Path) -> None:
    program = tmp_path / "counting_worker.py"
    program.write_text(PROGRAM)
    web_port, metrics_port = free_port(), free_port()
    services = textwrap.dedent(
        f"""
        [services.web]
        command = {argv(program)}
        count = 1
        listen = ["tcp://127.0.0.1:{web_port}"]
        graceful_timeout = 5
        [services.web.health]
        kind = "http"
        path = "/healthz"
        interval = {CHECK_INTERVAL}
        timeout = {CHECK_INTERVAL * 0.75}
        rise = 1
        fall = 3
        """
    )
    labels = {"service": "web", "worker": "web:0"}

    def scrape() -> Samples:
        return parse(http_get(metrics_port, "/metrics"))

    def checks(s: Samples) -> float:
        key = ("svcd_app_health_checks_total", tuple(sorted(labels.items())))
        return s.get(key, 0.0)

    def scrape_when(done: Callable[[Samples], bool]) -> Samples:
        """A scrape where `done` holds, else {} (falsy: wait on)."""
        s = scrape()
        return s if done(s) else {}

    extra = f'metrics_address = "127.0.0.1:{metrics_port}"'
    with running(tmp_path, services, extra) as agent:
        idle = wait_for_sync(
            lambda: scrape_when(lambda s: checks(s) >= CHECKS_FIRST),
            WAIT, f"{CHECKS_FIRST} health checks reported",
        )
        # the report that counted the checks counted no request for them
        assert value(idle, "svcd_worker_requests_total", **labels) == 0
        assert value(idle, "svcd_worker_qps", **labels) == 0
        assert value(idle, "svcd_worker_connections", **labels) == 0
        status = json.loads(svctl(agent, "status", "--json").stdout)
        (worker,) = status["services"][0]["workers"]
        assert worker["health"] == "passing"
        assert worker["requests"] == 0 and worker["qps"] == 0

        for _ in range(REQUESTS):
            assert http_get(web_port) == "hello"
        counted = wait_for_sync(
            lambda: scrape_when(
                lambda s: value(s, "svcd_worker_requests_total", **labels) >= REQUESTS
            ),
            WAIT, f"{REQUESTS} requests reported",
        )
        assert value(counted, "svcd_worker_requests_total", **labels) == REQUESTS
        assert checks(counted) > checks(idle)  # the checks went on meanwhile, uncounted
