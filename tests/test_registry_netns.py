"""Three agents on three "hosts" (network namespaces) and one etcd: cut one host's link
and only its keys expire; bring it back and it registers again. Needs root and `ip`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.etcd_fixture import EtcdServer
from tests.registry_helpers import Reader, eventually, reader

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
    ),
]

REPO = Path(__file__).resolve().parent.parent
HOSTS = 3
TTL = 2
#: a /30 per host: .1 on the etcd (root namespace) side, .2 inside the host's namespace
SUBNET = "10.213.{i}.{n}"

AGENT = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, sys.argv[1])
    from agent.registry import Registry
    from supervisor.events import EventBus
    from tests.registry_helpers import Settings, service, worker
    name, endpoint, advertise = sys.argv[2], sys.argv[3], sys.argv[4]
    async def main():
        reg = Registry(Settings((endpoint,), ttl=2, timeout=0.5), name, "", EventBus(), "0")
        reg.publish([service("api", [worker("api", 0)], advertise=advertise)])
        await reg.run()
    asyncio.run(main())
    """
)


@dataclass
class Host:
    name: str
    netns: str
    outside: str  # veth end in the root namespace
    etcd_ip: str
    own_ip: str
    proc: subprocess.Popen[bytes] | None = None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=10, capture_output=True)


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    tag = f"{os.getpid() % 100000}"
    made: list[Host] = []
    try:
        for i in range(1, HOSTS + 1):
            h = Host(
                name=f"host-{i}",
                netns=f"svcdt{tag}h{i}",
                outside=f"svo{tag}h{i}",
                etcd_ip=SUBNET.format(i=i, n=1),
                own_ip=SUBNET.format(i=i, n=2),
            )
            inside = f"svi{tag}h{i}"
            ip("netns", "add", h.netns)
            made.append(h)
            ip("link", "add", h.outside, "type", "veth", "peer", "name", inside)
            ip("link", "set", inside, "netns", h.netns)
            ip("addr", "add", f"{h.etcd_ip}/30", "dev", h.outside)
            ip("link", "set", h.outside, "up")
            ip("-n", h.netns, "addr", "add", f"{h.own_ip}/30", "dev", inside)
            ip("-n", h.netns, "link", "set", inside, "up")
            ip("-n", h.netns, "link", "set", "lo", "up")
        yield made
    finally:
        for h in made:
            if h.proc is not None:
                if h.proc.poll() is None:
                    h.proc.kill()
                h.proc.wait(timeout=10)
            subprocess.run(["ip", "link", "del", h.outside], timeout=10, capture_output=True)
            subprocess.run(["ip", "netns", "del", h.netns], timeout=10, capture_output=True)


@pytest.fixture
def shared_etcd(tmp_path: Path, hosts: list[Host]) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path / "etcd-data")
    urls = ",".join([server.endpoint, *(f"http://{h.etcd_ip}:{server.client_port}" for h in hosts)])
    server._extra_args = ["--listen-client-urls", urls]  # the later flag wins
    try:
        server.start()
        yield server
    finally:
        server.stop()


def start_agent(h: Host, port: int) -> None:
    """The agent of host `h`, inside its namespace, dialing etcd across the veth."""
    endpoint = f"http://{h.etcd_ip}:{port}"
    argv = ["ip", "netns", "exec", h.netns, sys.executable, "-c", AGENT, str(REPO)]
    h.proc = subprocess.Popen([*argv, h.name, endpoint, f"{h.own_ip}:8080"])


async def _agents(r: Reader) -> set[str]:
    return {k.rsplit("/", 1)[1] for k in await r.keys("/svcd/agents/")}


async def test_cut_host_expires_only_its_keys(shared_etcd: EtcdServer, hosts: list[Host]) -> None:
    port = shared_etcd.client_port
    for h in hosts:
        start_agent(h, port)
    everyone = {h.name for h in hosts}
    async with reader(shared_etcd.endpoint) as r:

        async def all_registered() -> bool | None:
            return (await _agents(r) == everyone) or None

        async def all_published() -> bool | None:
            # the agent key and each agent's worker key: a worker key written after the
            # snapshot below would look like a key that appeared out of nowhere
            hosts_with_workers = {k.split("/")[4] for k in await r.keys("/svcd/services/api/")}
            return (await all_registered() and hosts_with_workers == everyone) or None

        await eventually(all_published, within=30, what="three agents and their workers")
        _, before = await r.client.get_prefix("/svcd/")
        cut = hosts[1]
        ip("link", "set", cut.outside, "down")

        async def cut_gone() -> bool | None:
            return (await _agents(r) == everyone - {cut.name}) or None

        await eventually(cut_gone, within=TTL + 3, what=f"{cut.name}'s keys expired")
        _, after = await r.client.get_prefix("/svcd/")
        survivors = {(kv.key, kv.lease) for kv in before if f"/{cut.name}" not in kv.key}
        assert {(kv.key, kv.lease) for kv in after} == survivors  # untouched, same leases
        assert all(h.proc is not None and h.proc.poll() is None for h in hosts)

        ip("link", "set", cut.outside, "up")
        await eventually(all_registered, within=15, what=f"{cut.name} registered again")
