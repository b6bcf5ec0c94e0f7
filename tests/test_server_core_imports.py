"""server_core imports only what its protocol needs: start-up time is reload latency.

Each case runs in a fresh interpreter (this one has every module loaded already).
"""

from __future__ import annotations

import email.utils
import subprocess
import sys

import pytest

from server_core.server import http_date
from tests.test_server_core_support import REPO

SUBPROCESS_TIMEOUT = 60.0
HEAVY = ("websockets", "httptools", "email.utils", "importlib.metadata")

PROBE = f"""
import asyncio, sys
import server_core
from server_core.server import Server
if len(sys.argv) > 1:
    # what a worker of this scheme loads on its way to READY=1
    Server(server_core.Worker(sys.argv[1]), asyncio.new_event_loop())
print(" ".join(m for m in {HEAVY!r} if m in sys.modules))
"""


def loaded(*scheme: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *scheme], cwd=REPO, capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT, check=True,
    )
    return set(out.stdout.split())


def test_import_server_core_loads_no_protocol() -> None:
    assert loaded() == set()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:0", {"httptools"}),
        ("ws://127.0.0.1:0", {"httptools", "websockets"}),  # loaded at start, not on upgrade
        ("tcp://127.0.0.1:0", set()),
        ("text://127.0.0.1:0", set()),
        ("frame://127.0.0.1:0", set()),
    ],
)
def test_a_worker_loads_only_its_protocol(url: str, expected: set[str]) -> None:
    if url.startswith("ws:"):
        # websockets brings importlib.metadata (and with it email) along: its business
        assert expected <= loaded(url)
    else:
        assert loaded(url) == expected


def test_lazy_public_names_resolve() -> None:
    import server_core
    from server_core.protocols.http import HttpConnection
    from server_core.protocols.websocket import WebSocketConnection

    assert server_core.HttpConnection is HttpConnection
    assert server_core.WebSocketConnection is WebSocketConnection
    with pytest.raises(AttributeError):
        server_core.NoSuchThing  # noqa: B018


@pytest.mark.parametrize("when", [0.0, 951_782_400.0, 1_700_000_000.5, 4_102_444_799.0])
def test_http_date_matches_email_utils(when: float) -> None:
    assert http_date(when) == email.utils.formatdate(when, usegmt=True)
