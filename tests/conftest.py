"""Shared fixtures: leaked-child detection, free ports. (etcd fixture: tests/etcd_fixture.py)"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import psutil
import pytest

pytest_plugins = ["tests.etcd_fixture"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(autouse=True)
def no_leaked_children() -> Iterator[None]:
    """Fail a test that leaves a child process of the test runner behind."""
    me = psutil.Process(os.getpid())
    before = {p.pid for p in me.children(recursive=True)}
    yield
    def leaked() -> list[psutil.Process]:
        out = []
        for p in me.children(recursive=True):
            try:
                if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out
    left = leaked()
    if left:
        # give exiting children a moment (bounded), then fail and clean up
        _gone, alive = psutil.wait_procs(left, timeout=3)
        if alive:
            names = [f"{p.pid}:{' '.join(p.cmdline()[:3])}" for p in alive]
            for p in alive:
                p.kill()
            pytest.fail(f"test leaked child processes: {names}")
